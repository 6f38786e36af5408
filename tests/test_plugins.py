"""The plugin kernel: discovery through entry points, isolation of broken plugins, duplicates, CLI."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from routesae.architectures.topk import TopKConfig, TopKSAE
from routesae.cli import make_cli
from routesae.errors import PluginError
from routesae.hookspecs import hookimpl
from routesae.interop import Exporter
from routesae.interop.saelens_exporters import VanillaToSAELens
from routesae.interpreters import Interpreter
from routesae.metrics import Metric
from routesae.plugins import KINDS, PluginManager
from routesae.routers import Aggregation, Router

ROOT = Path(__file__).resolve().parents[1]


class MaxOfLayers(Aggregation):
    name = "max-of-layers"


class WideTopKSAE(TopKSAE):
    name = "widetopk"


class ExtraArchitecture:
    @hookimpl
    def register_architectures(self, register):
        register(WideTopKSAE)


class DuplicateTopK:
    @hookimpl
    def register_architectures(self, register):
        register(WideTopKSAE, name="topk")


def test_builtins_register_through_their_entry_points():
    pm = PluginManager()
    assert "topk" in pm.names("architecture")
    assert {"console", "jsonl"} <= set(pm.names("reporter"))
    provider = pm.provider("architecture", "topk")
    assert (provider.distribution, provider.name) == ("routesae", "architectures")


def test_plugin_registered_in_code_is_usable_and_listed():
    pm = PluginManager()
    pm.register(ExtraArchitecture(), name="extra")
    try:
        assert pm.get("architecture", "widetopk") is WideTopKSAE
        result = CliRunner().invoke(make_cli(pm), ["plugins", "--json"])
        assert result.exit_code == 0, result.output
        listed = {p["name"]: p for p in json.loads(result.output)}
        assert listed["extra"]["registered"] == {"architecture": ["widetopk"]}
        help_text = CliRunner().invoke(make_cli(pm), ["train", "--help"]).output
        assert "widetopk" in help_text
    finally:
        pm.unregister("extra")
    assert "widetopk" not in pm.names("architecture")


def test_a_name_registered_twice_keeps_the_first_and_disables_only_the_later_registration(capsys, monkeypatch):
    pm = PluginManager()
    pm.register(DuplicateTopK(), name="dupe", distribution="routesae-dupe")
    pm.register(ExtraArchitecture(), name="extra")
    try:
        assert pm.get("architecture", "topk") is TopKSAE, "the built-in, registered first, keeps the name"
        assert pm.get("architecture", "widetopk") is WideTopKSAE, "other plugins are untouched"
        warning = capsys.readouterr().err
        assert "the architecture 'topk' of plugin 'dupe' (routesae-dupe) is ignored" in warning
        assert "plugin 'architectures' (routesae" in warning and len(warning.splitlines()) == 1
        assert pm.infos["dupe"].error is None and pm.infos["dupe"].registered == {}
        assert pm.infos["dupe"].warnings == [warning.strip().removeprefix("routesae: warning: ")]
        monkeypatch.setenv("ROUTESAE_STRICT_PLUGINS", "1")
        pm.register(ExtraArchitecture(), name="extra-again")  # re-collects, now strictly
        with pytest.raises(PluginError) as err:
            pm.names("architecture")
        assert "routesae-dupe" in str(err.value) and "routesae" in str(err.value).replace("routesae-dupe", "")
    finally:
        for name in ("dupe", "extra", "extra-again"):
            if name in pm.infos:
                pm.unregister(name)


def test_registering_a_non_architecture_is_refused():
    class Bad:
        @hookimpl
        def register_architectures(self, register):
            register(TopKConfig, name="notanarch")

    pm = PluginManager()
    pm.register(Bad(), name="bad")
    try:
        assert "notanarch" not in pm.names("architecture")
        assert "must be a subclass of routesae.SAE" in pm.infos["bad"].error
    finally:
        pm.unregister("bad")


def test_unknown_name_lists_installed():
    with pytest.raises(PluginError, match="installed: .*topk"):
        PluginManager().get("architecture", "nope")


def _write_package(root: Path, dist: str, module: str, body: str) -> Path:
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text(textwrap.dedent(body))
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "{dist}"
            version = "0.0.1"
            [project.entry-points.routesae]
            {module} = "{module}"
            """
        )
    )
    return pkg


@pytest.fixture(scope="module")
def broken_plugins_site(tmp_path_factory) -> Path:
    """Real packages, pip-installed into a private site directory: one that fails to import,
    one whose hook raises, one with a misspelt hook, and one healthy plugin."""
    root = tmp_path_factory.mktemp("plugin-src")
    packages = [
        _write_package(root, "routesae-broken-import", "broken_import", "raise ImportError('missing optional dependency: triton')\n"),
        _write_package(
            root,
            "routesae-broken-hook",
            "broken_hook",
            """
            from routesae.hookspecs import hookimpl
            @hookimpl
            def register_architectures(register):
                raise RuntimeError('hook exploded')
            """,
        ),
        _write_package(
            root,
            "routesae-typo-hook",
            "typo_hook",
            """
            from routesae.hookspecs import hookimpl
            @hookimpl
            def register_architecturez(register):
                pass
            """,
        ),
        _write_package(
            root,
            "routesae-healthy",
            "healthy",
            """
            from routesae.architectures.topk import TopKSAE
            from routesae.hookspecs import hookimpl
            class HealthySAE(TopKSAE):
                name = "healthy"
            @hookimpl
            def register_architectures(register):
                register(HealthySAE)
            """,
        ),
    ]
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site)]
        + [str(p) for p in packages],
        check=True,
    )
    return site


def _routesae(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    for key in ("ROUTESAE_STRICT_PLUGINS", "ROUTESAE_LOAD_PLUGINS"):
        if key not in env:
            environ.pop(key, None)
    return subprocess.run([sys.executable, "-m", "routesae", *args], capture_output=True, text=True, env=environ)


def test_broken_plugins_are_disabled_with_one_warning_each(broken_plugins_site):
    result = _routesae(broken_plugins_site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["distribution"]: p for p in json.loads(result.stdout)}
    assert "ImportError: missing optional dependency: triton" in listed["routesae-broken-import"]["error"]
    assert "RuntimeError: hook exploded" in listed["routesae-broken-hook"]["error"]
    assert "register_architecturez" in listed["routesae-typo-hook"]["error"]
    assert listed["routesae-healthy"]["registered"] == {"architecture": ["healthy"]}
    assert listed["routesae"]["error"] is None
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 3
    for dist in ("routesae-broken-import", "routesae-broken-hook", "routesae-typo-hook"):
        assert sum(dist in w for w in warnings) == 1


def test_strict_mode_turns_a_broken_plugin_into_an_error(broken_plugins_site):
    result = _routesae(broken_plugins_site, "plugins", ROUTESAE_STRICT_PLUGINS="1")
    assert result.returncode == 2
    assert "routesae-broken-import" in result.stderr and "Traceback" not in result.stderr


def test_load_plugins_selects_distributions(broken_plugins_site):
    only_healthy = _routesae(broken_plugins_site, "plugins", "--json", ROUTESAE_LOAD_PLUGINS="routesae-healthy")
    names = {p["distribution"] for p in json.loads(only_healthy.stdout)}
    assert names == {"routesae", "routesae-healthy"}
    assert "warning" not in only_healthy.stderr
    builtins_only = _routesae(broken_plugins_site, "plugins", "--json", ROUTESAE_LOAD_PLUGINS="")
    assert {p["distribution"] for p in json.loads(builtins_only.stdout)} == {"routesae"}


class CoinFlip(Router):
    name = "coin-flip"

    def route(self, layers, probs_NL):
        raise NotImplementedError("registered, never run")


class Length(Metric):
    name = "length"

    def update(self, batch):
        pass

    def result(self):
        return {}


class Echo(Interpreter):
    name = "echo"

    def complete(self, messages, *, max_tokens, temperature):
        raise NotImplementedError("registered, never run")


class ManyKinds:
    """One plugin providing one thing of several kinds."""

    @hookimpl
    def register_routers(self, register):
        register(CoinFlip())

    @hookimpl
    def register_metrics(self, register):
        register(Length)

    @hookimpl
    def register_interpreters(self, register):
        register(Echo)

    @hookimpl
    def register_commands(self, cli):
        import click

        @cli.command(name="hello")
        @click.argument("who")
        def hello(who):
            click.echo(f"hello {who}")


def test_each_kind_is_registered_and_attributed():
    pm = PluginManager()
    pm.register(ManyKinds(), name="many", distribution="routesae-many", version="1.2")
    try:
        assert pm.get("router", "coin-flip") is not None
        assert pm.get("metric", "length") is Length
        assert pm.get("interpreter", "echo") is Echo
        info = pm.provider("metric", "length")
        assert (info.distribution, info.version) == ("routesae-many", "1.2")
        assert info.registered == {"router": ["coin-flip"], "metric": ["length"], "interpreter": ["echo"]}
        result = CliRunner().invoke(make_cli(pm), ["hello", "world"])
        assert result.exit_code == 0 and result.output == "hello world\n"
    finally:
        pm.unregister("many")


@pytest.mark.parametrize(
    ("kind", "obj", "message"),
    [
        ("architecture", TopKConfig, "must be a subclass of routesae.SAE"),
        ("architecture", WideTopKSAE(TopKConfig(k=2, latent_size=8, layer=0), 4), "must be a subclass of routesae.SAE"),
        ("router", CoinFlip, r"must be registered as an instance: register\(CoinFlip\(\)\), not the class"),
        ("router", MaxOfLayers(), "must be an instance of routesae.routers.Router"),
        ("aggregation", MaxOfLayers, r"must be registered as an instance: register\(MaxOfLayers\(\)\)"),
        ("aggregation", CoinFlip(), "must be an instance of routesae.routers.Aggregation"),
        ("metric", len, "must be a subclass of routesae.metrics.Metric"),
        ("metric", Length(), "must be a subclass of routesae.metrics.Metric"),
        ("interpreter", str, "must be a subclass of routesae.Interpreter"),
        ("reporter", Length, "must be a subclass of routesae.reporters.Reporter"),
        ("exporter", VanillaToSAELens, r"must be registered as an instance: register\(VanillaToSAELens\(\)\)"),
        ("exporter", Length(), "must be an instance of routesae.interop.Exporter"),
        ("exporter", Exporter(), "must set both format and architecture"),
    ],
)
def test_every_kind_refuses_what_the_kernel_could_not_use(kind, obj, message):
    hook = KINDS[kind].hook

    class Wrong:
        pass

    def implementation(self, register):
        register(obj, name="wrong")

    implementation.__name__ = hook
    setattr(Wrong, hook, hookimpl(implementation))
    pm = PluginManager()
    pm.register(Wrong(), name="wrong-plugin")
    assert "wrong" not in pm.names(kind)
    assert f"{kind} 'wrong'" in pm.infos["wrong-plugin"].error
    assert re.search(message, pm.infos["wrong-plugin"].error), pm.infos["wrong-plugin"].error


def test_cli_lists_builtins_and_the_installed_example_plugin():
    listed = json.loads(CliRunner().invoke(make_cli(), ["plugins", "--json"]).output)
    by_dist = {(p["distribution"], p["name"]): p for p in listed}
    assert by_dist[("routesae-batchtopk", "batchtopk")]["registered"] == {
        "architecture": ["batchtopk"], "exporter": ["saelens:batchtopk"]}
    assert "saelens:topk" in by_dist[("routesae", "architectures")]["registered"]["exporter"]
    assert {"topk", "routesae", "crosscoder"} <= set(by_dist[("routesae", "architectures")]["registered"]["architecture"])
    assert by_dist[("routesae", "reporters")]["registered"]["reporter"] == ["console", "jsonl", "wandb"]
    assert by_dist[("routesae", "routers")]["registered"] == {"router": ["fixed", "hard", "random", "soft", "uniform"],
                                                             "aggregation": ["mean", "sum"]}
    table = CliRunner().invoke(make_cli(), ["plugins"]).output
    assert "routesae-batchtopk" in table and "architecture: batchtopk" in table
