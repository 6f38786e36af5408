"""The JumpReLU SAE: activation rule, the straight-through threshold gradients, the L0 term, training, CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_training import low_rank, train_steps

from routesae.architectures.base import SAEOutput, normalized_mse, standardize
from routesae.architectures.jumprelu import JumpReLUConfig, JumpReLUSAE, jumprelu, step
from routesae.checkpoint import load_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError

D, F = 16, 64


def make(seed=0, latent_size=F, **kw):
    torch.manual_seed(seed)
    return JumpReLUSAE(JumpReLUConfig(latent_size=latent_size, layer=0, **kw), D)


def with_thresholds(sae, theta):
    with torch.no_grad():
        sae.log_threshold.copy_(torch.as_tensor(theta, dtype=sae.log_threshold.dtype).log())
    return sae


def output_for(pre):
    """An SAEOutput whose reconstruction does not depend on the latents, to isolate the L0 term."""
    return lambda sae: SAEOutput(
        latents=sae.activation(pre), x_hat=torch.ones(len(pre), D), target=torch.ones(len(pre), D), pre=pre
    )


def test_thresholds_are_log_parametrised_and_start_at_threshold_init():
    sae = make(threshold_init=0.25)
    torch.testing.assert_close(sae.threshold, torch.full((F,), 0.25))
    assert set(dict(sae.named_parameters())) == {"W_enc", "W_dec", "b_enc", "b_dec", "log_threshold"}


@given(st.integers(0, 2**16), st.floats(1e-3, 2.0))
@settings(max_examples=25, deadline=None)
def test_latents_are_the_preactivation_above_the_threshold_and_zero_elsewhere(seed, theta):
    sae = with_thresholds(make(seed=seed), torch.rand(F, generator=torch.Generator().manual_seed(seed)) * theta)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(seed))
    pre, z = sae.preactivations(x), sae.encode_standardized(x)
    above = pre > sae.threshold
    assert (z >= 0).all()
    assert (z[~above] == 0).all()
    assert torch.equal(z[above], pre[above])


def test_forward_is_encode_then_decode_of_the_standardized_input():
    sae = with_thresholds(make(), torch.full((F,), 0.2))
    acts = torch.randn(20, 1, D) * 4 + 1
    out = sae(acts)
    x = standardize(acts, "token")[0][:, 0]
    torch.testing.assert_close(out.latents, sae.encode_standardized(x))
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(out.latents))
    torch.testing.assert_close(out.pre, sae.preactivations(x))


def test_threshold_gradient_on_a_hand_built_example():
    """θ = [0.5, 1.0], ε = 0.1: only pre-activations within ε/2 of θ carry the pseudo-derivative −(θ/ε)·g."""
    sae = with_thresholds(make(latent_size=2, bandwidth=0.1), [0.5, 1.0])
    pre = torch.tensor([[0.52, 0.70], [0.47, 1.04], [0.20, 0.94]])  # in window: (0,0) (1,0) (1,1)
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # upstream gradient g of each entry
    (sae.activation(pre) * weight).sum().backward()
    d_theta = torch.tensor([-(0.5 / 0.1) * (1.0 + 3.0), -(1.0 / 0.1) * 4.0])
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * torch.tensor([0.5, 1.0]))  # chain rule: dθ/dlogθ = θ


def test_threshold_gets_no_gradient_from_tokens_outside_the_window():
    sae = with_thresholds(make(latent_size=3, bandwidth=0.1), [0.5, 0.5, 0.5])
    pre = torch.tensor([[0.2, 0.9, 0.53], [-1.0, 0.56, 0.3]], requires_grad=True)
    z = sae.activation(pre)
    z.pow(2).sum().backward()
    assert sae.log_threshold.grad[:2].eq(0).all() and sae.log_threshold.grad[2] != 0
    torch.testing.assert_close(pre.grad, 2 * z * (pre > 0.5))  # ∂z/∂a = 1[a > θ]


@pytest.mark.parametrize(("fn", "scale"), [(step, lambda theta: 1.0), (jumprelu, lambda theta: theta)])
def test_pseudo_derivative_estimates_the_derivative_of_the_expectation(fn, scale):
    """For a ~ N(0, 1): d/dθ E[1(a>θ)] = −φ(θ) and d/dθ E[a·1(a>θ)] = −θ·φ(θ); the kernel estimate agrees."""
    theta, eps = 0.5, 0.05
    a = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    threshold = torch.tensor([theta], dtype=torch.float64, requires_grad=True)
    fn(a, threshold, eps).mean().backward()
    density = math.exp(-(theta**2) / 2) / math.sqrt(2 * math.pi)
    assert threshold.grad.item() == pytest.approx(-scale(theta) * density, abs=0.02)


def test_l0_term_on_pre_versus_post_activations():
    """Same value; the published term's window is |a − θ| < ε/2, the reference's is |z − θ| < ε/2 on z = JumpReLU(a)."""
    theta, eps, coef = [0.5, 0.02], 0.1, 0.3
    pre = torch.tensor([[0.47, -3.0], [0.53, 0.06], [0.9, -1.0]])
    counts = {"published": [2.0, 1.0], "reference": [1.0, 3.0]}  # tokens in each latent's window
    for variant, count in counts.items():
        sae = with_thresholds(make(latent_size=2, bandwidth=eps, l0=coef, variant=variant), theta)
        loss, terms = sae.loss(output_for(pre)(sae))
        torch.testing.assert_close(terms["sparsity"], torch.tensor(coef * 1.0))  # mean active latents: (0+2+1)/3
        assert terms["l0"] == 1.0
        loss.backward()
        expected = -coef / len(pre) / eps * torch.tensor(count) * torch.tensor(theta)
        torch.testing.assert_close(sae.log_threshold.grad, expected, msg=variant)


def test_l0_term_gives_no_gradient_to_the_encoder():
    sae = with_thresholds(make(l0=1.0), torch.full((F,), 0.1))
    out = sae(torch.randn(40, 1, D))
    loss, terms = sae.loss(out)
    torch.testing.assert_close(loss, terms["nmse"] + terms["sparsity"])
    from_loss = torch.autograd.grad(loss, [sae.W_enc, sae.b_enc], retain_graph=True)
    from_nmse = torch.autograd.grad(normalized_mse(out.x_hat, out.target), [sae.W_enc, sae.b_enc])
    for a, b in zip(from_loss, from_nmse):
        torch.testing.assert_close(a, b)


def test_gradients_are_finite_and_reach_every_parameter():
    sae = with_thresholds(make(bandwidth=0.2), torch.full((F,), 0.3))
    sae.loss(sae(torch.randn(64, 1, D)))[0].backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"l0": -1.0}, "l0 must be a finite number >= 0"),
        ({"bandwidth": 0.0}, "bandwidth must be a finite number > 0"),
        ({"threshold_init": -0.1}, "threshold_init must be a finite number > 0"),
        ({"threshold_init": float("nan")}, "threshold_init must be a finite number > 0"),
        ({"variant": "paper"}, "variant='paper' is not one of 'published', 'reference'"),
    ],
)
def test_bad_settings_are_config_errors(settings_, message):
    with pytest.raises(ConfigError, match=message):
        JumpReLUConfig.from_dict(settings_)


@given(st.floats(0, 1), st.floats(1e-4, 1), st.floats(1e-4, 1), st.sampled_from(["published", "reference"]))
def test_config_round_trips_through_json(l0, bandwidth, threshold_init, variant):
    cfg = JumpReLUConfig(l0=l0, bandwidth=bandwidth, threshold_init=threshold_init, variant=variant, layer=1)
    assert JumpReLUConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("variant", ["published", "reference"])
def test_training_lowers_the_loss_and_sparsifies(variant):
    # θ and ε scaled to standardised inputs (pre-activations of order 1); see the module docstring.
    sae = make(l0=1e-2, threshold_init=0.5, bandwidth=0.1, variant=variant)
    losses, terms = train_steps(sae, low_rank(256, D))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert terms["nmse"] < 0.3
    assert 1 <= terms["l0"] <= F / 4, terms
    assert (sae.threshold != 0.5).any()


def test_trains_through_the_cli_and_loads_back(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "jumprelu",
            "--l0", "0.01", "--threshold-init", "0.2", "--bandwidth", "0.05", "--latent-size", "64", "--layer", "2",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--tokens", "640", "--log-every", "2", "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)["saes"]
    assert summary["name"] == "jumprelu-L2-F64" and {"nmse", "sparsity", "l0"} <= set(summary["final"])
    sae, config = load_sae(out / "jumprelu-L2-F64")
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.threshold_init == 0.2 and config["training"]["finished"]
    assert (sae.threshold > 0).all() and (sae.threshold != 0.2).any()
    x = torch.randn(8, 1, 64)
    out_ = sae(x)
    assert ((out_.latents == 0) | (out_.latents > sae.threshold)).all()
