"""Invariants every registered architecture keeps — built-ins and installed plugins alike.

The parameter list comes from the plugin manager, so a newly installed architecture is tested
here without anyone writing a test for it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae.checkpoint import load_sae, save_sae
from routesae.plugins import get_plugin_manager

N_LAYERS, D_MODEL, LATENTS = 6, 16, 64
ARCHITECTURES = get_plugin_manager().names("architecture")


def build(name, seed=0):
    arch = get_plugin_manager().get("architecture", name)
    cfg = arch.build_config({"latent_size": LATENTS}).resolve(N_LAYERS)
    torch.manual_seed(seed)
    return arch(cfg, D_MODEL)


def activations(sae, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(sae.layers), D_MODEL, generator=generator) * 3 + 0.5


def test_every_builtin_is_registered():
    assert {"topk", "vanilla", "gated", "jumprelu", "routesae", "crosscoder"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
@given(n=st.integers(1, 24), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_shapes_and_encode_decode_agree_with_forward(name, n, seed):
    sae = build(name).eval()
    with torch.no_grad():
        out = sae(activations(sae, n, seed))
        assert out.latents.shape == (n, sae.cfg.latent_size)
        assert out.x_hat.shape == out.target.shape and out.target.shape[0] == n and out.target.shape[-1] == D_MODEL
        assert out.pre is None or out.pre.shape == out.latents.shape
        torch.testing.assert_close(sae.encode(out.target), out.latents)
        torch.testing.assert_close(sae.decode(out.latents), out.x_hat)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_loss_and_gradients_are_finite(name):
    sae = build(name).train()
    out = sae(activations(sae, 32))
    loss, terms = sae.loss(out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    loss.backward()
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decoder_directions_are_unit_norm_after_renormalisation(name):
    sae = build(name)
    directions = sae.decoder_directions()
    assert directions, "an SAE must say which parameters hold its decoder directions"
    with torch.no_grad():
        for W in directions:
            W.mul_(torch.rand_like(W) * 3)
    sae.normalize_decoder()
    for W in directions:
        torch.testing.assert_close(W.norm(dim=-1), torch.ones(W.shape[:-1]))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reconstruction_targets_its_own_layers(name):
    sae = build(name).eval()
    acts = activations(sae, 10)
    with torch.no_grad():
        recon = sae.reconstruction(sae(acts))
    assert recon and set(recon) <= set(sae.layers)
    covered = torch.zeros(10, dtype=torch.long)
    for x_hat, mask in recon.values():
        assert x_hat.shape == (10, D_MODEL) and mask.dtype == torch.bool and mask.shape == (10,)
        covered += mask.long()
    assert (covered >= 1).all(), "every token is reconstructed somewhere"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_save_then_load_gives_identical_outputs(name, tmp_path):
    sae = build(name).train()
    sae(activations(sae, 32))  # let stateful architectures (thresholds, counters) update
    sae.after_step(0)
    save_sae(sae, tmp_path / name, {})
    loaded, config = load_sae(tmp_path / name)
    assert config["architecture"] == name and type(loaded) is type(sae)
    sae.eval()
    acts = activations(sae, 16, seed=1)
    with torch.no_grad():
        a, b = sae(acts), loaded(acts)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.x_hat, b.x_hat)
    assert sae.statistics() == loaded.statistics()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_removing_the_parallel_gradient_leaves_only_the_orthogonal_part(name):
    sae = build(name).train()
    sae.loss(sae(activations(sae, 32)))[0].backward()
    before = [W.grad.clone() for W in sae.decoder_directions()]
    sae.remove_parallel_gradient()
    for W, grad in zip(sae.decoder_directions(), before):
        parallel = (grad * W).sum(-1, keepdim=True) * W
        torch.testing.assert_close(W.grad, grad - parallel)
        torch.testing.assert_close((W.grad * W).sum(-1), torch.zeros(W.shape[:-1]), atol=1e-6, rtol=0)
