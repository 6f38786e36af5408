"""routesae: a plugin-based zoo of sparse autoencoders for language models, on TransformerLens.

Everything a script needs is importable from here. ``routesae.train`` is the training function;
the rest of that module imports as usual (``from routesae.train import Trainer``).
"""

__version__ = "0.1.0"

from routesae.architectures.base import SAE, SAEConfig, SAEOutput, SingleLayerConfig, SingleLayerSAE  # noqa: E402
from routesae.checkpoint import load_sae  # noqa: E402

load = load_sae  # ``routesae.load(path)``: rebuild an SAE from its checkpoint directory
from routesae.config import setting  # noqa: E402
from routesae.data import Corpus, load_corpus  # noqa: E402
from routesae.errors import RouteSAEError  # noqa: E402
from routesae.hookspecs import hookimpl  # noqa: E402
from routesae.lm import LanguageModel  # noqa: E402
from routesae.plugins import get_plugin_manager  # noqa: E402
from routesae.train import SAESpec, TrainConfig, train  # noqa: E402

__all__ = [
    "__version__",
    "SAE",
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
    "RouteSAEError",
    "get_plugin_manager",
]
