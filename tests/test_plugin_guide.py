"""docs/plugins.md is true: its examples are real code, its contract names real things.

Blocks labelled ``# routesae-examples/PATH`` are one package: it is written out, pip-installed
into a private directory and loaded through its entry point like any installed plugin, and each
example is used through the CLI. Blocks labelled ``# plugins/PATH`` are excerpts of the example
packages in this repository and must appear in them word for word. Every hook is documented with
its signature, and every ``routesae.NAME`` the guide mentions exists.
"""

import csv
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import routesae
from routesae import hookspecs, load_sae
from routesae.cli import make_cli
from routesae.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(?:python|toml)\n# (\S+)\n(.*?)^```", flags=re.MULTILINE | re.DOTALL)
EXAMPLES = "routesae-examples/"


def labelled_blocks() -> list[tuple[str, str]]:
    """``(label, code)`` of every code block whose first line is ``# PATH``."""
    return BLOCK.findall(GUIDE.read_text())


def test_the_guide_documents_every_hook_with_its_signature():
    text = GUIDE.read_text()
    hooks = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")}
    for name, fn in hooks.items():
        assert f"`{name}{inspect.signature(fn)}`" in text, name


def test_every_public_name_the_guide_mentions_exists():
    names = set(re.findall(r"(?<![\w/.-])routesae\.([A-Za-z_]\w*)", GUIDE.read_text()))
    assert {"Router", "Routing", "StandardizedLayers", "SparseCodes", "EvalBatch", "RunningMean"} <= names
    missing = sorted(n for n in names if not hasattr(routesae, n))
    assert not missing, f"docs/plugins.md names routesae.{missing}, which routesae does not export"


@pytest.mark.parametrize("label", sorted({label for label, _ in labelled_blocks() if label.startswith("plugins/")}))
def test_excerpts_of_the_example_packages_match_them(label):
    source = (ROOT / label).read_text()
    for block_label, code in labelled_blocks():
        if block_label == label:
            assert code in source, f"docs/plugins.md quotes {label} as it no longer is:\n{code}"


@pytest.fixture(scope="module")
def examples_site(tmp_path_factory) -> Path:
    """The guide's example package, written out from its blocks and pip-installed into a directory of its own."""
    package = tmp_path_factory.mktemp("guide-src")
    files = [(label.removeprefix(EXAMPLES), code) for label, code in labelled_blocks() if label.startswith(EXAMPLES)]
    assert {"pyproject.toml", "routesae_examples/__init__.py"} <= {path for path, _ in files}
    for path, code in files:
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(code)
    site = tmp_path_factory.mktemp("guide-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(package)], check=True)
    return site


@pytest.fixture
def examples(examples_site, monkeypatch) -> PluginManager:
    """A plugin manager that found the example package through its entry point, strictly (no warning tolerated)."""
    monkeypatch.syspath_prepend(str(examples_site))
    monkeypatch.setenv("ROUTESAE_STRICT_PLUGINS", "1")
    monkeypatch.delenv("ROUTESAE_LOAD_PLUGINS", raising=False)
    return PluginManager()


def test_the_example_package_registers_one_plugin_of_each_kind(examples):
    (info,) = [i for i in examples.plugin_infos() if i.distribution == "routesae-examples"]
    assert info.error is None and not info.warnings
    assert info.registered == {"architecture": ["relu-l1"], "metric": ["mae"], "interpreter": ["constant"],
                               "reporter": ["csv"], "exporter": ["npz:relu-l1"]}
    result = CliRunner().invoke(make_cli(examples), ["--help"])
    assert result.exit_code == 0 and "saes" in result.output


def test_each_example_works_through_the_cli(examples, tiny_model_dir, text_corpus_dir, tmp_path):
    def cli(*args):
        result = CliRunner().invoke(make_cli(examples), [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    out = tmp_path / "run"
    cli("train", "--model", tiny_model_dir, "--dataset", text_corpus_dir, "--arch", "relu-l1", "--l1", "0.01",
        "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
        "--buffer-tokens", "256", "--tokens", "640", "--log-every", "2", "--report", "csv", "--out", out)
    sae_dir = out / "relu-l1-L2-F64"
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10] and {r["sae"] for r in rows} == {"relu-l1-L2-F64"}
    assert all(float(r["loss"]) > 0 for r in rows)

    evaluated = cli("evaluate", out, "--metric", "mae", "--metric", "normmse", "--tokens", "256", "--json",
                    "--report", "jsonl")
    record = json.loads(evaluated.stdout)[str(sae_dir)]
    assert record["metrics"]["mae"] > 0 and record["better"]["mae"] == "lower"

    cli("contexts", out, "--threshold", "0.1", "--min-contexts", "1", "--max-classes", "0")
    cli("interpret", sae_dir, "--interpreter", "constant", "--explanation", "all the same", "--sample", "2",
        "--no-detection")
    interpreted = json.loads((sae_dir / "interpretations.json").read_text())
    assert {r["explanation"] for r in interpreted["latents"].values()} == {"all the same"}

    cli("export", sae_dir, "--format", "npz", "--out", tmp_path / "npz")
    with np.load(tmp_path / "npz" / "weights.npz") as arrays:
        assert np.array_equal(arrays["W_dec"], load_sae(sae_dir, plugins=examples)[0].W_dec.detach().numpy())
    assert json.loads((tmp_path / "npz" / "settings.json").read_text())["l1"] == 0.01

    listed = cli("saes", out).output
    assert listed.startswith("relu-l1-L2-F64: architecture relu-l1 (routesae-examples 0.1.0)")
