"""A router and an aggregation with settings, for RouteSAE (``--arch routesae --router top-layers --route-k 2``).

``top-layers`` sends each token the probability-weighted sum of its k most probable layers,
x_route = Σ_{l ∈ top-k(p)} p_l x_l: k = 1 is the paper's hard routing (p_{i*} x_{i*}) and k = L its soft
routing, so k interpolates between the two. ``trailing`` pools only the deepest n layers of the routed
range into the router's input, v = (1/n) Σ_{l > L-1-n} x_l.

Each reads its settings from ``self.cfg``, an instance of its ``Config``: RouteSAE offers a router's
fields as ``route_NAME`` and an aggregation's as ``aggregate_NAME`` (``--route-k``, ``--aggregate-n``),
records them in its config and builds the part with ``registered.configured(cfg)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from routesae import (
    Aggregation,
    AggregationConfig,
    ConfigError,
    Router,
    RouterConfig,
    Routing,
    StandardizedLayers,
    setting,
)


@dataclass
class TopLayersConfig(RouterConfig):
    k: int = setting(2, "Layers each token is routed to: its k most probable, weighted by their probabilities (1: hard "
                        "routing; the number of routed layers: soft).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"the top-layers router's k must be at least 1, got {self.k}")


class TopLayersRouter(Router):
    name = "top-layers"
    Config: ClassVar[type[RouterConfig]] = TopLayersConfig
    cfg: TopLayersConfig

    @property
    def single_block(self) -> bool:  # type: ignore[override]
        """With k = 1 each token's vector is one block's (scaled): its latents can be steered at that block."""
        return self.cfg.k == 1

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        k = min(self.cfg.k, layers.n_layers)
        top_p_NK, top_NK = probs_NL.topk(k, dim=-1)
        weights_NL = torch.zeros_like(probs_NL).scatter(-1, top_NK, top_p_NK)
        x_route_ND = layers.select(top_NK[:, 0]) * top_p_NK[:, :1] if k == 1 else layers.weighted_sum(weights_NL)
        layer_weights_NL = weights_NL / weights_NL.sum(-1, keepdim=True)
        return Routing(x_route_ND, layer_weights_NL, top_NK[:, 0])


@dataclass
class TrailingConfig(AggregationConfig):
    n: int = setting(4, "Deepest layers of the routed range whose mean is the router's input (all of them if fewer).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ConfigError(f"the trailing aggregation's n must be at least 1, got {self.n}")


class TrailingAggregation(Aggregation):
    name = "trailing"
    Config: ClassVar[type[AggregationConfig]] = TrailingConfig
    cfg: TrailingConfig

    def __call__(self, layers: StandardizedLayers) -> Tensor:
        n = min(self.cfg.n, layers.n_layers)
        weights_NL = layers.raw_NLD.new_zeros(layers.raw_NLD.shape[:2])
        weights_NL[:, -n:] = 1 / n
        return layers.weighted_sum(weights_NL)
