"""The vanilla (ReLU) SAE: activation rule, the reference's L1 convention, training, CLI round trip."""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_training import low_rank, train_steps

from routesae.architectures.base import normalized_mse, standardize
from routesae.architectures.vanilla import VanillaConfig, VanillaSAE
from routesae.checkpoint import load_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError

D, F = 16, 64


def make(l1=3.0, latent_size=F, seed=0, **kw):
    torch.manual_seed(seed)
    return VanillaSAE(VanillaConfig(l1=l1, latent_size=latent_size, layer=0, **kw), D)


@given(st.integers(0, 2**16), st.floats(-2, 2))
@settings(max_examples=25, deadline=None)
def test_latents_are_relu_of_preactivations(seed, bias):
    sae = make(seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(seed))
    pre, z = sae.preactivations(x), sae.encode_standardized(x)
    assert (z >= 0).all()
    assert (z[pre <= 0] == 0).all()
    assert torch.equal(z[pre > 0], pre[pre > 0])


def test_forward_is_encode_then_decode_of_the_standardized_input():
    sae = make()
    acts = torch.randn(20, 1, D) * 7 + 3
    out = sae(acts)
    x = standardize(acts, "token")[0][:, 0]
    torch.testing.assert_close(out.target, x)
    torch.testing.assert_close(out.pre, sae.preactivations(x))
    torch.testing.assert_close(out.latents, sae.encode_standardized(x))
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(out.latents))


def test_l1_is_a_mean_over_all_token_latent_entries():
    sae = make(l1=2.0)
    out = sae(torch.randn(40, 1, D))
    loss, terms = sae.loss(out)
    per_token_weight = 2.0 / F  # the reference's convention
    expected_l1 = per_token_weight * out.latents.abs().sum(-1).mean()
    torch.testing.assert_close(terms["l1"], expected_l1)
    torch.testing.assert_close(terms["nmse"], normalized_mse(out.x_hat, out.target))
    torch.testing.assert_close(loss, terms["nmse"] + terms["l1"])
    assert terms["l0"] == (out.latents != 0).sum(-1).float().mean()


def test_gradients_are_finite_and_reach_every_parameter():
    sae = make()
    loss, _ = sae.loss(sae(torch.randn(32, 1, D)))
    loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("l1", [-1.0, float("nan"), float("inf")])
def test_bad_l1_is_a_config_error(l1):
    with pytest.raises(ConfigError, match="l1 must be a finite number >= 0"):
        VanillaConfig(l1=l1)


def test_unknown_and_mistyped_settings_are_rejected():
    with pytest.raises(ConfigError, match="unknown setting.*lambda"):
        VanillaConfig.from_dict({"lambda": 0.1})
    with pytest.raises(ConfigError, match="l1 must be float"):
        VanillaConfig.from_dict({"l1": "0.1"})


@given(st.floats(0, 100), st.integers(1, 512), st.none() | st.integers(0, 40))
def test_config_round_trips_through_json(l1, latent_size, layer):
    cfg = VanillaConfig(l1=l1, latent_size=latent_size, layer=layer)
    assert VanillaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_lowers_the_loss_and_sparsifies():
    sae = make()
    losses, terms = train_steps(sae, low_rank(256, D))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert terms["nmse"] < 0.3
    assert 1 <= terms["l0"] <= F / 4, terms  # at init about half the latents fire on every token


def test_the_reference_example_l1_leaves_the_code_dense():
    """Why the default is not the reference's 0.01: with the mean over all entries it barely penalises anything."""
    _, terms = train_steps(make(l1=0.01), low_rank(256, D))
    assert terms["l0"] > F / 3 and terms["nmse"] < 0.01, terms


def test_trains_through_the_cli_and_loads_back(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "vanilla",
            "--l1", "0.5", "--latent-size", "64", "--layer", "2", "--batch-size", "4", "--context-length", "32",
            "--sae-batch-tokens", "64", "--buffer-tokens", "256", "--tokens", "640", "--log-every", "2",
            "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)["saes"]
    assert summary["name"] == "vanilla-L2-F64" and {"nmse", "l1", "l0"} <= set(summary["final"])
    sae, config = load_sae(out / "vanilla-L2-F64")
    assert isinstance(sae, VanillaSAE) and sae.cfg.l1 == 0.5 and config["training"]["finished"]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    z = sae(torch.randn(8, 1, 64)).latents
    assert (z >= 0).all() and torch.isfinite(z).all()
