"""Routers and layer aggregations: the two pluggable steps in front of a routed SAE.

A routed architecture (RouteSAE) reads L standardised layers per token, handed over as
:class:`~routesae.architectures.base.StandardizedLayers` (weighted sums over layers and one
layer per token, computed without a standardised ``[N, L, D]`` copy; ``materialize()`` gives
the full tensor to routers that need it). An :class:`Aggregation` pools them into the
router's input ``v_ND``; a linear map and a softmax over layers give ``probs_NL``; a
:class:`Router` turns (layers, p) into the vector the inner SAE sees. Routers are registered
through the ``register_routers`` hook, aggregations through ``register_aggregations``, and both
are looked up by name.

Register instances: routers and aggregations hold no state, and ``__call__`` of an
aggregation is its pooling, not a constructor.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import StandardizedLayers


class Routing(NamedTuple):
    """What a router decided for each token."""

    x_route_ND: Tensor  #: the inner SAE's input (and reconstruction target) during training
    layer_weights_NL: Tensor  #: weight of each layer in x_route: one-hot (hard) or p (soft); routing counts add these
    chosen_N: Tensor  #: argmax layer (index into the routed range); where the token is spliced back


class Router:
    """Turns per-layer inputs and routing probabilities into one vector per token.

    ``single_block``: whether ``x_route`` is always one block's activation (scaled or not), so a
    token's latents describe that block alone (``chosen_N``) and steering a latent acts on one
    block; a router that mixes blocks (``soft``) says False.
    """

    name: ClassVar[str] = ""
    single_block: ClassVar[bool] = False

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<router {self.name}>"


class Aggregation:
    """Pools the L layers of a token into the router's input."""

    name: ClassVar[str] = ""

    def __call__(self, layers: StandardizedLayers) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<aggregation {self.name}>"


class HardRouter(Router):
    """The paper's default (eqs 8-9): x_route = p_{i*} · x_{i*} with i* = argmax_l p_l.

    Scaling by p_{i*} is what lets the loss reach the router at all ("to keep it
    differentiable"): argmax itself has no gradient.
    """

    name = "hard"
    single_block = True

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        p_max_N, chosen_N = probs_NL.max(-1)
        x_chosen_ND = layers.select(chosen_N)
        one_hot_NL = F.one_hot(chosen_N, probs_NL.shape[-1]).to(probs_NL.dtype)
        return Routing(p_max_N[:, None] * x_chosen_ND, one_hot_NL, chosen_N)


class SoftRouter(Router):
    """Appendix B, eq. 14: x_route = Σ_l p_l x_l (the paper found "no clear benefit")."""

    name = "soft"

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        x_route_ND = layers.weighted_sum(probs_NL)
        return Routing(x_route_ND, probs_NL, probs_NL.argmax(-1))


class SumAggregation(Aggregation):
    """v = Σ_l x_l, the paper's sum pooling (eq. 5) and the reference's default."""

    name = "sum"

    def __call__(self, layers: StandardizedLayers) -> Tensor:
        return layers.weighted_sum(layers.raw_NLD.new_ones(layers.raw_NLD.shape[:2]))


class MeanAggregation(Aggregation):
    """v = (1/L) Σ_l x_l: the router logits are the sum's divided by L (a softer softmax)."""

    name = "mean"

    def __call__(self, layers: StandardizedLayers) -> Tensor:
        return layers.weighted_sum(layers.raw_NLD.new_full(layers.raw_NLD.shape[:2], 1 / layers.n_layers))
