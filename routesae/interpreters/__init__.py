"""Built-in interpreter backends, registered through the ``routesae`` entry point like any plugin."""

from __future__ import annotations

from routesae.hookspecs import hookimpl
from routesae.interpreters.base import (
    Completion,
    Interpreter,
    InterpreterConfig,
    InterpreterError,
    InterpreterUnavailable,
    Message,
)
from routesae.interpreters.local import LocalInterpreter
from routesae.interpreters.openai import OpenAIInterpreter

__all__ = [
    "Completion",
    "Interpreter",
    "InterpreterConfig",
    "InterpreterError",
    "InterpreterUnavailable",
    "LocalInterpreter",
    "Message",
    "OpenAIInterpreter",
]


@hookimpl
def register_interpreters(register):
    register(LocalInterpreter)
    register(OpenAIInterpreter)
