"""Evaluation metrics: the contract (:mod:`.base`) and the built-ins (registered by :mod:`.builtin`)."""

from routesae.metrics.base import EvalBatch, Metric, RunningMean

__all__ = ["EvalBatch", "Metric", "RunningMean"]
