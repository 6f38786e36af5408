"""The MLSAE baseline (issue 14): one TopK dictionary over every block of a range, evaluated one block at a time."""

import json

import pytest
import torch
from click.testing import CliRunner

from routesae import load_sae
from routesae.architectures.base import standardize
from routesae.architectures.mlsae import MLSAE
from routesae.architectures.topk import TopKSAE
from routesae.cli import make_cli

D, LATENTS, K = 16, 64, 4


def build(first=1, last=3, **settings):
    cfg = MLSAE.build_config({"layers": f"{first}:{last}", "latent_size": LATENTS, "k": K, **settings}).resolve(6)
    torch.manual_seed(0)
    return MLSAE(cfg, D)


def acts(n, n_layers):
    return torch.randn(n, n_layers, D, generator=torch.Generator().manual_seed(0)) * torch.linspace(1, 4, n_layers)[:, None]


def test_every_token_and_block_is_one_vector_of_the_loss():
    sae, raw = build(), acts(30, 3)
    out = sae(raw)
    assert out.latents.shape == (90, LATENTS) and out.x_hat.shape == (90, D)
    assert torch.equal((out.latents != 0).sum(-1), torch.full((90,), K)), "k per (token, block) vector"
    x, _ = standardize(raw, "token")
    torch.testing.assert_close(out.target, x.reshape(90, D), msg="token-major: row 3n + l is token n at block l")
    loss, terms = sae.loss(out)
    per_vector = ((out.x_hat - out.target) ** 2).mean(-1) / (out.target**2).mean(-1)
    torch.testing.assert_close(terms["nmse"], per_vector.mean().detach())
    assert terms["l0"] == K
    loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_each_splice_view_is_the_topk_sae_on_its_block_with_the_same_weights():
    sae, raw = build(), acts(20, 3)
    views = sae.splice_views()
    assert list(views) == [1, 2, 3]
    out = sae(raw)
    z_NLF, reconstruction = out.latents.view(20, 3, LATENTS), sae.reconstruction(out)
    for i, (block, view) in enumerate(views.items()):
        assert isinstance(view, TopKSAE) and view.layers == (block,)
        assert view.W_enc is sae.W_enc and view.W_dec is sae.W_dec and view.b_dec is sae.b_dec
        view_out = view(raw[:, i : i + 1])
        torch.testing.assert_close(view_out.latents, z_NLF[:, i])
        torch.testing.assert_close(view.reconstruction(view_out)[block][0], reconstruction[block][0])
    with torch.no_grad():
        sae.b_dec += 1.0
    assert torch.equal(views[2].b_dec, sae.b_dec), "a view follows the MLSAE's training"


def test_the_name_says_range_and_k():
    assert build().cfg.name_parts() == ["L1-3", f"k{K}", f"F{LATENTS}"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlsae") / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--k", "4", "--latent-size", "64",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--tokens", "512", "--arch", "mlsae", "--layers", "0:2", "--report", "jsonl", "--out", str(out)]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (sae_dir,) = [p for p in out.iterdir() if p.name.startswith("mlsae-")]
    return sae_dir


def test_it_trains_and_evaluates_per_block_with_the_mean_as_its_metrics(trained):
    result = CliRunner().invoke(make_cli(), ["evaluate", str(trained), "--tokens", "128", "--metric", "kldiv",
                                             "--metric", "normmse", "--metric", "l0"])
    assert result.exit_code == 0, result.output
    record = json.loads((trained / "eval.json").read_text())
    assert record["architecture"] == "mlsae" and sorted(record["per_block"]) == ["0", "1", "2"]
    for name in ("kldiv", "normmse", "l0"):
        per_block = [record["per_block"][b][name] for b in ("0", "1", "2")]
        assert record["metrics"][name] == pytest.approx(sum(per_block) / 3)
    assert record["metrics"]["l0"] == pytest.approx(4.0)
    assert len({record["per_block"][b]["kldiv"] for b in ("0", "1", "2")}) == 3, "each block is spliced on its own"
    sae, config = load_sae(trained)
    assert isinstance(sae, MLSAE) and config["config"]["layers"] == "0:2"


def test_contexts_refuse_it_with_what_to_do_instead(trained):
    result = CliRunner().invoke(make_cli(), ["contexts", str(trained), "--threshold", "0.5"])
    assert result.exit_code == 2
    assert "one activation per token and block" in result.output and "evaluate it (per block)" in result.output
    assert not (trained / "contexts.json").exists()


def test_steering_clamps_the_latent_at_every_block(trained):
    result = CliRunner().invoke(make_cli(), ["steer", str(trained), "--clamp", "3=+5", "--prompt", "The fox",
                                             "--max-new-tokens", "2", "--no-chat", "--scale-tokens", "0", "--json"])
    assert result.exit_code == 0, result.output
    sae, _ = load_sae(trained)
    raw = torch.randn(5, 3, 16 * 4)
    with torch.no_grad(), sae.edit_latents(lambda z: z.index_fill(1, torch.tensor([3]), 5.0)):
        out = sae(raw)
        reconstruction = sae.reconstruction(out)
    assert (out.latents[:, 3] == 5.0).all() and sorted(reconstruction) == [0, 1, 2], "clamped in every (token, block) row"
