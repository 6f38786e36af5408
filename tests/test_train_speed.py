"""The trainer's opt-in speed switches (bf16 autocast, torch.compile) work on the CPU and leave defaults untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from routesae import SAESpec, TrainConfig, train
from routesae.rundir import WEIGHTS_FILE
from routesae.train_config import run_request

NAME = "topk-L2-k4-F64"


def run(tiny_model_dir, text_corpus_dir, out, **switches):
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=512, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, checkpoint_every=0, **switches)
    summary = train([SAESpec.build("topk", k=4, latent_size=64, layer=2)], out, cfg, reporters=[])
    return summary, load_file(out / NAME / WEIGHTS_FILE), out


@pytest.fixture(scope="module")
def plain(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    return run(tiny_model_dir, text_corpus_dir, tmp_path_factory.mktemp("plain"))


def test_switches_at_their_defaults_stay_out_of_the_run_request(plain):
    """Runs begun before the switches existed hold no such keys; they must still resume."""
    request = json.loads((plain[2] / "run.json").read_text())["request"]["train"]
    assert not {"compile", "autocast", "from_cache", "overlap_harvest"} & set(request)
    assert run_request([], TrainConfig(autocast=True))["train"]["autocast"] is True


def test_bf16_autocast_trains_float32_weights_close_to_the_plain_run(tiny_model_dir, text_corpus_dir, tmp_path, plain):
    summary, weights, _ = run(tiny_model_dir, text_corpus_dir, tmp_path / "bf16", autocast=True)
    plain_summary, plain_weights, _ = plain
    assert summary["tokens"] == plain_summary["tokens"] == 512
    final, plain_final = summary["saes"][0]["final"], plain_summary["saes"][0]["final"]
    assert final["nmse"] == pytest.approx(plain_final["nmse"], rel=0.1)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert not torch.equal(weights["W_dec"], plain_weights["W_dec"]), "bf16 matmuls round differently"
    torch.testing.assert_close(weights["W_dec"], plain_weights["W_dec"], atol=0.05, rtol=0)


def test_torch_compile_trains_the_same_weights_within_float_tolerance(tiny_model_dir, text_corpus_dir, tmp_path, plain):
    summary, weights, _ = run(tiny_model_dir, text_corpus_dir, tmp_path / "compiled", compile=True)
    assert summary["tokens"] == 512
    for name, w in plain[1].items():
        torch.testing.assert_close(weights[name], w, atol=1e-4, rtol=1e-4)


def test_overlapped_harvest_trains_bit_identical_weights(tiny_model_dir, text_corpus_dir, tmp_path, plain):
    """The next group is harvested in a background thread; the trainer stops early at its token budget."""
    summary, weights, out = run(tiny_model_dir, text_corpus_dir, tmp_path / "overlap", overlap_harvest=True)
    assert summary["tokens"] == 512
    assert all(torch.equal(weights[name], w) for name, w in plain[1].items())
    assert "overlap_harvest" not in json.loads((out / "run.json").read_text())["request"]["train"]
