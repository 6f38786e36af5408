"""Routers and aggregations: exact routing rules, registration through the plugin hook, third-party routers."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from routesae.architectures.base import StandardizedLayers, standardize
from routesae.architectures.routesae import RouteSAE, RouteSAEConfig
from routesae.errors import ConfigError
from routesae.hookspecs import hookimpl
from routesae.plugins import PluginManager, get_plugin_manager
from routesae.routers import Aggregation, HardRouter, MeanAggregation, Router, Routing, SoftRouter, SumAggregation

shapes = st.tuples(st.integers(1, 40), st.integers(1, 9), st.integers(1, 24), st.integers(0, 2**31 - 1))


def inputs(n, n_layers, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_layers, d, generator=g, dtype=torch.float64)
    probs = (torch.randn(n, n_layers, generator=g, dtype=torch.float64) * 3).softmax(-1)
    return x, probs


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(["token", "none"]))
def test_standardized_layers_agree_with_the_materialised_standardisation(shape, mode):
    """Routers see the layers lazily; every view must equal what ``standardize`` materialises."""
    n, n_layers, d, seed = shape
    assume(d > 1)  # the standard deviation of one number is undefined
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, n_layers, d, generator=g, dtype=torch.float64) * 30 + 5  # residual-like scale and offset
    x, norm = standardize(raw, mode)
    layers = StandardizedLayers(raw, mode)
    assert torch.equal(layers.materialize(), x)
    assert (layers.norm is None) == (norm is None)
    index = torch.randint(0, n_layers, (n,), generator=g)
    assert torch.equal(layers.select(index), x[torch.arange(n), index]), "the rows a splice reads are bit-identical"
    weights = torch.randn(n, n_layers, generator=g, dtype=torch.float64, requires_grad=True)
    mixed = layers.weighted_sum(weights)
    torch.testing.assert_close(mixed, torch.einsum("nl,nld->nd", weights, x))
    (grad,) = torch.autograd.grad(mixed.square().sum(), weights)
    (expected,) = torch.autograd.grad(torch.einsum("nl,nld->nd", weights, x).square().sum(), weights)
    torch.testing.assert_close(grad, expected)


def test_standardized_layers_sum_in_full_precision_under_autocast():
    raw = torch.randn(8, 4, 16) * 50
    layers = StandardizedLayers(raw, "token")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layers.weighted_sum(torch.full((8, 4), 0.25))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, layers.materialize().mean(1))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_hard_routing_picks_one_layer_per_token_weighted_by_its_probability(shape):
    n, n_layers, d, seed = shape
    x, probs = inputs(n, n_layers, d, seed)
    routing = HardRouter().route(StandardizedLayers(x, "none"), probs)
    assert isinstance(routing, Routing)
    assert routing.layer_weights_NL.shape == (n, n_layers)
    assert ((routing.layer_weights_NL == 0) | (routing.layer_weights_NL == 1)).all()
    assert (routing.layer_weights_NL.sum(-1) == 1).all(), "exactly one layer per token"
    assert torch.equal(routing.layer_weights_NL.argmax(-1), routing.chosen_N)
    assert torch.equal(routing.chosen_N, probs.argmax(-1))
    p_chosen = probs.gather(1, routing.chosen_N[:, None])[:, 0]
    assert torch.equal(p_chosen, probs.max(-1).values), "the chosen layer's weight is the max softmax probability"
    expected = p_chosen[:, None] * x[torch.arange(n), routing.chosen_N]
    assert torch.equal(routing.x_route_ND, expected)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_soft_routing_is_the_probability_weighted_sum(shape):
    n, n_layers, d, seed = shape
    x, probs = inputs(n, n_layers, d, seed)
    routing = SoftRouter().route(StandardizedLayers(x, "none"), probs)
    assert torch.equal(routing.layer_weights_NL, probs)
    torch.testing.assert_close(routing.layer_weights_NL.sum(-1), torch.ones(n, dtype=torch.float64))
    expected = sum(probs[:, l, None] * x[:, l] for l in range(n_layers))
    torch.testing.assert_close(routing.x_route_ND, expected)
    assert torch.equal(routing.chosen_N, probs.argmax(-1))


def test_hard_routing_gradient_reaches_the_probabilities_only_through_the_chosen_one():
    x = torch.randn(5, 3, 4)
    logits = torch.randn(5, 3, requires_grad=True)
    probs = logits.softmax(-1)
    probs.retain_grad()
    HardRouter().route(StandardizedLayers(x, "none"), probs).x_route_ND.sum().backward()
    chosen = probs.argmax(-1)
    grad = probs.grad
    torch.testing.assert_close(grad[torch.arange(5), chosen], x[torch.arange(5), chosen].sum(-1))
    mask = torch.ones_like(grad, dtype=torch.bool)
    mask[torch.arange(5), chosen] = False
    assert (grad[mask] == 0).all()


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_sum_and_mean_differ_by_the_number_of_layers(shape):
    n, n_layers, d, seed = shape
    x, _ = inputs(n, n_layers, d, seed)
    v_sum, v_mean = SumAggregation()(StandardizedLayers(x, "none")), MeanAggregation()(StandardizedLayers(x, "none"))
    assert v_sum.shape == v_mean.shape == (n, d)
    torch.testing.assert_close(v_sum, x.sum(1))
    torch.testing.assert_close(v_sum, n_layers * v_mean)


def test_router_logits_scale_by_the_number_of_layers_between_sum_and_mean():
    acts = torch.randn(30, 5, 16) * 4 + 1
    saes = {}
    for aggregate in ("sum", "mean"):
        torch.manual_seed(0)
        saes[aggregate] = RouteSAE(RouteSAEConfig(layers="2:6", latent_size=32, aggregate=aggregate, inner_settings={"k": 4}), 16)
    assert torch.equal(saes["sum"].router.weight, saes["mean"].router.weight)
    logits = {a: s.router(s.aggregation(StandardizedLayers(acts, "token"))) for a, s in saes.items()}
    torch.testing.assert_close(logits["sum"], 5 * logits["mean"])
    probs = {a: s(acts).extras["router_probs"] for a, s in saes.items()}
    torch.testing.assert_close(probs["sum"], (5 * logits["mean"]).softmax(-1))
    # the argmax of a softmax does not depend on its temperature: both route every token alike
    assert torch.equal(probs["sum"].argmax(-1), probs["mean"].argmax(-1))


def test_builtins_register_through_the_routers_entry_point():
    pm = PluginManager()
    builtin = {
        kind: [n for n in pm.names(kind) if pm.provider(kind, n).distribution == "routesae"] for kind in ("router", "aggregation")
    }
    assert builtin == {"router": ["fixed", "hard", "random", "soft", "uniform"], "aggregation": ["mean", "sum"]}
    assert isinstance(pm.get("router", "hard"), HardRouter) and isinstance(pm.get("router", "soft"), SoftRouter)
    assert isinstance(pm.get("aggregation", "sum"), SumAggregation)
    assert isinstance(pm.get("aggregation", "mean"), MeanAggregation)
    provider = pm.provider("router", "hard")
    assert (provider.distribution, provider.name) == ("routesae", "routers")
    assert pm.infos["routers"].registered == {"router": ["fixed", "hard", "random", "soft", "uniform"],
                                              "aggregation": ["mean", "sum"]}


class FirstLayerRouter(Router):
    """Always the first routed layer, unscaled: a throwaway third-party router."""

    name = "first"

    def route(self, layers, probs_NL):
        chosen = torch.zeros(probs_NL.shape[0], dtype=torch.long)
        return Routing(layers.select(chosen), torch.nn.functional.one_hot(chosen, layers.n_layers).to(probs_NL.dtype), chosen)


class MaxAggregation(Aggregation):
    name = "max"

    def __call__(self, layers):
        return layers.materialize().amax(1)


class ExtraRouting:
    @hookimpl
    def register_routers(self, register):
        register(FirstLayerRouter())

    @hookimpl
    def register_aggregations(self, register):
        register(MaxAggregation())


def test_a_third_party_router_and_aggregation_plug_into_routesae():
    pm = get_plugin_manager()
    pm.register(ExtraRouting(), name="extra-routing")
    try:
        assert "first" in pm.names("router") and "max" in pm.names("aggregation")
        sae = RouteSAE(RouteSAEConfig(layers="0:2", latent_size=32, router="first", aggregate="max", inner_settings={"k": 3}), 8)
        acts = torch.randn(12, 3, 8)
        sae.train()
        out = sae(acts)
        assert (out.extras["chosen"] == 0).all()
        torch.testing.assert_close(out.target, standardize(acts, "token")[0][:, 0])
        assert list(sae.statistics()["routing_counts"].values()) == [12.0, 0.0, 0.0]
        recon = sae.reconstruction(out)
        assert recon[0][1].all() and not recon[1][1].any() and not recon[2][1].any()
    finally:
        pm.unregister("extra-routing")
    with pytest.raises(ConfigError, match="router='first' is not registered; installed routers: fixed, hard, random, soft"):
        RouteSAEConfig(router="first")
    with pytest.raises(ConfigError, match="aggregation='max' is not registered; installed aggregations: mean, sum"):
        RouteSAEConfig(aggregate="max")
