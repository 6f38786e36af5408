"""Atomic file writes and checked reads: readers see the old file or the whole new one, never half of one.

Every file routesae writes that a later command reads (checkpoints, manifests, records, cache shards,
the tokenised-corpus cache) goes through :func:`atomic_write`: a temp file beside the target, renamed
over it. Nothing is ever unpickled; tensors are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from routesae.errors import RouteSAEError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write via ``write(tmp_path)`` into a temp file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; these are ordinary files
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
    """Write ``text`` (UTF-8) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_sha256(path: Path) -> str:
    """A file's checksum (cache manifests record one per shard and ``verify`` compares them)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
