"""The built-in interpreters' plugin: registered through the ``routesae`` entry point like any third-party one."""

from routesae.hookspecs import hookimpl
from routesae.interpreters.azure import AzureInterpreter
from routesae.interpreters.local import LocalInterpreter
from routesae.interpreters.openai import OpenAIInterpreter


@hookimpl
def register_interpreters(register):
    register(LocalInterpreter)
    register(OpenAIInterpreter)
    register(AzureInterpreter)
