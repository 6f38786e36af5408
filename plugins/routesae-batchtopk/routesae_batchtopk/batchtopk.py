"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k×N largest ReLU'd pre-activations of a whole batch of N tokens instead of
k per token, so tokens get a variable number of latents (mean k) and hard tokens can use more.
That rule depends on the batch, so inference uses a JumpReLU with one global threshold θ,
``z = pre * (pre > θ)``, where θ estimates the smallest activation training kept.

θ rule. Each train-mode ``forward`` notes its batch threshold, the smallest kept value (the
k×N-th largest ReLU'd pre-activation; 0 when fewer than k×N are positive). ``after_step`` folds
what was noted since the last step (the mean, if several forwards ran, e.g. gradient
accumulation) into θ with weight ``max(1/t, 1 - m)``, t counting updates and m the
``threshold_momentum``: a plain running mean for the first 1/(1-m) steps, an exponential moving
average after. So the first batch sets θ outright and, unlike an EMA seeded with it (as in
dictionary_learning, which skips the first 1,000 steps for that reason) or seeded with 0 (as in
SAELens), early batches from a barely trained encoder weigh no more than any other. Updating in
``after_step`` rather than in ``forward`` means a forward whose step is skipped (NaN guard) or an
analysis call never moves θ on its own; non-finite batch thresholds are ignored.

θ and its update count are buffers, so they are in ``state_dict()`` and in checkpoints. Until
one update happened (count 0) eval mode has no θ to use and falls back to the training rule
(batch top-k×N), so an uncalibrated SAE is never dense.

Why not subclass ``TopKSAE``: its per-token ``select`` returns exactly k per row and its config
has a ``relu`` switch for signed values; BatchTopK has neither, always applying ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import SAEConfig, SAEOutput, SingleLayerConfig, SingleLayerSAE, TrainingState
from routesae.architectures.topk import check_k, name_parts_with_k
from routesae.config import setting
from routesae.errors import ConfigError


@dataclass
class BatchTopKConfig(SingleLayerConfig):
    k: int = setting(
        32,
        "Mean latents per token: training keeps the k×N largest activations of a batch of N tokens "
        "(0 < k < latent size).",
    )
    threshold_momentum: float = setting(
        0.999,
        "Weight of the old value in the moving average that estimates the inference threshold from each "
        "batch's smallest kept activation, 0 < m < 1; the first 1/(1-m) steps are a plain running mean.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.latent_size)
        if not 0.0 < self.threshold_momentum < 1.0:
            raise ConfigError(f"threshold_momentum must be strictly between 0 and 1, got {self.threshold_momentum}")

    def name_parts(self) -> list[str]:
        return name_parts_with_k(super().name_parts(), self.k)


class BatchTopKSAE(SingleLayerSAE):
    name = "batchtopk"
    Config: ClassVar[type[SAEConfig]] = BatchTopKConfig
    cfg: BatchTopKConfig
    threshold: Tensor  # scalar θ used in eval mode
    threshold_count: Tensor  # number of after_step updates folded into θ

    def __init__(self, cfg: BatchTopKConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_count", torch.zeros((), dtype=torch.long))
        self._pending_sum: Tensor | None = None  # batch thresholds noted since the last step
        self._pending_n: Tensor | None = None

    @property
    def calibrated(self) -> bool:
        """Whether θ has been estimated by at least one training step."""
        return bool(self.threshold_count > 0)

    # -- the two activation rules ----------------------------------------------------------------
    def batch_topk(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(values, flat indices into the N×F batch) of the k×N largest ReLU'd pre-activations."""
        values, flat_idx = pre_NF.relu().flatten().topk(self.cfg.k * pre_NF.shape[0], sorted=False)
        return values, flat_idx

    def jumprelu(self, pre_NF: Tensor) -> Tensor:
        """pre * (pre > θ), written as a select so that dropped latents are +0, never -0."""
        return torch.where(pre_NF > self.threshold.to(pre_NF.dtype), pre_NF, 0.0)

    def _use_threshold(self) -> bool:
        return not self.training and self.calibrated

    def activation(self, pre_NF: Tensor) -> Tensor:
        if self._use_threshold():
            return self.jumprelu(pre_NF)
        values, flat_idx = self.batch_topk(pre_NF)
        return torch.zeros_like(pre_NF).flatten().scatter(0, flat_idx, values).view_as(pre_NF)

    def activate_decode(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        if self._use_threshold():
            z_NF = self.jumprelu(pre_NF)
            return z_NF, self.decode_standardized(z_NF)
        values, flat_idx = self.batch_topk(pre_NF)
        if self.training:
            self._note_batch_threshold(values)
        N, n_latents = pre_NF.shape
        z_NF = torch.zeros_like(pre_NF).flatten().scatter(0, flat_idx, values).view(N, n_latents)
        # Sparse decode: gather only the k×N kept decoder rows, one bag per token (bags may be empty).
        flat_idx, order = flat_idx.sort()
        token, latent = flat_idx // n_latents, flat_idx % n_latents
        counts = torch.bincount(token, minlength=N)
        offsets = counts.cumsum(0) - counts
        x_hat = F.embedding_bag(latent, self.W_dec, offsets, mode="sum", per_sample_weights=values[order])
        return z_NF, x_hat + self.b_dec

    # -- θ ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _note_batch_threshold(self, kept_values: Tensor) -> None:
        batch_threshold = kept_values.detach().min().float()
        finite = torch.isfinite(batch_threshold)
        add = torch.where(finite, batch_threshold, torch.zeros_like(batch_threshold))
        if self._pending_sum is None or self._pending_n is None:
            self._pending_sum, self._pending_n = add, finite.float()
        else:
            self._pending_sum, self._pending_n = self._pending_sum + add, self._pending_n + finite.float()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Fold the batch thresholds noted since the last step into θ (no host sync)."""
        if self._pending_sum is None or self._pending_n is None:
            return
        seen = self._pending_n > 0
        batch_threshold = self._pending_sum / self._pending_n.clamp_min(1.0)
        count = self.threshold_count + seen.long()
        weight = (1.0 / count.clamp_min(1).float()).clamp_min(1.0 - self.cfg.threshold_momentum)
        theta = self.threshold.float()
        new = (theta + weight * (batch_threshold - theta)).to(self.threshold.dtype)
        self.threshold.copy_(torch.where(seen, new, self.threshold))
        self.threshold_count.copy_(count)
        self._pending_sum = self._pending_n = None

    def diagnostics(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """θ as this step found it (a copy: ``after_step`` moves θ before the trainer reads the terms)."""
        return {"threshold": self.threshold.detach().clone()}
