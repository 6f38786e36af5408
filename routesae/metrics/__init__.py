"""Evaluation metrics: the contract (:mod:`.base`) and the built-ins (registered by :mod:`.builtin`)."""

from routesae.metrics.base import EvalBatch, Metric

__all__ = ["EvalBatch", "Metric"]
