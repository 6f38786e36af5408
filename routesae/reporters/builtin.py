"""The built-in reporters' plugin: registered through the ``routesae`` entry point like any third-party one."""

from routesae.hookspecs import hookimpl
from routesae.reporters.console import ConsoleReporter
from routesae.reporters.jsonl import JsonlReporter
from routesae.reporters.wandb import WandbReporter


@hookimpl
def register_reporters(register):
    register(ConsoleReporter)
    register(JsonlReporter)
    register(WandbReporter)
