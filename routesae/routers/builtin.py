"""The built-in routers' and aggregations' plugin: registered through the ``routesae`` entry point like any third-party one."""

from routesae.hookspecs import hookimpl
from routesae.routers.base import HardRouter, MeanAggregation, SoftRouter, SumAggregation
from routesae.routers.controls import FixedRouter, RandomRouter, UniformRouter


@hookimpl
def register_routers(register):
    register(HardRouter())
    register(SoftRouter())
    register(FixedRouter())
    register(RandomRouter())
    register(UniformRouter())


@hookimpl
def register_aggregations(register):
    register(SumAggregation())
    register(MeanAggregation())
