"""routesae: a plugin-based zoo of sparse autoencoders for language models, on TransformerLens.

Everything a script needs is importable from here: each stage is a function (``train``,
``evaluate``, ``extract_contexts``, ``steer``, ``interpret``, ``write_report``, ``pipeline``,
``cache_activations``) with a config class of its settings (``TrainConfig``, ``EvaluateConfig``, ...);
the rest of those modules imports as usual (``from routesae.trainer import Trainer``).
"""

from routesae.architectures.base import (
    SAE,
    Inference,
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
    TrainingState,
)
from routesae.cache import ActivationCache, CacheConfig, cache_activations
from routesae.checkpoint import load, load_sae
from routesae.config import setting
from routesae.contexts import ContextsConfig, extract_contexts, read_contexts, render_context
from routesae.data import Corpus, load_corpus
from routesae.errors import RouteSAEError
from routesae.evaluate import EvaluateConfig, evaluate
from routesae.export import export_sae
from routesae.hookspecs import hookimpl
from routesae.interpret import BudgetReached, InterpretConfig, interpret
from routesae.interpreters import Completion, Interpreter, InterpreterConfig
from routesae.lm import LanguageModel
from routesae.notebook import TokenLatents, generate, latents, spliced
from routesae.pipeline import PipelineConfig, pipeline
from routesae.plugins import get_plugin_manager
from routesae.report import write_report
from routesae.specs import SAESpec
from routesae.steering import Clamp, SteerConfig, SteeringResult, steer, steer_sweep
from routesae.train import train
from routesae.train_config import TrainConfig
from routesae.version import __version__

__all__ = [
    "SAE",
    "ActivationCache",
    "BudgetReached",
    "CacheConfig",
    "Clamp",
    "Completion",
    "ContextsConfig",
    "Corpus",
    "EvaluateConfig",
    "Inference",
    "InterpretConfig",
    "Interpreter",
    "InterpreterConfig",
    "LanguageModel",
    "PipelineConfig",
    "RouteSAEError",
    "SAEConfig",
    "SAEOutput",
    "SAESpec",
    "SteerConfig",
    "SingleLayerConfig",
    "SingleLayerSAE",
    "SteeringResult",
    "TrainConfig",
    "TokenLatents",
    "TrainingState",
    "__version__",
    "cache_activations",
    "evaluate",
    "export_sae",
    "extract_contexts",
    "generate",
    "get_plugin_manager",
    "hookimpl",
    "interpret",
    "latents",
    "load",
    "load_corpus",
    "load_sae",
    "pipeline",
    "read_contexts",
    "render_context",
    "setting",
    "spliced",
    "steer",
    "steer_sweep",
    "train",
    "write_report",
]
