"""routesae plugin: the BatchTopK sparse autoencoder (``--arch batchtopk``)."""

from routesae.hookspecs import hookimpl
from routesae_batchtopk.batchtopk import BatchTopKConfig, BatchTopKSAE

__all__ = ["BatchTopKConfig", "BatchTopKSAE"]


@hookimpl
def register_architectures(register):
    register(BatchTopKSAE)
