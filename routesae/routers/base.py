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
aggregation is its pooling, not a constructor. Their settings are a ``Config`` dataclass of
:func:`~routesae.config.setting` fields, like an architecture's: RouteSAE offers them as its own
settings (``route_K`` for a router's field ``K``, ``aggregate_K`` for an aggregation's), stores them
in its config and uses :meth:`Router.configured` — a copy of the registered instance with those
settings as ``cfg`` — so the registered instance itself never changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Self

import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import StandardizedLayers
from routesae.config import Config
from routesae.errors import PluginError


class Routing(NamedTuple):
    """What a router decided for each of N tokens over the L routed layers (indices 0..L-1 of the routed range)."""

    x_route_ND: Tensor
    """``[N, D]``: the vector the inner SAE encodes in training, and its reconstruction target."""
    layer_weights_NL: Tensor
    """``[N, L]``, non-negative, each row summing to 1: how much of the token went to each layer (one-hot for
    ``hard``, p for ``soft``). RouteSAE adds them up over training as the routing counts (the paper's histogram)."""
    chosen_N: Tensor
    """``[N]`` long: the layer the token is spliced back at and its latents are attributed to (contexts, steering);
    the largest of ``layer_weights_NL``, or the one layer ``x_route_ND`` came from for a single-block router."""


@dataclass
class RouterConfig(Config):
    """Settings every router has (none); a router with settings subclasses it with :func:`~routesae.config.setting` fields."""


@dataclass
class AggregationConfig(Config):
    """Settings every aggregation has (none); subclass it like :class:`RouterConfig`."""


class Configurable:
    """A registered strategy with settings: the registered instance holds the defaults, :meth:`configured` copies."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    cfg: Config

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    def configured(self, cfg: Config) -> Self:
        """A copy of this instance that uses ``cfg`` (an instance of ``Config``); the registered one is left as it is."""
        clone = copy.copy(self)
        clone.cfg = cfg
        return clone

    @classmethod
    def _check_config(cls, base: type[Config]) -> None:
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, base)):
            raise PluginError(f"{cls.__qualname__}.Config must subclass routesae.{base.__name__}")


class Router(Configurable):
    """Turns per-layer inputs and routing probabilities into one vector per token.

    ``single_block``: whether ``x_route`` is always one block's activation (scaled or not), so a
    token's latents describe that block alone (``chosen_N``) and steering a latent acts on one
    block; a router that mixes blocks (``soft``) says False. It may be a property that reads
    ``self.cfg`` (a top-k router with k = 1 sends each token to one block).
    """

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    single_block: ClassVar[bool] = False

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        """The :class:`Routing` of N tokens from their L standardised layers and the router's softmax ``probs_NL``."""
        raise NotImplementedError

    @classmethod
    def check_contract(cls) -> None:
        """Called at registration, so that a router with unusable settings fails when its plugin loads."""
        cls._check_config(RouterConfig)

    def __repr__(self) -> str:
        return f"<router {self.name}>"


class Aggregation(Configurable):
    """Pools the L layers of a token into the router's input ``v_ND`` (the router's logits are W_r v)."""

    Config: ClassVar[type[AggregationConfig]] = AggregationConfig

    def __call__(self, layers: StandardizedLayers) -> Tensor:
        raise NotImplementedError

    @classmethod
    def check_contract(cls) -> None:
        """Called at registration, like :meth:`Router.check_contract`."""
        cls._check_config(AggregationConfig)

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
