"""routesae: a plugin-based zoo of sparse autoencoders for language models, on TransformerLens.

Everything a script needs is importable from here: each stage is a function (``train``,
``evaluate``, ``extract_contexts``, ``steer``, ``interpret``, ``write_report``, ``pipeline``,
``cache_activations``) with a config class of its settings (``TrainConfig``, ``EvaluateConfig``, ...);
the rest of those modules imports as usual (``from routesae.trainer import Trainer``).

So is everything a plugin needs (docs/plugins.md): the base class of each kind (``SAE``,
``SingleLayerSAE``, ``TopKSAE``, ``Router``, ``Aggregation``, ``Metric``, ``Interpreter``,
``Reporter``), what they receive and return (``SAEOutput``, ``SparseCodes``, ``TrainingState``,
``StandardizedLayers``, ``Routing``, ``EvalBatch``, ``StepReport``, ``Completion``), their settings
(``setting``, ``SAEConfig``, ``RouterConfig``, ...), ``hookimpl`` and the errors to raise.
"""

from routesae.architectures.base import (
    SAE,
    Encoded,
    Inference,
    MultiLayerConfig,
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
    Standardization,
    StandardizedLayers,
    TrainingState,
    normalized_mse,
)
from routesae.architectures.codes import SparseCodes
from routesae.architectures.topk import TopKConfig, TopKSAE, TopKSettings
from routesae.cache import ActivationCache, CacheConfig, cache_activations
from routesae.checkpoint import load, load_sae
from routesae.compare import CompareConfig, compare
from routesae.config import Config, setting
from routesae.contexts import ContextsConfig, extract_contexts, read_contexts, render_context
from routesae.data import Corpus, load_corpus
from routesae.errors import ConfigError, PluginError, RouteSAEError
from routesae.evaluate import EvaluateConfig, evaluate
from routesae.export import export_sae
from routesae.faults import PluginFault
from routesae.hookspecs import hookimpl
from routesae.interpret import BudgetReached, InterpretConfig, interpret
from routesae.interpreters import (
    Completion,
    Interpreter,
    InterpreterConfig,
    InterpreterError,
    InterpreterUnavailable,
    Message,
)
from routesae.lm import LanguageModel
from routesae.metrics import EvalBatch, Metric, RunningMean
from routesae.notebook import TokenLatents, generate, latents, spliced
from routesae.pipeline import PipelineConfig, pipeline
from routesae.plugins import PluginInfo, PluginManager, get_plugin_manager
from routesae.report import write_report
from routesae.reporters import Reporter, StepReport
from routesae.routers import Aggregation, AggregationConfig, Router, RouterConfig, Routing
from routesae.specs import SAESpec
from routesae.steering import Clamp, SteerConfig, SteeringResult, steer, steer_sweep
from routesae.train import train
from routesae.train_config import TrainConfig
from routesae.version import __version__

__all__ = [
    "SAE",
    "ActivationCache",
    "Aggregation",
    "AggregationConfig",
    "BudgetReached",
    "CacheConfig",
    "Clamp",
    "CompareConfig",
    "Completion",
    "Config",
    "ConfigError",
    "ContextsConfig",
    "Corpus",
    "Encoded",
    "EvalBatch",
    "EvaluateConfig",
    "Inference",
    "InterpretConfig",
    "Interpreter",
    "InterpreterConfig",
    "InterpreterError",
    "InterpreterUnavailable",
    "LanguageModel",
    "Message",
    "Metric",
    "MultiLayerConfig",
    "PipelineConfig",
    "PluginError",
    "PluginFault",
    "PluginInfo",
    "PluginManager",
    "Reporter",
    "RouteSAEError",
    "Router",
    "RouterConfig",
    "Routing",
    "RunningMean",
    "SAEConfig",
    "SAEOutput",
    "SAESpec",
    "SingleLayerConfig",
    "SingleLayerSAE",
    "SparseCodes",
    "Standardization",
    "StandardizedLayers",
    "SteerConfig",
    "SteeringResult",
    "StepReport",
    "TokenLatents",
    "TopKConfig",
    "TopKSAE",
    "TopKSettings",
    "TrainConfig",
    "TrainingState",
    "__version__",
    "cache_activations",
    "compare",
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
    "normalized_mse",
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
