"""Built-in run reporters, registered through the ``routesae`` entry point like any plugin."""

from routesae.hookspecs import hookimpl
from routesae.reporters.base import Reporter, StepReport
from routesae.reporters.console import ConsoleReporter
from routesae.reporters.jsonl import JsonlReporter
from routesae.reporters.wandb import WandbReporter

__all__ = ["Reporter", "StepReport"]


@hookimpl
def register_reporters(register):
    register(ConsoleReporter)
    register(JsonlReporter)
    register(WandbReporter)
