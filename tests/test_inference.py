"""Inference-time sparsity overrides (reference §3.8), for every registered architecture that supports them.

``--infer-k K`` gives exactly the top K pre-activations, signed; ``--theta θ`` keeps exactly the
pre-activations above θ; no override changes nothing; they go through ``forward`` and ``encode``
alike, and through the evaluator and its CLI.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_architecture_properties import ARCHITECTURES, LATENTS, activations, build
from test_evaluate import corpus, lm, save, topk  # noqa: F401 (fixtures)

from routesae.architectures.base import Inference
from routesae.architectures.routesae import RouteSAE
from routesae.cli import make_cli
from routesae.errors import ConfigError
from routesae.evaluate import evaluate
from routesae.plugins import get_plugin_manager

SUPPORTED = [name for name in ARCHITECTURES if build(name).supports_inference]


def preactivations(sae, target):
    """The pre-activations the override replaces the activation of (RouteSAE: its inner SAE's)."""
    encoder = sae.sae if isinstance(sae, RouteSAE) else sae
    return encoder.preactivations(target)


def run(sae, override, n, seed):
    """(output, pre-activations, encode(target)) under ``override``."""
    with torch.no_grad(), sae.inference(override):
        out = sae(activations(sae, n, seed))
        pre = preactivations(sae, out.target)
        torch.testing.assert_close(out.pre, pre)  # an override reads them all, so every path gives them
        return out, pre, sae.encode_standardized(out.target)


def test_gated_is_the_only_builtin_without_overrides():
    assert {"topk", "vanilla", "jumprelu", "routesae", "crosscoder"} <= set(SUPPORTED)
    assert "gated" not in SUPPORTED


@pytest.mark.parametrize("name", SUPPORTED)
@given(k=st.integers(1, LATENTS), n=st.integers(1, 16), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_infer_k_keeps_exactly_the_top_k_signed_preactivations(name, k, n, seed):
    sae = build(name).eval()
    out, pre, encoded = run(sae, Inference(k=k), n, seed)
    assert ((out.latents != 0).sum(-1) == k).all()
    top = pre.topk(k, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(out.latents, expected, rtol=0, atol=0)
    torch.testing.assert_close(encoded, out.latents)  # the crosscoder's encode re-standardises: not bit-exact
    torch.testing.assert_close(sae.decode_standardized(out.latents), out.x_hat)


@pytest.mark.parametrize("name", SUPPORTED)
@given(theta=st.floats(-2, 2), n=st.integers(1, 16), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_theta_keeps_exactly_the_preactivations_above_it(name, theta, n, seed):
    sae = build(name).eval()
    out, pre, encoded = run(sae, Inference(theta=theta), n, seed)
    assert torch.equal(out.latents == 0, pre <= theta)
    assert torch.equal(out.latents, torch.where(pre > theta, pre, 0.0))
    torch.testing.assert_close(encoded, out.latents)
    torch.testing.assert_close(sae.decode_standardized(out.latents), out.x_hat)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("train", [False, True])
def test_no_override_changes_nothing_and_the_override_ends_with_its_block(name, train):
    sae = build(name).train(train)
    acts = activations(sae, 12)
    torch.manual_seed(0)
    before = sae(acts)
    with sae.inference(Inference()):
        torch.manual_seed(0)
        during = sae(acts)
    if sae.supports_inference:
        with sae.inference(Inference(k=1)):
            assert ((sae(acts).latents != 0).sum(-1) == 1).all()
    torch.manual_seed(0)
    after = sae(acts)
    for out in (during, after):
        assert torch.equal(out.latents, before.latents) and torch.equal(out.x_hat, before.x_hat)


@pytest.mark.parametrize("name", sorted(set(ARCHITECTURES) - set(SUPPORTED)))
def test_unsupported_architectures_refuse_overrides(name):
    sae = build(name)
    for override in (Inference(k=4), Inference(theta=0.0)):
        with pytest.raises(ConfigError, match="does not support"), sae.inference(override):
            pass


def test_a_routesae_refuses_overrides_if_its_inner_sae_does():
    routesae = RouteSAE(RouteSAE.build_config({"latent_size": LATENTS, "inner": "gated"}).resolve(6), 16)
    with pytest.raises(ConfigError, match="gated does not support"), routesae.inference(Inference(k=4)):
        pass


@pytest.mark.parametrize(
    ("k", "theta", "message"),
    [(4, 0.5, "exclude each other"), (0, None, "positive"), (-3, None, "positive"), (True, None, "positive"),
     (None, float("nan"), "finite"), (None, float("inf"), "finite")],
)
def test_bad_overrides_are_config_errors(k, theta, message):
    with pytest.raises(ConfigError, match=message):
        Inference(k=k, theta=theta)


def test_infer_k_above_the_latent_size_is_an_error():
    sae = build("topk")
    with pytest.raises(ConfigError, match="exceeds"), sae.inference(Inference(k=LATENTS + 1)):
        pass


@pytest.mark.parametrize("arch", ["topk", "routesae"])
def test_evaluate_with_infer_k_measures_l0_k(lm, save, arch):  # noqa: F811
    sae = topk(2) if arch == "topk" else RouteSAE(RouteSAE.build_config({"latent_size": 64, "k": 4}).resolve(4), 64)
    directory = save(sae, arch)
    trained = evaluate(directory, ["l0", "normmse"], tokens=100, lm=lm)[str(directory)]
    record = evaluate(directory, ["l0", "normmse"], tokens=100, infer_k=9, lm=lm)[str(directory)]
    assert trained["metrics"]["l0"] == pytest.approx(4) and record["metrics"]["l0"] == pytest.approx(9)
    assert record["metrics"]["normmse"] != trained["metrics"]["normmse"]
    assert record["settings"]["infer_k"] == 9 and record["settings"]["theta"] is None
    assert json.loads((directory / "eval.json").read_text())["settings"]["infer_k"] == 9


def test_cli_passes_overrides_and_refuses_both(save):  # noqa: F811
    directory = save(topk(2), "topk")
    cli = ["evaluate", str(directory), "--metric", "l0", "--tokens", "100", "--json"]
    result = CliRunner().invoke(make_cli(), [*cli, "--theta", "1e9"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)[str(directory)]
    assert record["metrics"]["l0"] == 0 and record["settings"]["theta"] == 1e9
    both = CliRunner().invoke(make_cli(), [*cli, "--infer-k", "8", "--theta", "0.5"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_evaluate_refuses_an_override_a_gated_sae_cannot_take(lm, save):  # noqa: F811
    cls = get_plugin_manager().get("architecture", "gated")
    directory = save(cls(cls.build_config({"latent_size": 64}).resolve(4), 64), "gated")
    with pytest.raises(ConfigError, match="gated does not support"):
        evaluate(directory, ["l0"], tokens=100, infer_k=8, lm=lm)
    assert not (directory / "eval.json").exists()
