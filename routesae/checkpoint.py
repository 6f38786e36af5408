"""SAE checkpoints: ``<dir>/config.json`` + ``<dir>/weights.safetensors``, written atomically.

``config.json`` holds everything needed to rebuild the SAE without repeating hyper-parameters
on the command line (architecture, its config, the model and layers it reads, the data it was
trained on). Nothing is ever unpickled: weights are safetensors, optimizer state too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import routesae
from routesae.architectures.base import SAE
from routesae.errors import RouteSAEError
from routesae.plugins import get_plugin_manager

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TRAINER_STATE_FILE = "trainer_state.safetensors"


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` into a temp file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; checkpoints are ordinary files
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: readers see the old file or the whole new one."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RouteSAEError(f"{path} is not valid JSON ({e}); the file is damaged") from None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_sae(sae: SAE, directory: Path, meta: dict[str, Any]) -> None:
    """Write weights first, then the config: a directory with a config always has its weights."""
    write_safetensors(directory / WEIGHTS_FILE, sae.state_dict())
    config = {
        "format_version": FORMAT_VERSION,
        "routesae_version": routesae.__version__,
        "architecture": sae.name,
        "config": sae.cfg.to_dict(),
        "d_model": sae.d_model,
        "layers": list(sae.layers),
        **meta,
    }
    write_json(directory / CONFIG_FILE, config)


def read_sae_config(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise RouteSAEError(
            f"{directory} holds no SAE checkpoint (no {CONFIG_FILE}); pass a directory written by `routesae train`"
        )
    config = read_json(directory / CONFIG_FILE)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise RouteSAEError(
            f"{directory} was written by a newer routesae ({config.get('routesae_version')}); upgrade routesae"
        )
    return config


def load_sae(directory: Path, device: str | torch.device = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Rebuild an SAE from its directory; returns (sae in eval mode, its config.json)."""
    directory = Path(directory)
    config = read_sae_config(directory)
    arch = get_plugin_manager().get("architecture", config["architecture"])
    sae = arch(arch.Config.from_dict(config["config"]), config["d_model"])
    if not (directory / WEIGHTS_FILE).is_file():
        raise RouteSAEError(f"{directory} has a config but no {WEIGHTS_FILE}; the checkpoint is incomplete")
    try:
        sae.load_state_dict(load_file(directory / WEIGHTS_FILE))
    except RuntimeError as e:
        raise RouteSAEError(f"{directory}/{WEIGHTS_FILE} does not match its config: {e}") from None
    return sae.to(device).eval(), config


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
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
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
