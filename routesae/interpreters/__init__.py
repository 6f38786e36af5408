"""Interpreter backends: the contract (:mod:`.base`) and the built-ins (registered by :mod:`.builtin`)."""

from __future__ import annotations

from routesae.interpreters.azure import AzureInterpreter
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
    "AzureInterpreter",
    "Completion",
    "Interpreter",
    "InterpreterConfig",
    "InterpreterError",
    "InterpreterUnavailable",
    "LocalInterpreter",
    "Message",
    "OpenAIInterpreter",
]
