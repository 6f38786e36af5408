"""Matryoshka TopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima 2024).

A TopK SAE whose dictionary is a set of nested prefixes: besides the whole dictionary, each prefix
of the first m latents must reconstruct the input on its own, so the first latents learn the most
general features and later ones refine them. The loss adds, for each prefix size m of
``prefixes``, the NMSE of the reconstruction from the token's kept latents with index below m:

    loss = NMSE(x̂, x) + Σ_m NMSE(x̂_m, x),   x̂_m = Σ_{i ∈ topk, i < m} z_i W_dec[i] + b_dec

Built on TopK, this inherits its encoder, its sparse encoder backward and its sparse decode, and
reads the kept latents from ``SAEOutput.codes`` (k values and indices per token): each prefix's
reconstruction is a sparse decode of the codes with ``keep_NK = indices < m``, whose cost and
gradient scale with k rather than with the dictionary size. So a training step costs TopK's plus a
few k-row decodes (``benchmarks/test_plugin_speed.py`` holds it to within 10% of TopK's).

``prefixes`` is a list-valued setting: ``--prefixes '[512,2048]'`` on the command line (commas
between bracketed lists sweep), ``prefixes = [512, 2048]`` in a run file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from routesae import (
    ConfigError,
    SAEConfig,
    SAEOutput,
    SparseCodes,
    TopKConfig,
    TopKSAE,
    TrainingState,
    normalized_mse,
    setting,
)


@dataclass
class MatryoshkaConfig(TopKConfig):
    prefixes: tuple[int, ...] = setting(
        (),
        "Sizes m of the nested dictionaries, increasing, each below the latent size: the first m latents must "
        "reconstruct the input alone. Default: latent size / 4 and / 2.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = list(self.prefixes)
        if sizes != sorted(set(sizes)) or any(not 0 < m < self.latent_size for m in sizes):
            raise ConfigError(
                f"prefixes must increase strictly, each between 0 and the latent size {self.latent_size}; got {sizes}"
            )

    def prefix_sizes(self) -> tuple[int, ...]:
        """The nested dictionaries' sizes, the default ones filled in."""
        return self.prefixes or tuple(sorted({m for m in (self.latent_size // 4, self.latent_size // 2) if m > 0}))

    def name_parts(self) -> list[str]:
        parts = super().name_parts()
        return [*parts, "m" + "_".join(map(str, self.prefixes))] if self.prefixes else parts


class MatryoshkaSAE(TopKSAE):
    name = "matryoshka"
    Config: ClassVar[type[SAEConfig]] = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def prefix_reconstructions(self, out: SAEOutput) -> list[Tensor]:
        """x̂_m for each prefix size m, ``[N, D]`` each, decoded from the kept latents with index below m."""
        codes = out.codes
        if codes is None:  # an inference override or a latent edit made the latents: read them instead
            values, indices = out.latents.topk(min(self.cfg.k, out.latents.shape[-1]), dim=-1)
            codes = SparseCodes(values, indices)
        return [codes.decode(self.W_dec, self.b_dec, keep_NK=codes.indices_NK < m) for m in self.cfg.prefix_sizes()]

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """TopK's (AuxK, when on) and ``prefixes``: the sum of the nested dictionaries' NMSEs."""
        prefixes = torch.stack([normalized_mse(x_hat, out.target) for x_hat in self.prefix_reconstructions(out)])
        return {**super().loss_terms(out, state), "prefixes": prefixes.sum()}
