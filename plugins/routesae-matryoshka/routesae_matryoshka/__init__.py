"""routesae plugin: the Matryoshka TopK sparse autoencoder (``--arch matryoshka``)."""

from routesae import hookimpl
from routesae_matryoshka.matryoshka import MatryoshkaConfig, MatryoshkaSAE

__all__ = ["MatryoshkaConfig", "MatryoshkaSAE"]


@hookimpl
def register_architectures(register):
    register(MatryoshkaSAE)
