"""The built-in metrics' plugin: registered through the ``routesae`` entry point like any third-party one."""

from routesae.hookspecs import hookimpl
from routesae.metrics.downstream import DeltaCE, KLDiv, Recovered
from routesae.metrics.reconstruction import FVU, L0, Cosine, Dead, NormMSE


@hookimpl
def register_metrics(register):
    for metric in (NormMSE, KLDiv, DeltaCE, Recovered, L0, Dead, FVU, Cosine):
        register(metric)
