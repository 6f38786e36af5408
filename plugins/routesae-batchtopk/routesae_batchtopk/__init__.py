"""routesae plugin: the BatchTopK sparse autoencoder (``--arch batchtopk``) and its SAELens exporter."""

from routesae.hookspecs import hookimpl
from routesae_batchtopk.batchtopk import BatchTopKConfig, BatchTopKSAE
from routesae_batchtopk.saelens import BatchTopKToSAELens

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "BatchTopKToSAELens"]


@hookimpl
def register_architectures(register):
    register(BatchTopKSAE)


@hookimpl
def register_exporters(register):
    register(BatchTopKToSAELens())
