"""Downstream metrics: how much splicing the reconstruction in changes the model's predictions."""

from __future__ import annotations

from typing import ClassVar

from routesae.distributed import Ranks
from routesae.metrics.base import Better, EvalBatch, Forward, Metric, RunningMean, cross_entropy_BT, kl_BT, ratio

RECOVERED_EPS = 1e-8  # the reference's epsilon in the Recovered denominator


class CrossEntropy:
    """Running sum and count of next-token cross-entropy over the scored positions of one forward."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, batch: EvalBatch, forward: str) -> None:
        ce_BT = cross_entropy_BT(batch.logits[forward], batch.input_ids_BT)
        self.total += float(ce_BT[batch.ce_mask_BT].sum())
        self.count += int(batch.ce_mask_BT.sum())

    @property
    def mean(self) -> float:
        return ratio(self.total, self.count)

    def reduce(self, ranks: Ranks) -> None:
        self.total, self.count = ranks.sum_numbers(self.total, self.count)


class KLDiv(RunningMean):
    """KL(clean || spliced) of the next-token distributions.

    Default: mean per counted position. Reference: summed over every position and divided by the
    number of sequences (the paper's scale).
    """

    name: ClassVar[str] = "kldiv"
    better: ClassVar[Better | None] = "lower"
    needs: ClassVar[frozenset[Forward]] = frozenset({"spliced"})

    def update(self, batch: EvalBatch) -> None:
        kl_BT_ = kl_BT(batch.logits["clean"], batch.logits["spliced"])
        if not batch.reference:
            self.add(batch, kl_BT_.reshape(-1))
            return
        self.total += float(kl_BT_[batch.counted_BT].sum())
        self.count += batch.input_ids_BT.shape[0]


class DeltaCE(Metric):
    """CE(spliced) − CE(clean), per-token means over the scored positions."""

    name: ClassVar[str] = "deltace"
    better: ClassVar[Better | None] = "lower"
    needs: ClassVar[frozenset[Forward]] = frozenset({"spliced"})

    def __init__(self) -> None:
        self.clean, self.spliced = CrossEntropy(), CrossEntropy()

    def update(self, batch: EvalBatch) -> None:
        self.clean.add(batch, "clean")
        self.spliced.add(batch, "spliced")

    def reduce(self, ranks: Ranks) -> None:
        self.clean.reduce(ranks)
        self.spliced.reduce(ranks)

    def result(self) -> dict[str, float]:
        return {self.name: self.spliced.mean - self.clean.mean}


class Recovered(Metric):
    """1 − (CE_spliced − CE_clean) / (CE_ablated − CE_clean + 1e-8), with zero- and mean-ablation.

    Ablation replaces exactly the positions the splice replaces: by 0 (the reference's
    ``recovered``) or by the block's mean residual over the batch's counted positions
    (``recovered_mean_ablation``, a gentler baseline).
    """

    name: ClassVar[str] = "recovered"
    better: ClassVar[Better | None] = "higher"
    needs: ClassVar[frozenset[Forward]] = frozenset({"spliced", "zero", "mean"})

    def __init__(self) -> None:
        self.ce = {forward: CrossEntropy() for forward in ("clean", "spliced", "zero", "mean")}

    def update(self, batch: EvalBatch) -> None:
        for forward, ce in self.ce.items():
            ce.add(batch, forward)

    def reduce(self, ranks: Ranks) -> None:
        for ce in self.ce.values():
            ce.reduce(ranks)

    def result(self) -> dict[str, float]:
        clean, spliced = self.ce["clean"].mean, self.ce["spliced"].mean

        def recovered(ablated: float) -> float:
            return 1 - (spliced - clean) / (ablated - clean + RECOVERED_EPS)

        return {self.name: recovered(self.ce["zero"].mean), f"{self.name}_mean_ablation": recovered(self.ce["mean"].mean)}
