"""One writer at a time: an advisory lock that each command holds on what it writes.

Without it, two ``routesae train`` on one ``--out`` both succeed and one silently replaces the
other's run. A lock is ``flock`` on a small file beside what it guards (``DIR/.ROLE.lock``) that
names its holder (pid, host, start time) for the refusal message. A holder that ends, well or
with an error, removes the file; the kernel releases the flock of a process that dies, so a lock
file found free belongs to a writer that was killed, and the next writer takes it over and says
so. Roles keep writers of different files apart: ``evaluate`` may write ``eval.json`` while
``train`` checkpoints the same run (readers check that a config and its weights belong
together), but two trainers, or two evaluations of one SAE, exclude each other. Within one
process a lock is re-entrant (the pipeline holds its run while its stages take theirs).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from routesae.errors import RouteSAEError
from routesae.files import remove_orphans

LOCK_SUFFIX = ".lock"


class Busy(RouteSAEError):
    """Another process holds the lock on what this command would write."""


_held: dict[Path, int] = {}  # this process's locks: lock file -> how many blocks hold it


def lock_path(directory: Path | str, role: str) -> Path:
    return Path(directory) / f".{role}{LOCK_SUFFIX}"


def is_lock(path: Path) -> bool:
    """Whether ``path`` is one of our lock files."""
    return path.name.startswith(".") and path.name.endswith(LOCK_SUFFIX) and path.is_file()


@contextmanager
def writing(directory: Path | str, role: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the ``role`` lock on ``directory`` (created if missing) for the block; refuse if another process holds it.

    ``enabled=False`` holds nothing (under ``torchrun`` only the rank that writes takes the lock).
    A directory this call created and that holds nothing at the end is removed again, so a
    refused command leaves no empty directory behind.
    """
    if not enabled:
        yield
        return
    directory = Path(directory)
    path = lock_path(directory, role).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    created = _make_directory(directory)
    try:
        fd = _acquire(path, role)
    except BaseException:
        _remove_if_empty(directory, created)
        raise
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        path.unlink(missing_ok=True)  # before the flock goes: a writer that opened it meanwhile sees it is gone
        os.close(fd)
        _remove_if_empty(directory, created)


@contextmanager
def writing_files(directories: Iterable[Path], role: str, files: Sequence[str], *, enabled: bool = True) -> Iterator[None]:
    """Hold the ``role`` lock on each of ``directories`` (where this command writes ``files``), and remove the temp
    files a killed writer of ``files`` left there: holding the lock, no live writer owns them."""
    with ExitStack() as stack:
        for directory in dict.fromkeys(directories):
            stack.enter_context(writing(directory, role, enabled=enabled))
            if enabled:
                remove_orphans(directory, files)
        yield


def _make_directory(directory: Path) -> bool:
    """Create ``directory`` if needed; True when this call created it."""
    if directory.exists() and not directory.is_dir():
        raise RouteSAEError(f"{directory} is a file; give a directory")
    if directory.is_dir():
        return False
    directory.mkdir(parents=True)
    return True


def _remove_if_empty(directory: Path, created: bool) -> None:
    if created and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _acquire(path: Path, role: str) -> int:
    """The locked file's descriptor, with this process recorded in it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise Busy(
                f"{path.parent} is being written by another routesae {role} ({holder}); wait for it to finish or "
                "stop it, then run this again"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our flock: lock the file now at the path
    previous = _read_holder(fd)
    if previous:  # a holder's record in a free lock: that holder was killed before it could remove the file
        print(f"routesae: note: took over the {role} lock on {path.parent} from a process that was stopped "
              f"({_describe(previous)})", file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
