"""Metrics of the SAE output alone (no extra model forward), over the counted positions."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from routesae.distributed import Ranks
from routesae.metrics.base import Better, EvalBatch, Metric, RunningMean, ratio


class NormMSE(RunningMean):
    """‖x̂ − x‖² / ‖x‖² per vector, averaged, in the SAE's input space (RouteSAE: the routed vector)."""

    name: ClassVar[str] = "normmse"
    better: ClassVar[Better | None] = "lower"

    def update(self, batch: EvalBatch) -> None:
        target, x_hat = batch.out.target, batch.out.x_hat
        err = (x_hat - target).pow(2).sum(-1)
        self.add(batch, err / target.pow(2).sum(-1).clamp_min(torch.finfo(target.dtype).tiny))


def spliced_pairs(batch: EvalBatch) -> list[tuple[int, Tensor, Tensor]]:
    """(block, clean x_MD, x̂_MD) for every residual vector the splice replaces, in residual units.

    Blocks that replace nothing in this batch (a RouteSAE block no token was routed to) are left out.
    """
    pairs = []
    for block, (x_hat_ND, mask_N) in batch.reconstruction.items():
        keep_N = mask_N & batch.counted_N
        if not keep_N.any():
            continue
        x_ND = batch.clean[block].reshape(-1, x_hat_ND.shape[-1])
        pairs.append((block, x_ND[keep_N].float(), x_hat_ND[keep_N].float()))
    return pairs


class FVU(Metric):
    """Fraction of variance unexplained in the raw residual stream: Σ‖x − x̂‖² / Σ‖x − x̄‖².

    Over the replaced vectors; x̄ is each block's mean over them, so a multi-layer SAE is not
    credited for explaining the differences between blocks.
    """

    name: ClassVar[str] = "fvu"
    better: ClassVar[Better | None] = "lower"

    def __init__(self) -> None:
        self.error = 0.0
        self.sums: dict[int, tuple[Tensor, float, int]] = {}  # block -> (Σx, Σ‖x‖², n)

    def update(self, batch: EvalBatch) -> None:
        for block, (x_hat_ND, _) in batch.reconstruction.items():  # every block, so all ranks hold the same keys
            self.sums.setdefault(block, (x_hat_ND.new_zeros(x_hat_ND.shape[-1], dtype=torch.float32), 0.0, 0))
        for block, x_MD, x_hat_MD in spliced_pairs(batch):
            self.error += float((x_MD - x_hat_MD).pow(2).sum())
            sum_D, sq, n = self.sums[block]
            self.sums[block] = (sum_D + x_MD.sum(0), sq + float(x_MD.pow(2).sum()), n + x_MD.shape[0])

    def reduce(self, ranks: Ranks) -> None:
        blocks = sorted(self.sums)
        ranks.sum_([self.sums[b][0] for b in blocks])
        error, *scalars = ranks.sum_numbers(self.error, *(v for b in blocks for v in self.sums[b][1:]))
        self.error = error
        for i, b in enumerate(blocks):
            self.sums[b] = (self.sums[b][0], scalars[2 * i], int(scalars[2 * i + 1]))

    def result(self) -> dict[str, float]:
        variance = sum(sq - float(sum_D.pow(2).sum()) / n for sum_D, sq, n in self.sums.values() if n)
        return {self.name: ratio(self.error, variance)}


class Cosine(RunningMean):
    """Mean cosine similarity between x and x̂ in the raw residual stream, over the replaced vectors."""

    name: ClassVar[str] = "cosine"
    better: ClassVar[Better | None] = "higher"

    def update(self, batch: EvalBatch) -> None:
        for _, x_MD, x_hat_MD in spliced_pairs(batch):
            self.total += float(torch.nn.functional.cosine_similarity(x_MD, x_hat_MD, dim=-1).sum())
            self.count += x_MD.shape[0]


class L0(RunningMean):
    """Mean number of non-zero latents per counted token."""

    name: ClassVar[str] = "l0"

    def update(self, batch: EvalBatch) -> None:
        latents = batch.out.latents[batch.counted_N]
        self.total += float((latents != 0).sum())
        self.count += latents.shape[0]


class Dead(Metric):
    """Fraction of latents that are never non-zero on any counted token of the evaluated data.

    It counts every latent's firings, so its details are the latent density histogram that SAELens and
    Neuronpedia show: how many latents fire on a given log10 fraction of the tokens.
    """

    name: ClassVar[str] = "dead_eval"
    better: ClassVar[Better | None] = "lower"

    def __init__(self) -> None:
        self.fired_F: Tensor | None = None  # firings per latent
        self.tokens = 0

    def update(self, batch: EvalBatch) -> None:
        latents = batch.out.latents[batch.counted_N]
        fired_F = torch.count_nonzero(latents, dim=0)
        self.fired_F = fired_F if self.fired_F is None else self.fired_F + fired_F
        self.tokens += latents.shape[0]

    def reduce(self, ranks: Ranks) -> None:
        if self.fired_F is not None:  # every rank has seen a batch (the evaluator checks)
            ranks.sum_([self.fired_F])
            self.tokens = int(ranks.sum_numbers(self.tokens)[0])

    def result(self) -> dict[str, float]:
        if self.fired_F is None:
            return {self.name: float("nan")}
        return {self.name: float((self.fired_F == 0).float().mean())}

    def details(self) -> dict[str, Any]:
        if self.fired_F is None or not self.tokens:
            return {}
        return {"latent_density": density_histogram(self.fired_F, self.tokens)}


DENSITY_BINS_PER_DECADE = 4


def density_histogram(fired_F: Tensor, tokens: int) -> dict[str, Any]:
    """Latents per bin of log10(firings / tokens), quarter decades from the rarest possible firing to every token;
    the latents that never fired are counted apart (their log is -inf)."""
    bins = max(1, math.ceil(math.log10(tokens) * DENSITY_BINS_PER_DECADE))
    edges = torch.arange(-bins, 1, dtype=torch.float64) / DENSITY_BINS_PER_DECADE
    fired = fired_F[fired_F > 0].double().cpu()
    counts = torch.histogram(torch.log10(fired / tokens), bins=edges).hist if len(fired) else torch.zeros(len(edges) - 1)
    return {
        "tokens": tokens,
        "log10_edges": [round(float(e), 4) for e in edges],
        "latents": [int(c) for c in counts],
        "never_fired": int((fired_F == 0).sum()),
    }
