"""Built-in architectures, registered through the ``routesae`` entry point like any plugin."""

from routesae.architectures.crosscoder import Crosscoder
from routesae.architectures.routesae import RouteSAE
from routesae.architectures.topk import TopKSAE
from routesae.hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    register(TopKSAE)
    register(RouteSAE)
    register(Crosscoder)
