"""Run reporters: the contract (:mod:`.base`), the built-ins (registered by :mod:`.builtin`), :func:`.build.build_reporters`."""

from routesae.reporters.base import Reporter, StepReport

__all__ = ["Reporter", "StepReport"]
