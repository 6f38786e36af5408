"""The main job on the real embedded defaults (SmolLM2 + wiki), kept small: the CLI path `make demo` uses."""

import json

import pytest
from click.testing import CliRunner

from routesae.checkpoint import load_sae
from routesae.cli import make_cli

pytestmark = pytest.mark.embedded


def test_train_topk_on_smollm2_and_wiki(embedded_home, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    out = tmp_path / "run"
    args = ["train", "--arch", "topk", "--layer", "21", "--k", "8", "--latent-size", "512", "--tokens", "4096",
            "--batch-size", "8", "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens"] == 4096 and summary["layers"] == [21]
    sae, config = load_sae(out / "topk-L21-k8-F512")
    assert sae.d_model == 576 and config["model"]["n_layers"] == 30 and config["model"]["embedded"]
    assert config["data"]["source"] == "wiki" and config["hooks"] == ["blocks.21.hook_resid_post"]
    assert 0 < summary["saes"][0]["final"]["nmse"] < 1


def test_every_architecture_trains_on_the_embedded_defaults_from_one_harvest(embedded_home, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    archs = ["vanilla", "gated", "topk", "jumprelu", "routesae", "crosscoder", "batchtopk"]
    args = ["train", *[a for arch in archs for a in ("--arch", arch)], "--latent-size", "256", "--tokens", "4096",
            "--batch-size", "8", "--out", str(tmp_path / "zoo"), "--json"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == list(range(6, 22)), "RouteSAE and Crosscoder read the reference range 6..21"
    by_arch = {s["architecture"]: s for s in summary["saes"]}
    assert set(by_arch) == set(archs)
    for arch, sae in by_arch.items():
        loaded, config = load_sae(sae["path"])
        assert loaded.name == arch and config["training"]["finished"]
        assert sae["final"]["nmse"] == sae["final"]["nmse"] and sae["final"]["loss"] > 0  # finite, logged
    assert by_arch["topk"]["layers"] == [21] and by_arch["routesae"]["layers"] == list(range(6, 22))
    counts = by_arch["routesae"]["statistics"]["routing_counts"]
    assert list(counts) == [str(b) for b in range(6, 22)] and sum(counts.values()) == 4096
