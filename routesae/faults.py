"""Exceptions raised inside a plugin's code: told apart from routesae's own bugs, and named by plugin.

A plugin is third-party code running inside the kernel's loops (an architecture's loss, a router, a
metric's update, a reporter). When one raises, the user needs to know which plugin, from which
distribution, and what state the run is in, in one line, not a long traceback that names neither.
:func:`blame` finds the plugin in the traceback: the innermost frame whose code, or whose
``self``, belongs to a third-party plugin's package (a plugin subclassing a built-in is found
through ``self``). A routesae bug blames no plugin and keeps its traceback. ``routesae --debug``
prints the traceback of a plugin fault too (the plugin's exception is its cause).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from routesae.errors import RouteSAEError
from routesae.plugins import PluginInfo, PluginManager, get_plugin_manager


class PluginFault(RouteSAEError):
    """A plugin raised: the message names it and its distribution; the exception it raised is the cause."""

    def __init__(self, message: str, plugin: PluginInfo) -> None:
        super().__init__(message)
        self.plugin = plugin


def blame(error: BaseException, pm: PluginManager | None = None) -> PluginInfo | None:
    """The third-party plugin whose code raised ``error`` (the innermost of its frames), or None."""
    pm = pm or get_plugin_manager()
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = pm.owner_of_module(frame.f_globals.get("__name__", ""))
        if owner is None and "self" in frame.f_locals:
            owner = pm.owner_of_module(type(frame.f_locals["self"]).__module__)
        found = owner or found
    return found


def fault_message(plugin: PluginInfo, error: BaseException, doing: str, advice: str = "") -> str:
    """One line: which plugin raised what, while doing what, and what to do now."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    raised = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    tail = f"; {advice}" if advice else ""
    return f"{plugin.describe()} raised {raised} {doing}{tail} (routesae --debug shows the traceback)"


def as_fault(error: Exception, doing: str, advice: str = "", pm: PluginManager | None = None) -> Exception:
    """``error`` as a :class:`PluginFault` (caused by it) when a plugin raised it, else ``error`` itself."""
    plugin = None if isinstance(error, RouteSAEError) else blame(error, pm)
    if plugin is None:
        return error
    fault = PluginFault(fault_message(plugin, error, doing, advice), plugin)
    fault.__cause__ = error
    return fault


@contextmanager
def contained(doing: str, advice: str = "", passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside the block, an exception a plugin raised becomes a one-line :class:`PluginFault` (``passing``: exception
    types left as they are, e.g. click's own); routesae's errors and bugs pass unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, passing):
            raise
        fault = as_fault(e, doing, advice)
        if fault is e:
            raise
        raise fault from e
