"""Built-in run reporters, registered through the ``routesae`` entry point like any plugin."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from routesae.hookspecs import hookimpl
from routesae.reporters.base import Reporter, StepReport
from routesae.reporters.console import ConsoleReporter
from routesae.reporters.jsonl import JsonlReporter
from routesae.reporters.wandb import WandbReporter

__all__ = ["Reporter", "StepReport", "build_reporters"]


@hookimpl
def register_reporters(register):
    register(ConsoleReporter)
    register(JsonlReporter)
    register(WandbReporter)


def build_reporters(names: Sequence[str], run_dir: Path) -> list[Reporter]:
    """The named reporters for ``run_dir``; ``jsonl`` (``metrics.jsonl``) is always on: it is the run's record."""
    from routesae.plugins import get_plugin_manager

    pm = get_plugin_manager()
    return [pm.get("reporter", name)(run_dir) for name in dict.fromkeys(["jsonl", *names])]
