"""Crosscoder: one-matmul encoder, per-layer decoders at unit norm, every layer reconstructed, save/load, CLI."""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae.architectures.base import STANDARDIZE_EPS, normalized_mse, standardize
from routesae.architectures.crosscoder import DEFAULT_L1, Crosscoder, CrosscoderConfig
from routesae.checkpoint import load_sae, save_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError

D = 16


def make(layers="1:3", latent_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    return Crosscoder(CrosscoderConfig(layers=layers, latent_size=latent_size, **kw), D)


def acts(n, n_layers=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_layers, D, generator=g) * torch.linspace(1, 20, n_layers)[:, None] + 3


def test_config_defaults_and_checks():
    assert CrosscoderConfig().l1 == DEFAULT_L1 and CrosscoderConfig().k == 0
    assert CrosscoderConfig(k=8).l1 == 0.0, "TopK crosscoders need no L1 unless asked"
    assert CrosscoderConfig(k=8, l1=0.5).l1 == 0.5
    assert CrosscoderConfig(l1=0.0).l1 == 0.0
    for bad, message in [({"l1": -1.0}, "l1 must be"), ({"k": -1}, "k must be 0"), ({"k": 64, "latent_size": 64}, "0 < k < latent size")]:
        with pytest.raises(ConfigError, match=message):
            CrosscoderConfig(**bad)
    assert CrosscoderConfig().resolve(16).layers == "3:11"
    assert CrosscoderConfig(latent_size=4096).resolve(30).name_parts() == ["L6-21", f"l1_{DEFAULT_L1:g}", "F4096"]
    assert CrosscoderConfig(latent_size=4096, k=32, layers="1:3").name_parts() == ["L1-3", "k32", "F4096"]
    cfg = CrosscoderConfig(layers="0:2", k=4, decoder_bias=True)
    assert CrosscoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 1000))
def test_encoder_is_the_sum_of_per_layer_encoders(n, n_layers, seed):
    sae = make(layers=f"0:{n_layers - 1}", seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(n, n_layers, D, generator=torch.Generator().manual_seed(seed))
    explicit = sum(x[:, l] @ sae.W_enc[:, l].T for l in range(n_layers)) + sae.b_enc
    torch.testing.assert_close(sae.preactivations(x), explicit)
    x_std = standardize(x, "token")[0]
    z = (sum(x_std[:, l] @ sae.W_enc[:, l].T for l in range(n_layers)) + sae.b_enc).relu()
    out = sae(x)
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.pre, sae.preactivations(x_std))
    torch.testing.assert_close(sae.encode(x), z)


def test_encoder_is_one_matmul_without_an_N_L_F_buffer():
    """Record every tensor autograd saves and every matmul-shaped op: none is [N, L, F]."""
    n, n_layers, latents = 7, 5, 11
    sae = Crosscoder(CrosscoderConfig(layers=f"0:{n_layers - 1}", latent_size=latents), D)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = sae(torch.randn(n, n_layers, D))
    sae.loss(out)[0].backward()
    assert saved and all(torch.Size(shape).numel() != n * n_layers * latents for shape in saved)
    assert (n, n_layers * D) in saved, "the encoder input is the flattened [N, L·D] matrix"


def test_every_layer_is_decoded_by_its_own_decoder_and_reconstructed():
    sae = make(decoder_bias=True)
    with torch.no_grad():
        sae.b_dec.normal_()
    a = acts(25)
    out = sae(a)
    x, _ = standardize(a, "token")
    torch.testing.assert_close(out.target, x)
    for layer in range(3):
        torch.testing.assert_close(out.x_hat[:, layer], out.latents @ sae.W_dec[:, layer] + sae.b_dec[layer])
    recon = sae.reconstruction(out)
    assert sorted(recon) == [1, 2, 3]
    for i, block in enumerate((1, 2, 3)):
        x_hat, mask = recon[block]
        assert mask.dtype == torch.bool and mask.shape == (25,) and mask.all()
        expected = out.x_hat[:, i] * (a[:, i].std(-1, keepdim=True) + STANDARDIZE_EPS) + a[:, i].mean(-1, keepdim=True)
        torch.testing.assert_close(x_hat, expected)
    assert "b_dec" not in make().state_dict() and make().b_dec is None


def test_loss_is_nmse_over_layers_plus_l1_over_all_entries():
    sae = make(l1=0.5)
    out = sae(acts(30))
    loss, terms = sae.loss(out)
    per_layer = torch.stack([normalized_mse(out.x_hat[:, l], out.target[:, l]) for l in range(3)])
    torch.testing.assert_close(terms["nmse"], per_layer.mean())
    torch.testing.assert_close(loss, per_layer.mean() + 0.5 * out.latents.abs().mean())
    torch.testing.assert_close(terms["l1"], 0.5 * out.latents.abs().mean())
    torch.testing.assert_close(terms["l0"], (out.latents != 0).sum(-1).float().mean())


def test_decoders_are_tied_at_init_and_unit_norm_per_layer():
    sae = make()
    assert sae.W_enc.shape == sae.W_dec.shape == (64, 3, D)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64, 3))
    torch.testing.assert_close(sae.W_dec, sae.W_enc / sae.W_enc.norm(dim=-1, keepdim=True))
    assert sae.W_enc.abs().max() <= 1 / D**0.5 and (sae.b_enc == 0).all()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 3, 1) * 5 + 0.1)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64, 3))
    sae.loss(sae(acts(20)))[0].backward()
    sae.remove_parallel_gradient()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(64, 3), atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", [1, 5])
def test_topk_crosscoder_keeps_k_non_negative_latents_and_its_sparse_decode_matches(k):
    sae = make(k=k)
    a = acts(40)
    out = sae(a)
    pre = sae.preactivations(out.target)
    torch.testing.assert_close(out.pre, pre)
    assert ((out.latents != 0).sum(-1) <= k).all() and (out.latents >= 0).all()
    assert ((out.latents != 0).sum(-1) == k).all(), "random data: the top k are positive"
    torch.testing.assert_close(out.latents.max(-1).values, pre.max(-1).values)
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(out.latents))
    out.x_hat.pow(2).sum().backward()
    sparse_grad = sae.W_dec.grad.clone()
    sae.zero_grad()
    sae.decode_standardized(sae.encode(a)).pow(2).sum().backward()
    torch.testing.assert_close(sparse_grad, sae.W_dec.grad)


@pytest.mark.parametrize("kw", [{}, {"k": 4, "decoder_bias": True}])
def test_save_and_load_give_identical_outputs(tmp_path, kw):
    sae = make(**kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_sae(sae, tmp_path / "cc", {"name": "cc"})
    loaded, _ = load_sae(tmp_path / "cc")
    assert type(loaded) is Crosscoder and loaded.cfg == sae.cfg
    a = acts(20, seed=5)
    with torch.no_grad():
        out, again = sae(a), loaded(a)
    assert torch.equal(out.latents, again.latents) and torch.equal(out.x_hat, again.x_hat)
    r1, r2 = sae.reconstruction(out), loaded.reconstruction(again)
    assert all(torch.equal(r1[b][0], r2[b][0]) for b in r1)


def test_wrong_number_of_layers_is_a_clear_error():
    with pytest.raises(ValueError, match=r"crosscoder reads 3 layers \[1, 2, 3\]"):
        make()(torch.randn(4, 2, D))


def test_train_crosscoder_through_the_cli_and_load_it(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "crosscoder",
            "--latent-size", "64", "--layers", "0:3", "--l1", "1.0", "--batch-size", "4", "--context-length", "32",
            "--sae-batch-tokens", "64", "--buffer-tokens", "256", "--tokens", "640", "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)["saes"]
    assert summary["name"] == "crosscoder-L0-3-l1_1-F64" and summary["layers"] == [0, 1, 2, 3]
    assert {"nmse", "l1", "l0"} <= set(summary["final"])
    sae, config = load_sae(out / summary["name"])
    assert isinstance(sae, Crosscoder) and sae.cfg.l1 == 1.0 and sae.cfg.k == 0
    assert config["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64, 4))
    with torch.no_grad():
        recon = sae.reconstruction(sae(torch.randn(6, 4, sae.d_model)))
    assert sorted(recon) == [0, 1, 2, 3] and all(mask.all() for _, mask in recon.values())
