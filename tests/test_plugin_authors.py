"""What a plugin author relies on (docs/plugins.md), end to end through the real CLI on a tiny Llama.

Routers with settings, list-valued settings, settings that go only to the SAEs that take them,
provenance in checkpoints and what loading says without the plugin, a duplicate name that leaves
the CLI working, and a plugin that raises inside training or evaluation: one line naming it, and a
run that the same command restarts (or ``--resume`` continues from its checkpoint).
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_plugins import _write_package

from routesae import (
    ConfigError,
    PluginError,
    PluginManager,
    Router,
    RouterConfig,
    Routing,
    SAEConfig,
    TopKConfig,
    TopKSAE,
    hookimpl,
    load_sae,
    setting,
)
from routesae.cli import make_cli
from routesae.specs import load_run_file

SMALL = ["--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
         "--buffer-tokens", "256", "--log-every", "2", "--report", "jsonl"]


@pytest.fixture
def train_args(tiny_model_dir, text_corpus_dir):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *SMALL]


def invoke(pm, *args):
    return CliRunner().invoke(make_cli(pm), [str(a) for a in args])


def help_of(pm, command):
    """``routesae COMMAND --help`` as plain text: the panels' frames gone and wrapped help cells joined again."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", invoke(pm, command, "--help").output).split())


def manager(plugin, name, distribution="(registered in code)", version=""):
    pm = PluginManager()
    pm.register(plugin, name=name, distribution=distribution, version=version)
    return pm


# -- a router with a setting ------------------------------------------------------------------------


@dataclass
class FixedLayerConfig(RouterConfig):
    layer: int = setting(0, "Index in the routed range that every token goes to.")


class FixedLayerRouter(Router):
    """Every token to one layer of the routed range, chosen by a setting."""

    name = "at-layer"
    single_block = True
    Config: ClassVar[type[RouterConfig]] = FixedLayerConfig

    def route(self, layers, probs_NL):
        chosen_N = torch.full((probs_NL.shape[0],), self.cfg.layer, dtype=torch.long, device=probs_NL.device)
        weights_NL = torch.nn.functional.one_hot(chosen_N, layers.n_layers).to(probs_NL.dtype)
        return Routing(layers.select(chosen_N), weights_NL, chosen_N)


class FixedRouterPlugin:
    @hookimpl
    def register_routers(self, register):
        register(FixedLayerRouter())


def test_a_router_setting_is_an_option_sweeps_and_is_recorded_with_its_provenance(train_args, tmp_path):
    pm = manager(FixedRouterPlugin(), "fixed-router", "routesae-fixed-router", "0.2")
    help_text = help_of(pm, "train")
    assert "--route-layer INTEGER[,...] With --router at-layer: Index in the routed range" in help_text
    assert "Installed: at-layer, fixed, hard" in help_text  # --router lists what is installed
    out = tmp_path / "run"
    result = invoke(pm, *train_args, "--arch", "routesae", "--layers", "1:3", "--k", "4", "--router", "at-layer",
                    "--route-layer", "0,2", "--tokens", "256", "--out", out)
    assert result.exit_code == 0, result.output
    names = ["routesae-L1-3-at-layer-sum-k4-F64", "routesae-L1-3-at-layer-layer2-sum-k4-F64"]
    for name, block in zip(names, ("1", "3")):
        sae, config = load_sae(out / name, plugins=pm)
        assert config["config"]["router_settings"] == {"layer": int(block) - 1}
        assert sae.routing_rule.cfg.layer == int(block) - 1, "the SAE routes with its own setting"
        counts = config["training"]["statistics"]["routing_counts"]
        assert counts[block] == 256.0 and sum(counts.values()) == 256.0
        provenance = {p["kind"]: p for p in config["plugins"]}
        assert provenance["router"] == {"kind": "router", "name": "at-layer", "distribution": "routesae-fixed-router",
                                        "version": "0.2"}
        assert provenance["architecture"]["distribution"] == "routesae"
        assert provenance["aggregation"]["name"] == "sum"
    manifest = json.loads((out / "run.json").read_text())
    assert all(s["plugins"][1]["distribution"] == "routesae-fixed-router" for s in manifest["saes"])
    with pytest.raises(PluginError) as missing:  # the process-wide manager has no such router
        load_sae(out / names[0])
    assert "unknown router 'at-layer'" in str(missing.value)
    assert "pip install 'routesae-fixed-router==0.2'" in str(missing.value)


def test_a_router_setting_is_refused_with_the_routers_own_settings():
    pm = manager(FixedRouterPlugin(), "fixed-router")
    from routesae.specs import SAESpec

    with pytest.raises(ConfigError, match=r"router 'hard' does not take the setting 'route_layer'.*another router"):
        SAESpec.build("routesae", route_layer=1, plugins=pm)
    with pytest.raises(ConfigError, match=r"FixedLayerConfig: layer must be int"):
        SAESpec.build("routesae", router="at-layer", route_layer="x", plugins=pm)


def test_a_router_registered_as_a_class_is_refused_when_it_loads_and_the_rest_keeps_working():
    class ClassRegistered:
        @hookimpl
        def register_routers(self, register):
            register(FixedLayerRouter)

    pm = manager(ClassRegistered(), "class-router", "routesae-class-router", "1.0")
    assert pm.names("router") == sorted(["hard", "soft", *(n for n in PluginManager().names("router") if n not in ("hard", "soft"))])
    error = pm.infos["class-router"].error
    assert "router 'at-layer' must be registered as an instance: register(FixedLayerRouter()), not the class" in error
    result = invoke(pm, "plugins", "--json")
    assert result.exit_code == 0
    with pytest.raises(PluginError, match=r"unknown router 'at-layer'.*plugin 'class-router' \(routesae-class-router 1\.0\) "
                                          r"failed to load and may provide it \(PluginError: router 'at-layer' must be"):
        pm.get("router", "at-layer")


def test_an_architecture_without_its_required_methods_is_refused_when_it_loads():
    from routesae import SAE, SingleLayerSAE

    class NoActivation(SingleLayerSAE):
        name = "no-activation"

    class NoReconstruction(SAE):
        name = "no-reconstruction"

        def forward(self, acts_NLD):
            raise NotImplementedError

    class Plugin:
        @hookimpl
        def register_architectures(self, register):
            register(NoActivation)

    class Other:
        @hookimpl
        def register_architectures(self, register):
            register(NoReconstruction)

    pm = manager(Plugin(), "no-activation")
    pm.register(Other(), name="no-reconstruction", distribution="(registered in code)")
    assert "no-activation" not in pm.names("architecture") and "topk" in pm.names("architecture")
    assert "architecture 'no-activation': NoActivation does not define activation" in pm.infos[
        "no-activation"].error
    assert "does not define reconstruction, encode_standardized, decode_standardized" in pm.infos["no-reconstruction"].error


# -- list-valued settings ---------------------------------------------------------------------------


@dataclass
class WidthsConfig(TopKConfig):
    widths: tuple[int, ...] = setting((8, 16), "Nested widths (a list-valued setting).")

    def name_parts(self):
        return [*super().name_parts(), "w" + "_".join(map(str, self.widths))]


class WidthsSAE(TopKSAE):
    name = "widths"
    Config: ClassVar[type[SAEConfig]] = WidthsConfig


class WidthsPlugin:
    @hookimpl
    def register_architectures(self, register):
        register(WidthsSAE)


def test_a_list_valued_setting_from_the_command_line_and_a_run_file(train_args, tmp_path):
    pm = manager(WidthsPlugin(), "widths")
    assert "--widths [INTEGER,...][,...]" in help_of(pm, "train")
    out = tmp_path / "cli"
    result = invoke(pm, *train_args, "--arch", "widths", "--k", "4", "--widths", "[4,8],[16]", "--tokens", "128", "--out", out)
    assert result.exit_code == 0, result.output
    assert load_sae(out / "widths-L2-k4-F64-w4_8", plugins=pm)[0].cfg.widths == (4, 8)
    assert load_sae(out / "widths-L2-k4-F64-w16", plugins=pm)[0].cfg.widths == (16,)
    refused = invoke(pm, *train_args, "--arch", "widths", "--widths", "4,8", "--out", tmp_path / "x")
    assert refused.exit_code == 2 and "'4' is not a list: write it in brackets, [a,b,c]" in refused.output

    run_file = tmp_path / "run.toml"
    run_file.write_text('[sae.nested]\narch = "widths"\nk = 4\nwidths = [4, 8, 32]\n')
    _, (spec,) = load_run_file(run_file, plugins=pm)
    assert spec.config.widths == (4, 8, 32) and spec.name == "nested"
    run_file.write_text('[sae.nested]\narch = "widths"\nwidths = [[4], [8]]\n')
    with pytest.raises(ConfigError, match=r"\[sae.nested\]: it sweeps widths; give one value per SAE table"):
        load_run_file(run_file, plugins=pm)
    run_file.write_text('[sae.nested]\narch = "widths"\nwidths = ["a"]\n')
    with pytest.raises(ConfigError, match=r"widths\[0\] must be int"):
        load_run_file(run_file, plugins=pm)
    run_file.write_text('[sae.nested]\narch = "topk"\nk = [4, 8]\n')
    with pytest.raises(ConfigError, match="it sweeps k"):
        load_run_file(run_file, plugins=pm)


# -- settings go to the SAEs that take them ---------------------------------------------------------


def test_a_setting_only_one_architecture_takes_goes_to_it_alone_with_a_note(train_args, tmp_path):
    out = tmp_path / "run"
    result = invoke(None, *train_args, "--arch", "vanilla", "--arch", "routesae", "--layers", "1:2", "--layer", "2",
                    "--l1", "5", "--tokens", "128", "--out", out)
    assert result.exit_code == 0, result.output
    assert "note: --arch routesae does not take --l1 (only vanilla does)" in result.stderr
    assert load_sae(out / "vanilla-L2-F64")[0].cfg.l1 == 5.0
    assert load_sae(out / "routesae-L1-2-hard-sum-k32-F64")[0].cfg.inner == "topk"
    alone = invoke(None, *train_args, "--arch", "routesae", "--l1", "5", "--out", tmp_path / "alone")
    assert alone.exit_code == 2 and "routesae with inner='topk' does not take the setting 'l1'" in alone.stderr


def test_help_gives_each_architectures_own_text_for_a_shared_setting():
    help_text = help_of(None, "train")
    assert re.search(r"[\w, ]*\btopk\b[\w, ]*: Latents kept per token \(0 < k < latent size\)", help_text)
    assert "crosscoder: Latents kept per token by TopK" in help_text
    assert "Installed: batchtopk" in help_text  # --inner lists what is installed


# -- duplicates, provenance of built-ins ------------------------------------------------------------


@pytest.fixture(scope="module")
def duplicate_site(tmp_path_factory):
    """A real package that registers the built-in name ``topk`` again, besides a name of its own."""
    package = _write_package(tmp_path_factory.mktemp("dupe-src"), "routesae-dupe", "dupe", """
        from routesae import TopKSAE, hookimpl

        class Mine(TopKSAE):
            name = "mine"

        @hookimpl
        def register_architectures(register):
            register(Mine, name="topk")
            register(Mine)
        """)
    site = tmp_path_factory.mktemp("dupe-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(package)], check=True)
    return site


def routesae_process(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("ROUTESAE_STRICT_PLUGINS", None)
    env.pop("ROUTESAE_LOAD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "routesae", *args], check=False, capture_output=True, text=True, env=env)


def test_a_duplicate_name_disables_only_the_later_registration_and_the_cli_keeps_working(duplicate_site):
    listed = routesae_process(duplicate_site, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    by_dist = {p["distribution"]: p for p in json.loads(listed.stdout)}
    assert by_dist["routesae-dupe"]["registered"] == {"architecture": ["mine"]} and by_dist["routesae-dupe"]["error"] is None
    (warning,) = by_dist["routesae-dupe"]["warnings"]
    assert "the architecture 'topk' of plugin 'dupe' (routesae-dupe 0.0.1) is ignored" in warning
    assert "plugin 'architectures' (routesae" in warning
    assert sum("warning" in line for line in listed.stderr.splitlines()) == 1
    help_text = routesae_process(duplicate_site, "train", "--help")
    assert help_text.returncode == 0 and "mine" in help_text.stdout


# -- plugin faults ----------------------------------------------------------------------------------


class FaultyTopK(TopKSAE):
    """A plugin whose loss raises from step ``fail_at`` on (a class attribute the test changes)."""

    name = "faulty"
    fail_at: ClassVar[int | None] = 0

    def loss_terms(self, out, state):
        if self.fail_at is not None and state.step >= self.fail_at:
            return {"broken": out.latents.sum() * (1 // 0)}
        return super().loss_terms(out, state)


class FaultyPlugin:
    @hookimpl
    def register_architectures(self, register):
        register(FaultyTopK)


@pytest.fixture
def faulty():
    pm = manager(FaultyPlugin(), "faulty", "routesae-faulty", "1.0")
    yield pm
    FaultyTopK.fail_at = 0


def test_a_plugin_raising_in_its_loss_is_one_line_naming_it_and_the_same_command_restarts(faulty, train_args, tmp_path):
    args = [*train_args, "--arch", "faulty", "--k", "4", "--tokens", "256", "--out", tmp_path / "run"]
    FaultyTopK.fail_at = 0
    result = invoke(faulty, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: plugin 'faulty' (routesae-faulty 1.0) raised ZeroDivisionError: integer division or "
                           "modulo by zero while training SAE 'faulty-L2-k4-F64' at step 0; nothing was checkpointed yet")
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["failures"][0]["plugin"]["distribution"] == "routesae-faulty"
    debug = CliRunner().invoke(make_cli(faulty), ["--debug", *map(str, args)])
    assert "Traceback" in debug.stderr and "(1 // 0)" in debug.stderr, "--debug shows where the plugin raised"
    FaultyTopK.fail_at = None  # the author fixes the plugin; the same command, no --overwrite
    again = invoke(faulty, *args)
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_a_plugin_raising_after_a_checkpoint_leaves_the_run_resumable_to_the_uninterrupted_weights(faulty, train_args,
                                                                                                     tmp_path):
    args = [*train_args, "--arch", "faulty", "--k", "4", "--tokens", "512", "--checkpoint-every", "2"]
    FaultyTopK.fail_at = None
    whole = invoke(faulty, *args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    FaultyTopK.fail_at = 5
    failed = invoke(faulty, *args, "--out", tmp_path / "run")
    assert failed.exit_code == 2
    assert "at step 5; the run is intact at its checkpoint of step 4: once it is fixed, continue it with --resume" in failed.stderr
    FaultyTopK.fail_at = None
    refused = invoke(faulty, *args, "--out", tmp_path / "run")
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = invoke(faulty, *args, "--out", tmp_path / "run", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(tmp_path / run / "faulty-L2-k4-F64" / "weights.safetensors") for run in ("whole", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_metric_plugin_raising_in_evaluation_is_one_line_naming_it(faulty, train_args, tmp_path):
    from routesae import Metric

    class Exploding(Metric):
        name = "exploding"

        def update(self, batch):
            raise KeyError("no such position")

        def result(self):
            return {}

    class MetricPlugin:
        @hookimpl
        def register_metrics(self, register):
            register(Exploding)

    FaultyTopK.fail_at = None
    assert invoke(faulty, *train_args, "--arch", "faulty", "--k", "4", "--tokens", "128", "--out", tmp_path / "r").exit_code == 0
    faulty.register(MetricPlugin(), name="exploding", distribution="routesae-exploding", version="2.0")
    result = invoke(faulty, "evaluate", tmp_path / "r", "--metric", "exploding", "--tokens", "64", "--report", "jsonl")
    assert result.exit_code == 2 and "Traceback" not in result.output
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: plugin 'exploding' (routesae-exploding 2.0) raised KeyError: 'no such position' "
                            "while evaluating")
    assert not (tmp_path / "r" / "faulty-L2-k4-F64" / "eval.json").exists()
