"""routesae plugin: the router ``top-layers`` (``--route-k``) and the aggregation ``trailing`` (``--aggregate-n``)."""

from routesae import hookimpl
from routesae_layer_routing.routing import TopLayersConfig, TopLayersRouter, TrailingAggregation, TrailingConfig

__all__ = ["TopLayersConfig", "TopLayersRouter", "TrailingAggregation", "TrailingConfig"]


@hookimpl
def register_routers(register):
    register(TopLayersRouter())


@hookimpl
def register_aggregations(register):
    register(TrailingAggregation())
