"""routesae: a plugin-based zoo of sparse autoencoders for language models, on TransformerLens.

Everything a script needs is importable from here. ``routesae.train`` and ``routesae.evaluate``
are the functions; the rest of those modules imports as usual (``from routesae.train import Trainer``).
"""

__version__ = "0.1.0"

from routesae.architectures.base import (  # noqa: E402
    SAE,
    Inference,
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
)
from routesae.checkpoint import load_sae  # noqa: E402

load = load_sae  # ``routesae.load(path)``: rebuild an SAE from its checkpoint directory
from routesae.config import setting  # noqa: E402
from routesae.data import Corpus, load_corpus  # noqa: E402
from routesae.errors import RouteSAEError  # noqa: E402
from routesae.evaluate import evaluate  # noqa: E402
from routesae.hookspecs import hookimpl  # noqa: E402
from routesae.lm import LanguageModel  # noqa: E402
from routesae.plugins import get_plugin_manager  # noqa: E402
from routesae.train import SAESpec, TrainConfig, train  # noqa: E402

__all__ = [
    "__version__",
    "SAE",
    "Inference",
    "SAEConfig",
    "SAEOutput",
    "SingleLayerConfig",
    "SingleLayerSAE",
    "setting",
    "hookimpl",
    "LanguageModel",
    "Corpus",
    "load_corpus",
    "SAESpec",
    "TrainConfig",
    "train",
    "load_sae",
    "load",
    "evaluate",
    "RouteSAEError",
    "get_plugin_manager",
]
