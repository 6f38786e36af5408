"""Read the records of an offline wandb run file, so tests can check what the real client logged.

wandb writes ``run-*.wandb`` in the LevelDB log format (a 7-byte file header, 32 KiB blocks,
records split into FULL/FIRST/MIDDLE/LAST chunks, each chunk with a 7-byte header) holding
``wandb_internal_pb2.Record`` protobufs; its own Python reader was removed in 0.2x.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, LAST = 1, 4


def finished_run_records(path: Path, timeout_s: float = 20.0) -> list[pb.Record]:
    """All records, once the run's final ``exit`` record is on disk (wandb-core writes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
