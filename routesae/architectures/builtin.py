"""The built-in architectures' plugin: registered through the ``routesae`` entry point like any third-party one.

It also registers their exporters (``routesae export``), as a third-party architecture's plugin would:
the SAELens format for the single-layer ones, the parts format for RouteSAE.
"""

from routesae.architectures.crosscoder import Crosscoder
from routesae.architectures.gated import GatedSAE
from routesae.architectures.jumprelu import JumpReLUSAE
from routesae.architectures.mlsae import MLSAE
from routesae.architectures.routesae import RouteSAE
from routesae.architectures.topk import TopKSAE
from routesae.architectures.vanilla import VanillaSAE
from routesae.hookspecs import hookimpl
from routesae.interop.parts import RouteSAEParts
from routesae.interop.saelens_exporters import BUILTIN_SAELENS_EXPORTERS


@hookimpl
def register_architectures(register):
    register(TopKSAE)
    register(RouteSAE)
    register(Crosscoder)
    register(VanillaSAE)
    register(GatedSAE)
    register(JumpReLUSAE)
    register(MLSAE)


@hookimpl
def register_exporters(register):
    for exporter in BUILTIN_SAELENS_EXPORTERS:
        register(exporter())
    register(RouteSAEParts())
