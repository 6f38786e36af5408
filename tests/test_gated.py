"""The Gated SAE: the gate rule, the published loss (frozen-decoder auxiliary term) and the reference variant."""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_training import low_rank, train_steps

from routesae.architectures.base import normalized_mse, standardize
from routesae.architectures.gated import GatedConfig, GatedSAE
from routesae.checkpoint import load_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError

D, F = 16, 64


def make(variant="published", l1=1.0, seed=0, **kw):
    torch.manual_seed(seed)
    return GatedSAE(GatedConfig(variant=variant, l1=l1, latent_size=F, layer=0, **kw), D)


def perturbed(sae, seed):
    """Give the biases and r_mag non-trivial values so the two paths differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.b_gate, sae.b_mag, sae.r_mag, sae.b_dec):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return sae


def test_parameters_are_the_published_ones():
    assert set(dict(make().named_parameters())) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
    sae = make()
    assert (sae.r_mag == 0).all() and (sae.b_gate == 0).all() and (sae.b_mag == 0).all()


@given(st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_a_latent_fires_exactly_where_the_gate_is_positive(seed):
    sae = perturbed(make(seed=seed), seed)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(seed))
    h = (x - sae.b_dec) @ sae.W_enc.T
    pi_gate, pi_mag = h + sae.b_gate, h * sae.r_mag.exp() + sae.b_mag
    z = sae.encode_standardized(x)
    assert (z >= 0).all()
    assert (z[pi_gate <= 0] == 0).all()
    torch.testing.assert_close(z[pi_gate > 0], pi_mag[pi_gate > 0].relu())
    torch.testing.assert_close(sae.preactivations(x), h)  # the shared pre-activation (SAEOutput.pre)
    torch.testing.assert_close(sae.gate(h), pi_gate)


def test_forward_is_encode_then_decode_of_the_standardized_input():
    sae = perturbed(make(), 1)
    acts = torch.randn(20, 1, D) * 5 - 2
    out = sae(acts)
    x = standardize(acts, "token")[0][:, 0]
    torch.testing.assert_close(out.pre, (x - sae.b_dec) @ sae.W_enc.T)  # h, shared by the gate and magnitude paths
    torch.testing.assert_close(out.latents, sae.encode_standardized(x))
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(out.latents))


def test_published_loss_terms():
    sae = perturbed(make(l1=2.0), 2)
    out = sae(torch.randn(40, 1, D))
    loss, terms = sae.loss(out)
    gate = sae.gate(out.pre).relu()
    torch.testing.assert_close(terms["l1"], 2.0 / F * gate.sum(-1).mean())
    torch.testing.assert_close(terms["aux"], normalized_mse(sae.decode_standardized(gate), out.target))
    torch.testing.assert_close(loss, terms["nmse"] + terms["l1"] + terms["aux"])


def test_frozen_decoder_term_gives_no_gradient_to_the_decoder_weights():
    sae = perturbed(make(), 3)
    out = sae(torch.randn(40, 1, D))
    loss, _ = sae.loss(out)
    nmse = normalized_mse(out.x_hat, out.target)
    gate = sae.gate(out.pre).relu()
    aux = normalized_mse(gate @ sae.W_dec + sae.b_dec, out.target)  # the same term, decoder NOT frozen
    (from_loss,) = torch.autograd.grad(loss, [sae.W_dec], retain_graph=True)
    (from_nmse,) = torch.autograd.grad(nmse, [sae.W_dec], retain_graph=True)
    (unfrozen,) = torch.autograd.grad(aux, [sae.W_dec], retain_graph=True)
    torch.testing.assert_close(from_loss, from_nmse)  # the L1 and the auxiliary term add nothing to W_dec
    assert unfrozen.abs().sum() > 0  # ... although the auxiliary term does depend on W_dec
    (gate_grad,) = torch.autograd.grad(loss, [sae.b_gate])
    assert gate_grad.abs().sum() > 0


def test_published_gate_learns_reference_gate_never_does():
    x = torch.randn(32, 1, D)
    published, reference = perturbed(make(), 4), perturbed(make("reference"), 4)
    for sae in (published, reference):
        sae.loss(sae(x))[0].backward()
        for name in ("W_enc", "W_dec", "b_dec", "b_mag", "r_mag"):
            grad = getattr(sae, name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (sae.cfg.variant, name)
    assert published.b_gate.grad is not None and published.b_gate.grad.abs().sum() > 0
    assert reference.b_gate.grad is None


def test_reference_loss_is_nmse_plus_l1_on_the_latents():
    sae = perturbed(make("reference", l1=2.0), 5)
    out = sae(torch.randn(40, 1, D))
    loss, terms = sae.loss(out)
    assert set(terms) == {"nmse", "l1", "l0"}
    torch.testing.assert_close(terms["l1"], 2.0 * out.latents.abs().mean())
    torch.testing.assert_close(loss, terms["nmse"] + terms["l1"])


def test_config_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="variant='paper' is not one of 'published', 'reference'"):
        GatedConfig.from_dict({"variant": "paper"})
    with pytest.raises(ConfigError, match="l1 must be a finite number >= 0"):
        GatedConfig(l1=-0.1)
    for variant in ("published", "reference"):
        cfg = GatedConfig(variant=variant, l1=0.25, latent_size=128, layer=3)
        assert GatedConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(("variant", "l1"), [("published", 10.0), ("reference", 3.0)])
def test_training_lowers_the_loss_and_sparsifies(variant, l1):
    sae = make(variant, l1=l1)
    losses, terms = train_steps(sae, low_rank(256, D))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert terms["nmse"] < 0.3
    assert 1 <= terms["l0"] <= F / 4, terms
    if variant == "reference":
        assert (sae.b_gate == 0).all(), "the reference never trains the gate bias"
    else:
        assert (sae.b_gate != 0).any()


def test_trains_through_the_cli_and_loads_back(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "gated",
            "--variant", "reference", "--latent-size", "64", "--layer", "2", "--batch-size", "4", "--context-length",
            "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256", "--tokens", "640", "--log-every", "2",
            "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)["saes"]
    assert summary["name"] == "gated-L2-F64" and {"nmse", "l1", "l0"} <= set(summary["final"])
    sae, config = load_sae(out / "gated-L2-F64")
    assert isinstance(sae, GatedSAE) and sae.cfg.variant == "reference" and config["training"]["finished"]
    assert (sae.b_gate == 0).all()
    z = sae(torch.randn(8, 1, 64)).latents
    assert (z >= 0).all() and torch.isfinite(z).all()
