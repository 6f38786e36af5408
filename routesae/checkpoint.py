"""SAE checkpoints: ``<dir>/config.json`` + ``<dir>/weights.safetensors``, written atomically.

``config.json`` holds everything needed to rebuild the SAE without repeating hyper-parameters
on the command line (architecture, its config, the model and layers it reads, the data it was
trained on) and which plugin distributions (and versions) provided its architecture, router,
aggregation and inner SAE, so that loading it where one is missing says what to install.
Nothing is ever unpickled: weights are safetensors, optimizer state too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from routesae.architectures.base import SAE
from routesae.errors import PluginError, RouteSAEError, reading
from routesae.files import read_json, write_json, write_safetensors
from routesae.interop.saelens import SAELENS_WEIGHTS
from routesae.interop.saelens_read import is_saelens_dir, read_saelens_config, read_saelens_weights
from routesae.plugins import PluginManager, activated, get_plugin_manager
from routesae.rundir import CONFIG_FILE, WEIGHTS_FILE
from routesae.version import __version__

FORMAT_VERSION = 1
CHECKPOINT_ID = "checkpoint_id"
REQUIRED_KEYS = ("architecture", "config", "d_model")  # what rebuilding an SAE needs from config.json


def save_sae(sae: SAE, directory: Path, meta: dict[str, Any]) -> None:
    """Write weights first, then the config: a directory with a config always has its weights.

    Both carry one random ``checkpoint_id``, so a reader can tell a config and weights written
    together from a pair caught while a training run replaces them (:func:`read_weights`).
    """
    checkpoint_id = uuid.uuid4().hex
    write_safetensors(directory / WEIGHTS_FILE, sae.state_dict(), {CHECKPOINT_ID: checkpoint_id})
    config = {
        "format_version": FORMAT_VERSION,
        "routesae_version": __version__,
        CHECKPOINT_ID: checkpoint_id,
        "architecture": sae.name,
        "config": sae.cfg.to_dict(),
        "d_model": sae.d_model,
        "layers": meta["layers"] if "layers" in meta else list(sae.layers),  # a part of a routed SAE reads no block
        "plugins": plugin_provenance(sae),
        **meta,
    }
    write_json(directory / CONFIG_FILE, config)


def plugin_provenance(sae: SAE) -> list[dict[str, Any]]:
    """``[{kind, name, distribution, version}]`` for each plugin ``sae`` is built from, as the manager in use has them."""
    pm = get_plugin_manager()
    return [pm.provenance(kind, name) for kind, name in sae.plugins_used()]


def require_plugins(directory: Path, config: dict[str, Any], pm: PluginManager) -> None:
    """Refuse to rebuild an SAE whose plugins are not installed, naming the package (and version) that provided each."""
    needed = config.get("plugins") or [{"kind": "architecture", "name": config["architecture"]}]
    for record in needed:
        kind, name = record.get("kind"), record.get("name")
        if kind not in pm.registries or name in pm.names(kind):
            continue
        distribution, version = record.get("distribution"), record.get("version")
        if distribution is None:
            where = "its provider was not recorded"
        elif distribution.startswith("("):  # "(registered in code)": a plugin object, not a package
            where = "it was registered in code, not installed from a package: register that plugin again"
        else:
            pinned = f"{distribution}=={version}" if version else distribution
            where = f"it came from {distribution} {version or ''}".rstrip() + f", which is not installed here: pip install '{pinned}'"
        installed = ", ".join(pm.names(kind)) or "none"
        raise PluginError(
            f"unknown {kind} {name!r}: {directory} was built with it; {where} (installed {kind}s: {installed})"
            f"{pm.load_failures()}"
        )


def read_sae_config(directory: Path) -> dict[str, Any]:
    """``config.json``, checked; a SAELens directory's is made from its ``cfg.json`` (:mod:`routesae.interop.saelens_read`)."""
    directory = Path(directory)
    if is_saelens_dir(directory):
        return read_saelens_config(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise RouteSAEError(
            f"{directory} holds no SAE checkpoint (no {CONFIG_FILE}); pass a directory written by `routesae train` "
            "or a SAELens directory (cfg.json)"
        )
    config = read_json(directory / CONFIG_FILE)
    missing = [key for key in REQUIRED_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise RouteSAEError(
            f"{directory / CONFIG_FILE} is not a routesae checkpoint config (no {', '.join(missing)}); pass a "
            "directory written by `routesae train`, or restore the file"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise RouteSAEError(
            f"{directory} was written by a newer routesae ({config.get('routesae_version')}); upgrade routesae"
        )
    return config


def load_sae(
    directory: Path, device: str | torch.device = "cpu", *, plugins: PluginManager | None = None
) -> tuple[SAE, dict[str, Any]]:
    """Rebuild an SAE from its directory; returns (sae in eval mode, its config.json).

    A SAELens directory (``cfg.json`` and no ``config.json``) gives the routesae SAE that computes the same thing.
    ``plugins``: the plugin manager whose architectures (and routers, ...) rebuild it (default: the one in use).
    """
    directory = Path(directory)
    with activated(plugins) as pm:
        config = read_sae_config(directory)
        require_plugins(directory, config, pm)
        arch = pm.get("architecture", config["architecture"])
        saelens = is_saelens_dir(directory)
        weights = read_saelens_weights(directory, config) if saelens else read_weights(directory, config)
        settings, state = arch.upgrade(config["config"], weights)
        sae = arch(arch.Config.from_dict(settings), config["d_model"])
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise RouteSAEError(f"{directory}/{SAELENS_WEIGHTS if saelens else WEIGHTS_FILE} does not match its config: {e}") from None
    sae.checkpoint = config
    return sae.to(device).eval(), config


def load(directory: Path | str, device: str | torch.device = "cpu", *, plugins: PluginManager | None = None) -> SAE:
    """The SAE in ``directory``, in eval mode, its ``config.json`` on ``sae.checkpoint`` (model, layers, data, training).

    ``routesae.load(path)``, as SAELens 6's ``SAE.from_pretrained`` returns the SAE alone;
    :func:`load_sae` returns the pair.

    >>> sae = routesae.load("runs/demo/topk-L21-k32-F4096")
    >>> sae.checkpoint["hooks"]
    ['blocks.21.hook_resid_post']
    """
    return load_sae(Path(directory), device, plugins=plugins)[0]


def read_weights(directory: Path, config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in ``directory``'s weights file, checked to belong to ``config`` (its ``config.json``)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise RouteSAEError(f"{directory} has a config but no {WEIGHTS_FILE}; the checkpoint is incomplete")
    damaged = "the file is damaged or truncated; train the SAE again (or resume its run)"
    with reading(str(path), damaged), safe_open(path, "pt", device=str(device)) as f:
        written_with = (f.metadata() or {}).get(CHECKPOINT_ID)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = config.get(CHECKPOINT_ID)
    if expected is not None and written_with is not None and expected != written_with:
        raise RouteSAEError(
            f"{path} and its {CONFIG_FILE} belong to different checkpoints: a training run is replacing them; "
            "try again in a moment (or resume the run if it was killed, which repairs them)"
        )
    return tensors


def save_optimizer(
    optimizer: torch.optim.Optimizer, path: Path, step: int, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Adam moments (and ``extra`` tensors) as safetensors; param groups and step in its metadata."""
    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    metadata = {"param_groups": json.dumps(state["param_groups"]), "step": str(step)}
    write_safetensors(path, tensors, metadata)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore what :func:`save_optimizer` wrote; returns (the step it was saved at, the extra tensors)."""
    damaged = "the checkpoint is damaged; resume from an intact run or train again with --overwrite"
    with reading(str(path), damaged), safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        section, rest = key.split(".", 1)
        if section == "extra":
            extra[rest] = value
        else:
            index, name = rest.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["step"]), extra
