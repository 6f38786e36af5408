"""Built-in evaluation metrics, registered through the ``routesae`` entry point like any plugin."""

from routesae.hookspecs import hookimpl
from routesae.metrics.base import EvalBatch, Metric
from routesae.metrics.downstream import DeltaCE, KLDiv, Recovered
from routesae.metrics.reconstruction import FVU, L0, Cosine, Dead, NormMSE

__all__ = ["EvalBatch", "Metric"]


@hookimpl
def register_metrics(register):
    for metric in (NormMSE, KLDiv, DeltaCE, Recovered, L0, Dead, FVU, Cosine):
        register(metric)
