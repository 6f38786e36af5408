"""The metric contract: what the evaluator hands a metric per batch, and what a metric gives back.

A metric accumulates sums and counts over batches (:meth:`Metric.update`) and turns them into
numbers at the end (:meth:`Metric.result`), so the result does not depend on how the data was
batched. It declares in :attr:`Metric.needs` which spliced forwards it reads, and the evaluator
runs each of those forwards once per SAE and batch, shared by every metric that asks for it.

Under ``torchrun`` each rank evaluates every N-th batch; before :meth:`Metric.result` the evaluator
calls :meth:`Metric.reduce` on every rank, which combines the ranks' accumulators with collectives
(``ranks.sum_numbers``, ``ranks.sum_``, ``ranks.max_``), as torchmetrics' ``dist_reduce_fx`` does.
A metric without it still evaluates in one process and is refused under ``torchrun``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from routesae.architectures.base import SAEOutput

if TYPE_CHECKING:
    from routesae.distributed import Ranks

Better = Literal["lower", "higher"]
"""Which way a metric improves; tables mark the best SAE of a column by it."""
Forward = Literal["spliced", "zero", "mean"]
"""A forward with the SAE's positions replaced by its reconstruction, by 0, or by the batch mean."""
FORWARDS: tuple[Forward, ...] = ("spliced", "zero", "mean")


@dataclass
class EvalBatch:
    """One batch as every metric of one SAE sees it (``N = B*T``, all positions, row-major)."""

    input_ids_BT: Tensor
    counted_BT: Tensor  # bool: positions that are replaced and counted (see routesae.evaluate)
    ce_mask_BT: Tensor  # bool [B, T-1]: logits at t are scored on token t+1
    reference: bool  # the reference's conventions (KL summed over positions, divided by sequences)
    out: SAEOutput  # the SAE's forward on the clean activations at all N positions
    reconstruction: dict[int, tuple[Tensor, Tensor]]  # {block: (x_hat_ND, mask_N)} in residual units
    clean: dict[int, Tensor]  # {block: clean residual [B, T, D]} for the blocks the SAE reads
    logits: dict[str, Tensor]  # "clean" and each needed Forward -> [B, T, V]

    @property
    def counted_N(self) -> Tensor:
        return self.counted_BT.reshape(-1)


class Metric:
    """Base class of every metric; a fresh instance evaluates one SAE."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[Forward]] = frozenset()
    description: ClassVar[str] = ""
    better: ClassVar[Better | None] = None  # for every value it reports; None: a property (L0), not a score

    def update(self, batch: EvalBatch) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """``{name: value}``; a metric may report companions (``recovered_mean_ablation``)."""
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """JSON-able data beside the numbers (a histogram), kept under ``eval.json``'s ``"details"``. Default: none."""
        return {}

    def reduce(self, ranks: Ranks) -> None:
        """Combine every rank's accumulators into this instance's, in place; called on every rank alike.

        Each rank has seen its own batches (at least one each); afterwards :meth:`result` must give
        what one process that saw all of them gives.
        """
        raise NotImplementedError

    @classmethod
    def reduces(cls) -> bool:
        """Whether the metric can be evaluated under ``torchrun`` (it defines :meth:`reduce`)."""
        return cls.reduce is not Metric.reduce


class RunningMean(Metric):
    """A metric that is a mean: a running ``total`` and ``count`` that ``update`` adds to.

    A metric with a value per position adds them through :meth:`add`, which also keeps the mean per routed
    block for an SAE that splices each token at one block of several (RouteSAE): its details say how well
    the tokens routed to each block are reconstructed, to set beside a TopK SAE trained at that block.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.by_block: dict[int, list[float]] = {}  # routed block -> [total, count]

    def add(self, batch: EvalBatch, values_N: Tensor) -> None:
        """Add the values at the counted positions (``values_N``: one per position, all N)."""
        counted_N = batch.counted_N
        self.total += float(values_N[counted_N].sum())
        self.count += int(counted_N.sum())
        slot_N = routed_slot_N(batch)
        if slot_N is None:
            return
        keep_N = counted_N & (slot_N >= 0)
        slots = len(batch.reconstruction)
        totals = torch.bincount(slot_N[keep_N], weights=values_N[keep_N].double(), minlength=slots).tolist()
        counts = torch.bincount(slot_N[keep_N], minlength=slots).tolist()
        for block, total, count in zip(batch.reconstruction, totals, counts):  # every block: all ranks hold the same keys
            sums = self.by_block.setdefault(block, [0.0, 0])
            sums[0] += total
            sums[1] += count

    def reduce(self, ranks: Ranks) -> None:
        blocks = sorted(self.by_block)
        self.total, self.count, *sums = ranks.sum_numbers(self.total, self.count, *(v for b in blocks for v in self.by_block[b]))
        for i, block in enumerate(blocks):
            self.by_block[block] = [sums[2 * i], sums[2 * i + 1]]

    def result(self) -> dict[str, float]:
        return {self.name: ratio(self.total, self.count)}

    def details(self) -> dict[str, Any]:
        routed = {block: sums for block, sums in sorted(self.by_block.items()) if sums[1]}  # blocks no token went to: none
        if not routed:
            return {}
        return {f"{self.name}_by_routed_block": {
            str(block): {"tokens": int(count), "mean": total / count} for block, (total, count) in routed.items()
        }}


def routed_slot_N(batch: EvalBatch) -> Tensor | None:
    """Per position, which of ``batch.reconstruction``'s blocks (its index there) a routed SAE spliced it at, -1 for
    none; None for an SAE that splices one block, or several at each position (a crosscoder)."""
    if len(batch.reconstruction) < 2:
        return None
    masks = torch.stack([mask_N for _, mask_N in batch.reconstruction.values()])  # [blocks, N]
    if (masks.sum(0) > 1).any():
        return None
    return torch.where(masks.any(0), masks.int().argmax(0), -1)


def ratio(total: float, count: float) -> float:
    return total / count if count else float("nan")


def cross_entropy_BT(logits_BTV: Tensor, input_ids_BT: Tensor) -> Tensor:
    """Next-token cross-entropy ``[B, T-1]``: logits at t scored on token t+1 (float32)."""
    logits = logits_BTV[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), input_ids_BT[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids_BT.shape[0], -1)


def kl_BT(clean_BTV: Tensor, spliced_BTV: Tensor) -> Tensor:
    """KL(P_clean || P_spliced) per position over the vocabulary, ``[B, T]`` (float32)."""
    logp = torch.log_softmax(clean_BTV.float(), -1)
    logq = torch.log_softmax(spliced_BTV.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)
