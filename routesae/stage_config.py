"""The base of the settings of the stages after training: evaluate, contexts, steer, interpret.

A stage's settings are one :class:`StageConfig` subclass, written once: its fields are the stage
function's keyword settings (``evaluate(dirs, tokens=4096)`` builds an ``EvaluateConfig``), the
command's options (generated from the fields and their help, like the architectures' options),
a nested part of :class:`~routesae.pipeline.PipelineConfig`, and what the stage records of its
request. What is not a plain scalar setting — SAE paths, a prompt, clamps, a loaded model,
reporters, an interpreter backend's own options — stays an argument of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from routesae.config import Config, setting


@dataclass
class StageConfig(Config):
    """A stage's settings; ``EXECUTION_SETTINGS`` name those that change how it runs, not what it finds."""

    EXECUTION_SETTINGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, cfg: Self | None, settings: dict[str, Any]) -> Self:
        """``cfg`` (default: all defaults) with keyword ``settings`` on top, checked like ``from_dict``."""
        if cfg is None:
            return cls.from_dict(settings)
        return cls.from_dict({**cfg.to_dict(), **settings}) if settings else cfg

    def request(self) -> dict[str, Any]:
        """The settings that shape the results: what the stage records and the pipeline compares to re-run it."""
        return {name: value for name, value in self.to_dict().items() if name not in self.EXECUTION_SETTINGS}


def infer_k_setting(reads: str) -> Any:
    """The ``infer_k`` setting of a stage that reads ``reads`` ("every SAE", "the SAE")."""
    return setting(
        None,
        f"Read {reads} with TopK over its pre-activations (signed values, as the reference) instead of its trained "
        "activation; at most the latent size. Not for gated SAEs. Excludes theta.",
    )


def theta_setting(reads: str) -> Any:
    """``theta``, the other inference-time override (see :func:`infer_k_setting`)."""
    return setting(
        None,
        f"Read {reads} with one global threshold, z = a * (a > theta), instead of its trained activation. "
        "Not for gated SAEs. Excludes infer-k.",
    )
