"""Top-activating contexts per latent: ``routesae contexts`` and the ``contexts.json`` it writes.

``extract_contexts`` runs the pass (:mod:`routesae.contexts.extract`) with a ``ContextsConfig``,
``render_context`` shows a context with its activating token marked, ``read_contexts`` reads and
checks a file (:mod:`routesae.contexts.schema`).
"""

from routesae.contexts.extract import ContextsConfig, extract_contexts
from routesae.contexts.schema import contexts_fingerprint, read_contexts, render_context

__all__ = [
    "ContextsConfig",
    "contexts_fingerprint",
    "extract_contexts",
    "read_contexts",
    "render_context",
]
