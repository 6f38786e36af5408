"""Data-parallel training on ``torch.distributed``: this process's rank, and the few reductions the trainer needs.

``torchrun --nproc-per-node N -m routesae train ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set; :func:`join` reads them, joins the process group (``nccl`` for
CUDA, ``gloo`` for the CPU) and puts each rank on its own GPU. Without them it returns
:data:`SINGLE`, for which every reduction is a no-op, so the trainer has one code path.

What is split and what is shared (see :class:`~routesae.activations.Shard`): each rank harvests
its own language-model batches and trains on its share of every global SAE batch; the SAEs are
replicated, and each step's gradients are summed across ranks (each rank's loss weighted by its
share of the batch, so the sum is the gradient of the global batch's mean loss). Dead-latent
counters see every rank's firing, logged terms and additive statistics (RouteSAE's routing
counts) are summed before anyone reads them, and rank 0 alone writes files.

Evaluation and context extraction split the other way: each rank reads every N-th batch of the
split, and at the end the metrics' sums (:meth:`~routesae.metrics.base.Metric.reduce`) and the
context tables' candidates (:meth:`Ranks.gather_rows`) are combined, so every rank holds the result
one process would have had.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from routesae.activations import Shard
from routesae.errors import RouteSAEError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job: rank ``rank`` of ``world_size`` (one process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # whether :func:`join` started the process group (and :func:`leave` ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (checkpoints, ``run.json``, reporters): rank 0 alone."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` across ranks, in place, in one collective (they are flattened into one buffer)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
        _collective(dist.all_reduce, flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def max_(self, tensor: Tensor) -> None:
        """The elementwise maximum of ``tensor`` across ranks, in place (a bool tensor: true where any rank's is)."""
        if not self.distributed:
            return
        if tensor.dtype == torch.bool:  # the backends reduce numbers, not bools
            votes = tensor.to(torch.uint8)
            _collective(dist.all_reduce, votes, op=dist.ReduceOp.MAX)
            tensor.copy_(votes.bool())
            return
        _collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX)

    def sum_numbers(self, *values: float) -> list[float]:
        """Python numbers summed across ranks (in float64, so sums of counts stay exact)."""
        numbers = self._numbers(values)
        self.sum_([numbers])
        return numbers.tolist()

    def max_numbers(self, *values: float) -> list[float]:
        """The largest of each Python number across ranks."""
        numbers = self._numbers(values)
        self.max_(numbers)
        return numbers.tolist()

    def _numbers(self, values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device_for_collectives())

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (any number of rows, same trailing shape) concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        device = self.device_for_collectives()
        rows = torch.tensor([tensor.shape[0]], device=device)
        counts = [torch.zeros_like(rows) for _ in range(self.world_size)]
        _collective(dist.all_gather, counts, rows)
        longest = int(max(c.item() for c in counts))
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective(dist.all_gather, parts, padded)
        return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)]).to(tensor.device)

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag, true on every rank if it is true on any (a decision all ranks must take together)."""
        if not self.distributed:
            return list(flags)
        votes = torch.tensor(flags, dtype=torch.int32, device=self.device_for_collectives())
        self.max_(votes)
        return [bool(v) for v in votes.tolist()]

    def batches(self, n_batches: int, split: str) -> range:
        """The batches of a split's ``n_batches`` this rank reads (every ``world_size``-th); each rank needs one.

        Sums over batches do not depend on which rank read a batch, so evaluation and context
        extraction end with what one process reading all of them ends with.
        """
        if n_batches < self.world_size:
            raise RouteSAEError(
                f"{self.world_size} ranks cannot split {n_batches} batch(es) of the {split} split: each needs one; "
                "run fewer ranks, read more tokens (--tokens) or use a smaller --batch-size"
            )
        return range(self.rank, n_batches, self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            _collective(dist.barrier)

    def device_for_collectives(self) -> torch.device:
        """Where small tensors of a collective live: the rank's GPU under ``nccl``, else the CPU."""
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = Ranks()


class RankLost(RouteSAEError):
    """Another process of the job stopped (killed, or failed), so a collective could not complete."""


def _collective(operation: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a collective; if a peer is gone, say so in one line instead of the backend's traceback."""
    try:
        operation(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankLost(
            f"another process of this torchrun job stopped ({first_line[:160]}); this rank stops too. Checkpoints are "
            "written whole, so the run continues from its last one: the same torchrun command with --resume"
        ) from None


def writes_here() -> bool:
    """Whether this process is the one that writes and speaks for a run: the only one, or rank 0 under ``torchrun``."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets ``WORLD_SIZE``) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> tuple[Ranks, torch.device]:
    """This process's :class:`Ranks` and device; under ``torchrun``, join the process group first.

    Under ``torchrun`` a CUDA device (``--device auto`` on a GPU machine, or ``cuda``) means this
    rank's GPU, ``cuda:LOCAL_RANK``; the backend is ``nccl`` on CUDA and ``gloo`` on the CPU.
    """
    if not launched():
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    joined = not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, joined), device


@contextmanager
def joined(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """:func:`join` for the block's duration, then :func:`leave` (waiting for the other ranks if it ended well)."""
    ranks, device = join(device)
    finished = False
    try:
        yield ranks, device
        finished = True
    finally:
        leave(ranks, finished)


def leave(ranks: Ranks, finished: bool) -> None:
    """End the process group :func:`join` started (a no-op otherwise).

    After a run that ``finished`` on every rank, the ranks first wait for each other: one that tore its
    connections down while another was still closing made that one abort. After an error there is no
    waiting (a rank that died would never arrive).
    """
    if ranks.joined and dist.is_initialized():
        if finished:
            ranks.barrier()
        dist.destroy_process_group()
