"""One test per hook, each implementing the hook in a plugin registered on a manager of its own.

The manager is passed (``make_cli(pm)``, ``plugins=pm``), never the process-wide one, so each test also
checks that what ``--help`` shows is what runs. Datasette-style meta-tests keep this file and the
README's hook table in step with ``routesae.hookspecs``: a hook without a ``test_hook_<name>`` that
implements it, or without a README row giving its signature, fails.
"""

import ast
import inspect
import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from routesae import SAESpec, TrainConfig, export_sae, extract_contexts, hookspecs, load_sae, train
from routesae.architectures.routesae import RouteSAE
from routesae.architectures.topk import TopKSAE
from routesae.architectures.vanilla import VanillaSAE
from routesae.checkpoint import save_sae
from routesae.cli import make_cli
from routesae.distributed import Ranks
from routesae.errors import ConfigError, PluginError, RouteSAEError
from routesae.evaluate import metric_classes
from routesae.hookspecs import hookimpl
from routesae.interop import Exporter
from routesae.interop.saelens import SAELensExporter
from routesae.interpreters import Completion, Interpreter
from routesae.metrics import Metric
from routesae.plugins import PluginManager, activated, get_plugin_manager
from routesae.reporters import Reporter
from routesae.routers import Aggregation, Router, Routing

ROOT = Path(__file__).resolve().parents[1]
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")}
SMALL = ["--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
         "--latent-size", "64", "--tokens", "640", "--log-every", "2"]


# -- meta-tests -------------------------------------------------------------------------------------


def readme_hook_rows() -> dict[str, str]:
    """``{hook: signature}`` from the README's hook table rows (``| `register_x(register)` | ... |``)."""
    rows = re.findall(r"^\| `(register_\w+)(\([^)`]*\))` \|", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_the_readme_documents_every_hook_with_its_signature():
    assert readme_hook_rows() == {name: str(inspect.signature(fn)) for name, fn in HOOKS.items()}


def _is_hookimpl(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "hookimpl" for d in node.decorator_list)


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_test_that_implements_it(hook):
    tree = ast.parse(Path(__file__).read_text())
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"test_hook_{hook}"]
    assert tests, f"no test_hook_{hook} in {Path(__file__).name}"
    impls = [n for n in ast.walk(tests[0]) if isinstance(n, ast.FunctionDef) and n.name == hook and _is_hookimpl(n)]
    assert impls, f"test_hook_{hook} does not implement {hook} in a plugin of its own"


# -- one plugin per hook ------------------------------------------------------------------------------


@pytest.fixture
def train_args(tiny_model_dir, text_corpus_dir):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *SMALL]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    """A short TopK run of the built-ins, for the hooks that act on trained SAEs."""
    out = tmp_path_factory.mktemp("hooks") / "run"
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, device="cpu")
    train([SAESpec.build("topk", k=4, latent_size=64, layer=2)], out, cfg, reporters=[])
    return out / "topk-L2-k4-F64"


def test_hook_register_architectures(train_args, tmp_path):
    class WideTopK(TopKSAE):
        name = "widetopk"

    class Plugin:
        @hookimpl
        def register_architectures(self, register):
            register(WideTopK)

    pm = PluginManager()
    pm.register(Plugin(), name="wide")
    assert "widetopk" not in get_plugin_manager().names("architecture")
    assert "widetopk" in CliRunner().invoke(make_cli(pm), ["train", "--help"]).output
    result = CliRunner().invoke(make_cli(pm), [*train_args, "--arch", "widetopk", "--k", "4", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    sae, config = load_sae(tmp_path / "r" / "widetopk-L2-k4-F64", plugins=pm)
    assert isinstance(sae, WideTopK) and config["architecture"] == "widetopk"
    with pytest.raises(RouteSAEError, match="unknown architecture 'widetopk'"):
        load_sae(tmp_path / "r" / "widetopk-L2-k4-F64")


def test_hook_register_routers(tiny_model_dir, text_corpus_dir, tmp_path):
    class LastLayerRouter(Router):
        """Every token to the last routed block, unscaled."""

        name = "last"
        single_block = True

        def route(self, layers, probs_NL):
            chosen = torch.full((probs_NL.shape[0],), layers.n_layers - 1, dtype=torch.long, device=probs_NL.device)
            return Routing(layers.select(chosen), torch.nn.functional.one_hot(chosen, layers.n_layers).to(probs_NL.dtype), chosen)

    class Plugin:
        @hookimpl
        def register_routers(self, register):
            register(LastLayerRouter())

    pm = PluginManager()
    pm.register(Plugin(), name="last-router")
    spec = SAESpec.build("routesae", router="last", layers="1:3", k=4, latent_size=64, plugins=pm)
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256)
    summary = train([spec], tmp_path / "r", cfg, reporters=[], plugins=pm)
    (trained,) = summary["saes"]
    assert trained["statistics"]["routing_counts"] == {"1": 0.0, "2": 0.0, "3": 640.0}
    sae, _ = load_sae(trained["path"], plugins=pm)
    assert isinstance(sae, RouteSAE) and sae.steering_caveat() is None, "a single-block router can be steered"
    with pytest.raises(RouteSAEError, match="router='last' is not registered"):
        SAESpec.build("routesae", router="last")


def test_hook_register_aggregations():
    class MaxAggregation(Aggregation):
        name = "max"

        def __call__(self, layers):
            return layers.materialize().amax(1)

    class Plugin:
        @hookimpl
        def register_aggregations(self, register):
            register(MaxAggregation())

    pm = PluginManager()
    pm.register(Plugin(), name="max-aggregation")
    with activated(pm):
        sae = RouteSAE(RouteSAE.build_config({"layers": "0:2", "latent_size": 32, "aggregate": "max", "k": 3}), 8)
    acts = torch.randn(12, 3, 8)
    expected = sae.router(acts.sub(acts.mean(-1, keepdim=True)).div(acts.std(-1, keepdim=True) + 1e-6).amax(1)).softmax(-1)
    torch.testing.assert_close(sae(acts).extras["router_probs"], expected)
    assert pm.provider("aggregation", "max").name == "max-aggregation"


def test_hook_register_metrics(tiny_run):
    class MaxError(Metric):
        """The largest absolute reconstruction error at any counted position."""

        name = "max_error"
        better = "lower"

        def __init__(self):
            self.value = 0.0

        def update(self, batch):
            error = (batch.out.x_hat - batch.out.target).abs().amax(-1)[batch.counted_N]
            self.value = max(self.value, float(error.max()))

        def result(self):
            return {self.name: self.value}

    class Plugin:
        @hookimpl
        def register_metrics(self, register):
            register(MaxError)

    pm = PluginManager()
    pm.register(Plugin(), name="max-error")
    result = CliRunner().invoke(make_cli(pm), ["evaluate", str(tiny_run), "--metric", "max_error", "--metric", "normmse",
                                               "--tokens", "256", "--json", "--report", "jsonl"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)[str(tiny_run)]["metrics"]
    assert set(metrics) == {"max_error", "normmse"} and metrics["max_error"] > 0
    with activated(pm), pytest.raises(ConfigError, match=r"metric\(s\) max_error cannot combine the sums of several ranks"):
        metric_classes(["max_error", "normmse"], Ranks(rank=0, world_size=2))  # what torchrun evaluation checks first


def test_hook_register_interpreters(tiny_run):
    class Canned(Interpreter):
        """Always the same explanation, one token each."""

        name = "canned"

        def complete(self, messages, *, max_tokens, temperature):
            return Completion("Feature category: Undiscernible\nScore: 2\nExplanation: nothing in common", 1, 1, None)

    class Plugin:
        @hookimpl
        def register_interpreters(self, register):
            register(Canned)

    pm = PluginManager()
    pm.register(Plugin(), name="canned")
    extract_contexts([tiny_run], threshold=0.5, min_contexts=1, max_classes=0)
    assert "canned" in CliRunner().invoke(make_cli(pm), ["interpret", "--help"]).output
    result = CliRunner().invoke(make_cli(pm), ["interpret", str(tiny_run), "--interpreter", "canned", "--sample", "2",
                                               "--no-detection", "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["categories"]["undiscernible"]["count"] == 2


def test_hook_register_reporters(train_args, tmp_path):
    steps = []

    class Collect(Reporter):
        name = "collect"

        def step(self, report):
            steps.append(report.step)

    class Plugin:
        @hookimpl
        def register_reporters(self, register):
            register(Collect)

    pm = PluginManager()
    pm.register(Plugin(), name="collect")
    result = CliRunner().invoke(make_cli(pm), [*train_args, "--k", "4", "--report", "collect", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert steps == list(range(2, 11, 2))


def test_hook_register_exporters(tmp_path, monkeypatch):
    class WideVanilla(VanillaSAE):
        name = "widevanilla"

    class WideToSAELens(SAELensExporter):
        """Written as SAELens's standard SAE; a plain standard SAE still reads back as vanilla (not primary)."""

        architecture = "widevanilla"
        saelens_architecture = "standard"
        primary = False

    class DecoderAsJSON(Exporter):
        format = "decoder-json"
        architecture = "widevanilla"

        def export(self, sae, config, out):
            (out / "decoder.json").write_text(json.dumps(sae.W_dec.tolist()))

    class Plugin:
        @hookimpl
        def register_architectures(self, register):
            register(WideVanilla)

        @hookimpl
        def register_exporters(self, register):
            register(WideToSAELens())
            register(DecoderAsJSON())

    pm = PluginManager()
    pm.register(Plugin(), name="wide-exporters")
    with activated(pm):
        sae = WideVanilla(WideVanilla.build_config({"layer": 1, "latent_size": 16, "normalize": "none"}), 8)
    save_sae(sae, tmp_path / "sae", {"name": "wide"})
    assert pm.provider("exporter", "saelens:widevanilla").name == "wide-exporters"
    assert "decoder-json" in CliRunner().invoke(make_cli(pm), ["export", "--help"]).output
    result = CliRunner().invoke(make_cli(pm), ["export", str(tmp_path / "sae"), "--format", "decoder-json", "--out",
                                               str(tmp_path / "json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "json" / "decoder.json").read_text()) == sae.W_dec.tolist()
    export_sae(tmp_path / "sae", tmp_path / "saelens", plugins=pm)
    again, _ = load_sae(tmp_path / "saelens", plugins=pm)
    assert isinstance(again, WideVanilla) and torch.equal(again.W_enc, sae.W_enc)
    plain, config = load_sae(tmp_path / "saelens")  # without the plugin: SAELens's standard SAE is a vanilla one
    assert type(plain).__name__ == "VanillaSAE" and config["architecture"] == "vanilla"
    with pytest.raises(RouteSAEError, match="unknown architecture 'widevanilla'"):
        export_sae(tmp_path / "sae", tmp_path / "nope")

    class Broken:
        @hookimpl
        def register_exporters(self, register):
            register(DecoderAsJSON)  # the class, not an instance

    pm.register(Broken(), name="broken-exporter")
    monkeypatch.setenv("ROUTESAE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"register\(DecoderAsJSON\(\)\)"):
        pm.names("exporter")


def test_hook_register_commands():
    class Plugin:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello")
            @click.argument("who")
            def hello(who):
                click.echo(f"hello {who}")

    pm = PluginManager()
    pm.register(Plugin(), name="hello")
    result = CliRunner().invoke(make_cli(pm), ["hello", "world"])
    assert result.exit_code == 0 and result.output == "hello world\n"
    assert "hello" not in CliRunner().invoke(make_cli(), ["--help"]).output
