"""Which SAEs a run trains: architectures × settings (with sweeps), from the CLI or a TOML run file.

``--k 32,64,128 --arch routesae --arch topk`` is six SAEs trained from one harvest: every
comma-separated setting is swept, and each setting goes to every listed architecture that takes
it, as configured (RouteSAE takes ``l1`` only with ``--inner vanilla``). An architecture that does
not take a setting another one takes ignores it, with a note; a setting that none of them takes is
an error, never silently ignored.

Values. A list is a sweep, one SAE per value (``{"k": [32, 64]}``), except for a list-valued
setting (annotated ``tuple[X, ...]``), whose value is itself a list: ``{"prefixes": [64, 256]}``
is one value, ``{"prefixes": [[64, 256], [128]]}`` a sweep of two. A run file's array is a
list-valued setting's value; a sweep there is one ``[sae.NAME]`` table per SAE.
"""

from __future__ import annotations

import itertools
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routesae.architectures.base import SAE, SAEConfig
from routesae.config import list_item_type
from routesae.errors import ConfigError, RouteSAEError
from routesae.plugins import PluginManager, activated
from routesae.rundir import check_sae_name


@dataclass
class SAESpec:
    """One SAE to train: its architecture, its (unresolved) config and its name in the run."""

    architecture: str
    config: SAEConfig
    name: str | None = None

    @classmethod
    def build(cls, architecture: str, name: str | None = None, *, plugins: PluginManager | None = None, **settings: Any) -> SAESpec:
        """The spec of ``architecture`` with ``settings``, checked by its config (``plugins``: the manager to use)."""
        with activated(plugins) as pm:
            return cls(architecture, pm.get("architecture", architecture).build_config(settings), name)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "config": self.config.to_dict(), "name": self.name}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def expand_specs(architectures: list[str], settings: dict[str, Any], *, plugins: PluginManager | None = None) -> list[SAESpec]:
    """One spec per architecture and per combination of swept (list-valued) settings."""
    with activated(plugins) as pm:
        return _expand(pm, architectures, settings)


def list_valued(arch: type[SAE]) -> set[str]:
    """The settings of ``arch`` whose value is a list (``tuple[X, ...]``), among all it may take."""
    return {s.name for s in arch.settings() if list_item_type(s.type) is not None}


def sweep_values(value: Any, list_setting: bool) -> list[Any]:
    """The values a setting is swept over: a list is a sweep, but one list of a list-valued setting is one value."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if list_setting and not all(isinstance(v, (list, tuple)) for v in value):
        return [tuple(value)]
    return [tuple(v) if list_setting else v for v in value]


def _expand(pm: PluginManager, architectures: list[str], settings: dict[str, Any]) -> list[SAESpec]:
    archs = {name: pm.get("architecture", name) for name in dict.fromkeys(architectures)}
    possible = {name: arch.setting_names() for name, arch in archs.items()}
    for key in settings:
        if not any(key in names for names in possible.values()):
            options = ", ".join(sorted({_option(n) for names in possible.values() for n in names}))
            raise ConfigError(f"{_option(key)} is not a setting of --arch {', '.join(archs)}; their settings: {options}")
    specs, taken_by = [], {key: set() for key in settings}
    for name, arch in archs.items():
        lists = list_valued(arch)
        own = {k: sweep_values(v, k in lists) for k, v in settings.items() if k in possible[name]}
        seen: list[dict[str, Any]] = []
        for values in itertools.product(*own.values()):
            combination = dict(zip(own, values))
            accepted = arch.accepts(combination)
            kept = {k: v for k, v in combination.items() if k in accepted}
            for key in kept:
                taken_by[key].add(name)
            if kept not in seen:  # a swept setting this configuration ignores gives no second SAE
                seen.append(kept)
                specs.append(SAESpec.build(name, **kept))
    for key, takers in taken_by.items():
        if not takers:  # each architecture that might take it refuses it as configured: its own message says why
            name = next(n for n in archs if key in possible[n])
            first = {k: sweep_values(v, k in list_valued(archs[name]))[0] for k, v in settings.items() if k in possible[name]}
            SAESpec.build(name, **first)
            raise ConfigError(f"{_option(key)} is not a setting of --arch {', '.join(archs)} as configured")
        for name in archs:
            if name not in takers:
                print(f"routesae: note: --arch {name} does not take {_option(key)} (only {', '.join(sorted(takers))} "
                      "does); it is left out of that architecture's SAEs", file=sys.stderr)
    return specs


def load_run_file(path: Path | str, *, plugins: PluginManager | None = None) -> tuple[dict[str, Any], list[SAESpec]]:
    """Read a TOML run file: a ``[train]`` table (training settings, ``out``) and one ``[sae.NAME]`` table per SAE.

    .. code-block:: toml

        [train]
        tokens = 200_000
        out = "runs/compare"

        [sae.routesae-k32]
        arch = "routesae"
        k = 32

        [sae.topk-k32]
        arch = "topk"
        k = 32
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RouteSAEError(f"run file {path} does not exist") from None
    except UnicodeDecodeError:
        raise RouteSAEError(f"run file {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise RouteSAEError(f"run file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"train", "sae"})
    if unknown:
        raise ConfigError(f"run file {path}: unknown table(s) {', '.join(unknown)}; expected [train] and [sae.NAME]")
    for section in ("train", "sae"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"run file {path}: {section} must be a table ([{section}]), not a value")
    tables = data.get("sae", {})
    if not tables:
        raise ConfigError(f"run file {path} lists no SAE; add a table such as [sae.topk] with arch = \"topk\"")
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"run file {path}: sae.{name} must be a table ([sae.{name}] with arch = \"...\"), not a value")
        table = {k.replace("-", "_"): v for k, v in table.items()}
        if "arch" not in table:
            raise ConfigError(f"run file {path}: [sae.{name}] needs an arch = \"...\" entry")
        arch = table.pop("arch")
        try:
            with activated(plugins) as pm:
                lists = list_valued(pm.get("architecture", arch))
            swept = sorted(k for k, v in table.items() if len(sweep_values(v, k in lists)) != 1)
            if swept:
                raise ConfigError(f"it sweeps {', '.join(swept)}; give one value per SAE table (an array is the "
                                  "value of a list-valued setting only)")
            (spec,) = expand_specs([arch], table, plugins=plugins)
        except RouteSAEError as e:  # a bad setting, or an architecture that is not installed
            raise ConfigError(f"run file {path}: [sae.{name}]: {e}") from None
        spec.name = check_sae_name(name)
        specs.append(spec)
    train = {k.replace("-", "_"): v for k, v in data.get("train", {}).items()}
    return train, specs
