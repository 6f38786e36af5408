"""Invariants every registered router and aggregation keeps, in every pairing — built-ins and installed plugins alike.

The parameter lists come from the plugin manager, as ``test_architecture_properties.py``'s do, so an installed
router or aggregation is held to the contract of docs/plugins.md without anyone writing a test for it.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae import StandardizedLayers
from routesae.architectures.routesae import RouteSAE
from routesae.checkpoint import load_sae, save_sae
from routesae.plugins import get_plugin_manager

D_MODEL, LATENTS = 16, 64
PAIRS = [(r, a) for r in get_plugin_manager().names("router") for a in get_plugin_manager().names("aggregation")]


def build(router, aggregate, n_layers=4, seed=0):
    cfg = RouteSAE.build_config(
        {"layers": f"0:{n_layers - 1}", "latent_size": LATENTS, "k": 4, "router": router, "aggregate": aggregate}
    )
    torch.manual_seed(seed)
    return RouteSAE(cfg.resolve(n_layers), D_MODEL)


def activations(n, n_layers, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(1, 8, n_layers)[:, None]  # layers of different norms, as a residual stream's
    return torch.randn(n, n_layers, D_MODEL, generator=generator) * scale + 0.5


def test_the_builtins_are_among_the_pairs():
    assert {("hard", "sum"), ("hard", "mean"), ("soft", "sum"), ("soft", "mean")} <= set(PAIRS)


@pytest.mark.parametrize(("router", "aggregate"), PAIRS)
@given(n=st.integers(1, 24), n_layers=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_routing_has_the_documented_shapes_and_meaning(router, aggregate, n, n_layers, seed):
    sae = build(router, aggregate, n_layers)
    layers = StandardizedLayers(activations(n, n_layers, seed), "token")
    with torch.no_grad():
        v_ND = sae.aggregation(layers)
        assert v_ND.shape == (n, D_MODEL) and torch.isfinite(v_ND).all()
        probs_NL = sae.router(v_ND).softmax(-1)
        routing = sae.routing_rule.route(layers, probs_NL)
    x_route_ND, weights_NL, chosen_N = routing
    assert x_route_ND.shape == (n, D_MODEL) and torch.isfinite(x_route_ND).all()
    assert weights_NL.shape == (n, n_layers) and (weights_NL >= 0).all()
    torch.testing.assert_close(weights_NL.sum(-1), torch.ones(n), msg="each token's layer weights sum to 1")
    assert chosen_N.shape == (n,) and chosen_N.dtype == torch.long
    assert ((chosen_N >= 0) & (chosen_N < n_layers)).all()
    rows = torch.arange(n)
    assert (weights_NL[rows, chosen_N] >= weights_NL.amax(-1) - 1e-6).all(), "the chosen layer has the largest weight"
    if sae.routing_rule.single_block:  # the routed vector is the chosen block's, scaled
        x_chosen_ND = layers.select(chosen_N)
        scale_N1 = (x_route_ND * x_chosen_ND).sum(-1, keepdim=True) / x_chosen_ND.pow(2).sum(-1, keepdim=True)
        torch.testing.assert_close(x_route_ND, scale_N1 * x_chosen_ND)


@pytest.mark.parametrize(("router", "aggregate"), PAIRS)
def test_training_through_the_pair_gives_finite_gradients_and_counts_every_token(router, aggregate):
    sae = build(router, aggregate).train()
    out = sae(activations(32, 4))
    loss, terms = sae.loss(out)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    loss.backward()
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(sae.routing_counts.sum(), torch.tensor(32.0, dtype=torch.float64))
    with torch.no_grad():
        recon = sae.eval().reconstruction(sae(activations(10, 4, seed=1)))
    assert sum(mask.long() for _, mask in recon.values()).eq(1).all(), "each token is spliced back exactly once"


@pytest.mark.parametrize(("router", "aggregate"), PAIRS)
def test_a_saved_pair_loads_with_its_settings_and_provenance(router, aggregate, tmp_path):
    sae = build(router, aggregate).train()
    sae(activations(32, 4))
    save_sae(sae, tmp_path / "sae", {})
    loaded, config = load_sae(tmp_path / "sae")
    assert loaded.routing_rule.cfg == sae.routing_rule.cfg and loaded.aggregation.cfg == sae.aggregation.cfg
    pm = get_plugin_manager()
    recorded = {(p["kind"], p["name"]): p["distribution"] for p in config["plugins"]}
    assert recorded[("router", router)] == pm.provider("router", router).distribution
    assert recorded[("aggregation", aggregate)] == pm.provider("aggregation", aggregate).distribution
    acts = activations(16, 4, seed=2)
    with torch.no_grad():
        a, b = sae.eval()(acts), loaded(acts)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.extras["chosen"], b.extras["chosen"])
    assert json.loads(json.dumps(config["config"])) == config["config"]
