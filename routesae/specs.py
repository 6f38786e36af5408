"""Which SAEs a run trains: architectures × settings (with sweeps), from the CLI or a TOML run file.

``--k 32,64,128 --arch routesae --arch topk`` is six SAEs trained from one harvest: every
comma-separated setting is swept, and each setting goes to every listed architecture that takes
it. A setting that none of them takes is an error, never silently ignored.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routesae.architectures.base import SAEConfig
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


def _expand(pm: PluginManager, architectures: list[str], settings: dict[str, Any]) -> list[SAESpec]:
    archs = {name: pm.get("architecture", name) for name in dict.fromkeys(architectures)}
    accepted = {name: arch.setting_names() for name, arch in archs.items()}
    for key in settings:
        if not any(key in names for names in accepted.values()):
            options = ", ".join(sorted({_option(n) for names in accepted.values() for n in names}))
            raise ConfigError(f"{_option(key)} is not a setting of --arch {', '.join(archs)}; their settings: {options}")
    specs = []
    for name in archs:
        own = {k: v if isinstance(v, list) else [v] for k, v in settings.items() if k in accepted[name]}
        for values in itertools.product(*own.values()):
            specs.append(SAESpec.build(name, **dict(zip(own, values))))
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
        swept = sorted(k for k, v in table.items() if isinstance(v, list))
        if swept:
            raise ConfigError(f"run file {path}: [sae.{name}] sweeps {', '.join(swept)}; give one value per SAE table")
        try:
            (spec,) = expand_specs([arch], table, plugins=plugins)
        except RouteSAEError as e:  # a bad setting, or an architecture that is not installed
            raise ConfigError(f"run file {path}: [sae.{name}]: {e}") from None
        spec.name = check_sae_name(name)
        specs.append(spec)
    train = {k.replace("-", "_"): v for k, v in data.get("train", {}).items()}
    return train, specs
