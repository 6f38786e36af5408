"""Atomic file writes and checked reads: readers see the old file or the whole new one, never half of one.

Every file routesae writes that a later command reads (checkpoints, manifests, records, cache shards,
the tokenised-corpus cache) goes through :func:`atomic_write`: a temp file beside the target, flushed
to disk, renamed over it, and the directory flushed too, so a power cut leaves the old file or the
new one. A writer killed mid-write leaves its temp file behind; the next writer of that file removes
it (:func:`remove_orphans`, under the writer's lock). JSON is strict: NaN and infinity are refused
rather than written as the non-JSON ``NaN``. Nothing is ever unpickled; tensors are safetensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
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
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private, a writer may recreate it: ordinary files
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename is durable only once its directory is)."""
    _fsync_file(directory)


def remove_orphans(directory: Path, names: Iterable[str]) -> None:
    """Remove the temp files a killed writer of ``names`` in ``directory`` left (call it holding their lock)."""
    for name in names:
        for orphan in [*directory.glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}"), directory / f".{name}{TEMP_SUFFIX}"]:
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


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
