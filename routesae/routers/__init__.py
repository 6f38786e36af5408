"""Routers and layer aggregations: the contract and the built-ins (:mod:`.base`), registered by :mod:`.builtin`."""

from routesae.routers.base import Aggregation, HardRouter, MeanAggregation, Router, Routing, SoftRouter, SumAggregation

__all__ = ["Aggregation", "HardRouter", "MeanAggregation", "Router", "Routing", "SoftRouter", "SumAggregation"]
