"""The built-in architectures' plugin: registered through the ``routesae`` entry point like any third-party one."""

from routesae.architectures.crosscoder import Crosscoder
from routesae.architectures.gated import GatedSAE
from routesae.architectures.jumprelu import JumpReLUSAE
from routesae.architectures.routesae import RouteSAE
from routesae.architectures.topk import TopKSAE
from routesae.architectures.vanilla import VanillaSAE
from routesae.hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    register(TopKSAE)
    register(RouteSAE)
    register(Crosscoder)
    register(VanillaSAE)
    register(GatedSAE)
    register(JumpReLUSAE)
