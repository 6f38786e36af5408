"""Built-in routers (hard, soft) and layer aggregations (sum, mean), registered like any plugin."""

from routesae.hookspecs import hookimpl
from routesae.routers.base import (
    Aggregation,
    HardRouter,
    MeanAggregation,
    Router,
    Routing,
    SoftRouter,
    SumAggregation,
)

__all__ = ["Aggregation", "HardRouter", "MeanAggregation", "Router", "Routing", "SoftRouter", "SumAggregation"]


@hookimpl
def register_routers(register):
    for router in (HardRouter(), SoftRouter(), SumAggregation(), MeanAggregation()):
        register(router)
