"""The plugin contract: every hook receives a ``register`` callback.

The host, not the plugin, owns naming, duplicate detection and error messages: a plugin just
calls ``register(thing)`` for each thing it provides (``register(thing, name="...")`` to pick a
name other than ``thing.name``). Built-in features use these same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("routesae")
hookimpl = pluggy.HookimplMarker("routesae")


@hookspec
def register_architectures(register):
    """Register SAE architecture classes (subclasses of ``routesae.SAE``)."""


@hookspec
def register_routers(register):
    """Register routers (instances of ``routesae.routers.Router``) that routed architectures choose layers with."""


@hookspec
def register_aggregations(register):
    """Register layer aggregations (instances of ``routesae.routers.Aggregation``) that pool a token's layers for a router."""


@hookspec
def register_metrics(register):
    """Register evaluation metrics (subclasses of ``routesae.metrics.Metric``)."""


@hookspec
def register_interpreters(register):
    """Register interpreter backends that explain latents (subclasses of ``routesae.Interpreter``)."""


@hookspec
def register_reporters(register):
    """Register run reporters (subclasses of ``routesae.reporters.Reporter``)."""


@hookspec
def register_exporters(register):
    """Register exporters that write an architecture's SAEs in another library's format (instances of ``routesae.interop.Exporter``)."""


@hookspec
def register_commands(cli):
    """Add click commands to the ``routesae`` CLI group."""
