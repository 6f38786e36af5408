"""The plugin manager: built-ins and third-party packages, discovered through one entry-point group.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import, so
entry points are loaded one at a time here: a broken plugin is disabled with a one-line warning
and everything else keeps working. Environment switches:

* ``ROUTESAE_LOAD_PLUGINS=a,b`` loads only those distributions (empty: built-ins only);
* ``ROUTESAE_STRICT_PLUGINS=1`` turns a broken plugin into an error (for plugin authors);
* ``ROUTESAE_TRACE_PLUGINS=1`` prints every hook call.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import pluggy

from routesae import hookspecs
from routesae.architectures.base import SAE
from routesae.errors import PluginError
from routesae.interop.base import Exporter
from routesae.interpreters.base import Interpreter
from routesae.metrics.base import Metric
from routesae.reporters.base import Reporter
from routesae.routers.base import Aggregation, Router

ENTRY_POINT_GROUP = "routesae"
BUILTIN_DISTRIBUTION = "routesae"



@dataclass(frozen=True)
class Kind:
    """One kind of plugin: the hook that registers it, and what a registered object must be."""

    name: str
    hook: str
    base: type
    where: str  # how a plugin author imports ``base``
    instance: bool  # registered as an instance of ``base`` (stateless strategies), or as a subclass (built per use)
    required: tuple[str, ...] = ()  # methods of ``base`` that a registration must define itself

    def check(self, name: str, obj: Any) -> None:
        """Refuse at registration what the kernel could not use later, with the fix in the message."""
        what = f"{self.where}.{self.base.__qualname__}"
        if self.instance:
            if isinstance(obj, type):
                raise PluginError(f"{self.name} {name!r} must be registered as an instance: register({obj.__name__}()), not the class")
            if not isinstance(obj, self.base):
                raise PluginError(f"{self.name} {name!r} must be an instance of {what}, got {obj!r}")
        elif not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise PluginError(f"{self.name} {name!r} must be a subclass of {what}, got {obj!r}")
        check_contract = getattr(obj, "check_contract", None)  # a classmethod of a class, or a method of an instance
        if check_contract is not None:
            try:
                check_contract()
            except PluginError as e:
                raise PluginError(f"{self.name} {name!r}: {e}") from None
        cls = obj if isinstance(obj, type) else type(obj)
        missing = [m for m in self.required if getattr(cls, m, None) is getattr(self.base, m)]
        if missing:
            raise PluginError(f"{self.name} {name!r} does not define {', '.join(missing)}, which every {what} must")


#: Every kind of plugin. The host files what a hook registers under its kind and checks it against the base.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("architecture", "register_architectures", SAE, "routesae", instance=False),
        Kind("router", "register_routers", Router, "routesae.routers", instance=True, required=("route",)),
        Kind("aggregation", "register_aggregations", Aggregation, "routesae.routers", instance=True, required=("__call__",)),
        Kind("metric", "register_metrics", Metric, "routesae.metrics", instance=False, required=("update", "result")),
        Kind("interpreter", "register_interpreters", Interpreter, "routesae", instance=False, required=("complete",)),
        Kind("reporter", "register_reporters", Reporter, "routesae.reporters", instance=False),
        Kind("exporter", "register_exporters", Exporter, "routesae.interop", instance=True, required=("export",)),
    )
}


@dataclass
class PluginInfo:
    """What `routesae plugins` shows for one entry point."""

    name: str
    distribution: str
    version: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None  # why the whole plugin is disabled
    warnings: list[str] = field(default_factory=list)  # registrations refused while the rest of it works (duplicates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "registered": self.registered,
            "error": self.error,
            "warnings": self.warnings,
        }

    @property
    def builtin(self) -> bool:
        return _canonical(self.distribution) == BUILTIN_DISTRIBUTION

    def describe(self) -> str:
        """``plugin 'name' (distribution version)``: how messages name a plugin."""
        return f"plugin {self.name!r} ({' '.join(filter(None, (self.distribution, self.version)))})"


def _canonical(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-").replace(".", "-")


def _strict() -> bool:
    return os.environ.get("ROUTESAE_STRICT_PLUGINS", "") not in ("", "0")


def _selected_distributions() -> set[str] | None:
    raw = os.environ.get("ROUTESAE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {_canonical(part.strip()) for part in raw.split(",") if part.strip()}


def _entry_points() -> Iterator[tuple[importlib.metadata.EntryPoint, importlib.metadata.Distribution]]:
    """Our group's entry points, one per (distribution, name), in a stable order."""
    seen: set[tuple[str, str]] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: _canonical(d.metadata["Name"] or ""))
    for dist in dists:
        dist_name = _canonical(dist.metadata["Name"] or "")
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or (dist_name, ep.name) in seen:
                continue
            seen.add((dist_name, ep.name))
            yield ep, dist


class PluginManager:
    """Loads plugins and keeps, per kind, a name -> object registry with its provenance."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get("ROUTESAE_TRACE_PLUGINS", "") not in ("", "0"):
            self.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            self.pm.enable_tracing()
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, dict[str, tuple[Any, str]]] | None = None
        if load_entry_points:
            self._load_entry_points()

    # -- loading -------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, error: BaseException) -> None:
        info.error = f"{type(error).__name__}: {error}"
        if _strict():
            raise PluginError(f"plugin {info.name!r} ({info.distribution} {info.version}) failed: {info.error}") from error
        print(
            f"routesae: warning: disabled plugin {info.name!r} from {info.distribution} {info.version}: {info.error}",
            file=sys.stderr,
        )

    def _load_entry_points(self) -> None:
        selected = _selected_distributions()
        for ep, dist in _entry_points():
            dist_name = dist.metadata["Name"]
            builtin = _canonical(dist_name) == BUILTIN_DISTRIBUTION
            if not builtin and selected is not None and _canonical(dist_name) not in selected:
                continue
            info = PluginInfo(name=ep.name, distribution=dist_name, version=dist.version)
            if ep.name in self.infos:
                other = self.infos[ep.name]
                self._fail(info, PluginError(f"entry point name already used by {other.distribution}"))
                self.infos[f"{ep.name} ({dist_name})"] = info
                continue
            self.infos[ep.name] = info
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as e:  # an import error, a bad hook signature, ...
                self._fail(info, e)
        while True:  # hook implementations whose name matches no hook (typos) surface here
            try:
                self.pm.check_pending()
                break
            except pluggy.PluginValidationError as e:
                name = self.pm.get_name(e.plugin) or ""
                self.pm.unregister(e.plugin)
                self._fail(self.infos[name], e)

    def register(self, plugin: object, name: str, distribution: str = "(registered in code)", version: str = "") -> None:
        """Register a plugin object directly (tests, notebooks); undo with :meth:`unregister`."""
        self.pm.register(plugin, name=name)
        self.infos[name] = PluginInfo(name=name, distribution=distribution, version=version)
        self._registries = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._registries = None

    # -- registries ----------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, tuple[Any, str]]]:
        """Call every plugin's register hooks, built-ins first.

        A plugin whose hook raises (or registers something its kind refuses) is disabled whole. A name
        that an earlier plugin registered already is refused for the later one alone, with a warning
        naming both: the CLI and every other registration keep working (strict mode: an error).
        """
        registries: dict[str, dict[str, tuple[Any, str]]] = {kind: {} for kind in KINDS}
        for plugin_name, info in sorted(self.infos.items(), key=lambda item: not item[1].builtin):
            plugin = self.pm.get_plugin(plugin_name)
            if plugin is None or info.error:
                continue
            found: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
            try:
                for kind in KINDS.values():
                    for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
                        if impl.plugin is plugin:
                            impl.function(_registrar(kind, found[kind.name]))
            except Exception as e:
                self._fail(info, e)
                continue
            info.warnings = []
            for kind, items in found.items():
                for name, obj in list(items.items()):
                    if name in registries[kind]:
                        del items[name]
                        self._refuse_duplicate(info, self.infos[registries[kind][name][1]], kind, name)
                    else:
                        registries[kind][name] = (obj, plugin_name)
            info.registered = {kind: sorted(items) for kind, items in found.items() if items}
        return registries

    def _refuse_duplicate(self, info: PluginInfo, owner: PluginInfo, kind: str, name: str) -> None:
        message = (
            f"the {kind} {name!r} of {info.describe()} is ignored: {owner.describe()} registered it first; "
            "uninstall one, or choose plugins with ROUTESAE_LOAD_PLUGINS"
        )
        if _strict():
            raise PluginError(f"two plugins register the {kind} {name!r}: {owner.distribution} (plugin {owner.name!r}) "
                              f"and {info.distribution} (plugin {info.name!r}); uninstall one, or choose plugins with "
                              "ROUTESAE_LOAD_PLUGINS")
        info.warnings.append(message)
        print(f"routesae: warning: {message}", file=sys.stderr)

    @property
    def registries(self) -> dict[str, dict[str, tuple[Any, str]]]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def names(self, kind: str) -> list[str]:
        return sorted(self.registries[kind])

    def get(self, kind: str, name: str) -> Any:
        """The registered object, or an error that lists what is installed (and which plugins failed to load)."""
        try:
            return self.registries[kind][name][0]
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; installed: {installed}{self.load_failures()}") from None

    def load_failures(self) -> str:
        """``; plugin 'x' (dist 1.0) failed to load and may provide it (ImportError: ...)`` for each disabled plugin:
        what a message about a missing name adds, since the missing one may be a broken plugin's."""
        return "".join(
            f"; {info.describe()} failed to load and may provide it ({info.error.strip().splitlines()[0]})"
            for info in self.infos.values()
            if info.error
        )

    def provider(self, kind: str, name: str) -> PluginInfo:
        return self.infos[self.registries[kind][name][1]]

    def provenance(self, kind: str, name: str) -> dict[str, Any]:
        """Which distribution (and version) registered ``name``: what checkpoints and ``run.json`` record."""
        record: dict[str, Any] = {"kind": kind, "name": name, "distribution": None, "version": None}
        if name in self.registries.get(kind, {}):
            info = self.provider(kind, name)
            record.update(distribution=info.distribution, version=info.version or None)
        return record

    def owner_of_module(self, module: str) -> PluginInfo | None:
        """The third-party plugin whose code lives in ``module`` (by top-level package), or None.

        A plugin's package is its entry point's module and the modules of everything it registered,
        so a plugin registered in code is found through the classes it registered.
        """
        owners: dict[str, str] = {}
        for plugin_name, info in self.infos.items():
            plugin = self.pm.get_plugin(plugin_name)
            if plugin is not None and not info.builtin:
                owners[_top_package(plugin)] = plugin_name
        for registry in self.registries.values():
            for obj, plugin_name in registry.values():
                if not self.infos[plugin_name].builtin:
                    owners[_top_package(obj)] = plugin_name
        owners.pop(BUILTIN_DISTRIBUTION, None)  # routesae's own classes, registered again by a plugin, stay routesae's
        plugin_name = owners.get(module.split(".")[0])
        return None if plugin_name is None else self.infos[plugin_name]

    def plugin_infos(self) -> list[PluginInfo]:
        self.registries  # noqa: B018 - fills in what each plugin registered
        return list(self.infos.values())

    def add_commands(self, cli: Any) -> None:
        """Let each plugin add click commands; a plugin whose hook raises is disabled."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(cli)
            except Exception as e:
                self._fail(self.infos.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "?", "?"), e)


def _top_package(obj: Any) -> str:
    """The top-level package that defines ``obj`` (a module, a class or an instance)."""
    module = obj.__name__ if isinstance(obj, types.ModuleType) else (obj if isinstance(obj, type) else type(obj)).__module__
    return module.split(".")[0]


def _registrar(kind: Kind, into: dict[str, Any]) -> Callable[..., None]:
    def register(obj: Any, name: str | None = None) -> None:
        key = name or getattr(obj, "name", None)
        if (not isinstance(key, str) or not key) and kind.instance and isinstance(obj, type):
            kind.check(obj.__name__, obj)  # a class where an instance belongs (whose name is a property): say so
        if not isinstance(key, str) or not key:
            raise PluginError(f"cannot register {obj!r} as a {kind.name}: it has no name (pass name=...)")
        if key in into:
            raise PluginError(f"the {kind.name} {key!r} is registered twice by the same plugin")
        kind.check(key, obj)
        into[key] = obj

    return register


_manager: PluginManager | None = None
_active: ContextVar[PluginManager | None] = ContextVar("routesae_plugin_manager", default=None)


def get_plugin_manager() -> PluginManager:
    """The plugin manager in use: the one activated around this call (:func:`activated`), else the process-wide one.

    The process-wide manager loads every installed plugin on first use. A manager passed to
    :func:`routesae.cli.make_cli` or to ``train``/``load_sae``/``SAESpec.build`` (``plugins=``) is
    activated for the whole call, so everything beneath it, down to RouteSAE looking up its router,
    sees that manager's plugins. The activation belongs to the calling thread (a ``ContextVar``).
    """
    active = _active.get()
    if active is not None:
        return active
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


@contextmanager
def activated(pm: PluginManager | None) -> Iterator[PluginManager]:
    """Make ``pm`` the manager in use inside the ``with`` block (None: keep the one in use)."""
    if pm is None:
        yield get_plugin_manager()
        return
    token = _active.set(pm)
    try:
        yield pm
    finally:
        _active.reset(token)


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests that change the environment call this)."""
    global _manager
    _manager = None
