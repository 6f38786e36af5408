"""Invariants every registered architecture keeps — built-ins and installed plugins alike.

The parameter list comes from the plugin manager, so a newly installed architecture is tested
here without anyone writing a test for it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae.checkpoint import load_sae, save_sae
from routesae.errors import RouteSAEError
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
        rows = n * sae.vectors_per_token  # one per token, or per token and block (the MLSAE)
        assert out.latents.shape == (rows, sae.cfg.latent_size)
        assert out.x_hat.shape == out.target.shape and out.target.shape[0] == rows and out.target.shape[-1] == D_MODEL
        assert out.pre is None or out.pre.shape == out.latents.shape
        torch.testing.assert_close(sae.encode_standardized(out.target), out.latents)
        torch.testing.assert_close(sae.decode_standardized(out.latents), out.x_hat)


@pytest.mark.parametrize("name", ARCHITECTURES)
@given(n=st.integers(1, 24), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_encode_and_decode_take_and_give_raw_residuals(name, n, seed):
    """What a SAELens user does with hook activations: ``encode(raw)`` is ``forward``'s latents, and ``decode`` of
    them with the raw input is ``forward``'s x̂ in residual-stream units (at each token's routed block, for a
    routed SAE)."""
    sae = build(name).eval()
    raw = activations(sae, n, seed)
    with torch.no_grad():
        out = sae(raw)
        assert torch.equal(sae.encode(raw), out.latents)
        decoded = sae.decode(out.latents, raw)
        routed = sae.routed_blocks(out)
        if len(sae.layers) == 1:
            assert torch.equal(sae.encode(raw[:, 0]), out.latents), "an SAE on one block also takes [N, D]"
            x_hat = out.x_hat[:, None]
        elif routed is not None:  # a routed SAE: x̂ at each token's block, in that block's units
            x_hat = torch.zeros_like(raw).scatter(1, torch.searchsorted(torch.tensor(sae.layers), routed)[:, None, None]
                                                  .expand(-1, 1, D_MODEL), out.x_hat[:, None])
        else:  # every block: a crosscoder's [N, L, D], an MLSAE's [N·L, D] token-major
            x_hat = out.x_hat.view(n, len(sae.layers), D_MODEL)
        in_units = x_hat if out.norm is None else out.norm.undo(x_hat)
        if routed is not None and len(sae.layers) > 1:
            in_units = in_units[torch.arange(n), torch.searchsorted(torch.tensor(sae.layers), routed)]
        torch.testing.assert_close(decoded, in_units[:, 0] if len(sae.layers) == 1 else in_units)
        edited = out.latents.clone()
        edited[:, 0] += 1.0
        assert not torch.allclose(sae.decode(edited, raw), decoded), "decode reads the latents it is given"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_raw_activations_of_the_wrong_shape_are_refused(name):
    sae = build(name).eval()
    with pytest.raises(RouteSAEError, match=f"reads {len(sae.layers)} block"):
        sae.encode(torch.zeros(3, len(sae.layers) + 1, D_MODEL))


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
