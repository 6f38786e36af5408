"""Routers and layer aggregations: the contract and the built-ins (:mod:`.base`), registered by :mod:`.builtin`."""

from routesae.routers.base import (
    Aggregation,
    AggregationConfig,
    HardRouter,
    MeanAggregation,
    Router,
    RouterConfig,
    Routing,
    SoftRouter,
    SumAggregation,
)

__all__ = [
    "Aggregation",
    "AggregationConfig",
    "HardRouter",
    "MeanAggregation",
    "Router",
    "RouterConfig",
    "Routing",
    "SoftRouter",
    "SumAggregation",
]
