"""Matryoshka TopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima 2024).

A TopK SAE whose dictionary is a set of nested prefixes: besides the whole dictionary, each prefix
of the first m latents must reconstruct the input on its own, so the first latents learn the most
general features and later ones refine them. The loss adds, for each prefix size m of
``prefixes``, the NMSE of the reconstruction from the token's kept latents with index below m:

    loss = NMSE(x̂, x) + Σ_m NMSE(x̂_m, x),   x̂_m = Σ_{i ∈ topk, i < m} z_i W_dec[i] + b_dec

Built on TopK, this inherits its encoder and its sparse encoder backward (``encode_codes``: the
kept latents as codes, k values and indices per token) and replaces only the decode
(``encode_output``): one sparse decode of the codes (``SparseCodes.decode_prefixes``: the codes
below each size are consecutive bags of one gather) gives every nested reconstruction and the
whole one, whose cost and gradient scale with k, not with the dictionary size or the number of
prefixes. The nested reconstructions go to the loss in ``SAEOutput.extras``. So a training step
costs TopK's plus the prefixes' NMSEs (``benchmarks/test_plugin_speed.py`` holds it to within 10%
of TopK's).

``prefixes`` is a list-valued setting: ``--prefixes '[512,2048]'`` on the command line (commas
between bracketed lists sweep), ``prefixes = [512, 2048]`` in a run file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae import (
    ConfigError,
    Encoded,
    SAEConfig,
    SAEOutput,
    SparseCodes,
    TopKConfig,
    TopKSAE,
    TrainingState,
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

    def encode_output(self, x_ND: Tensor) -> Encoded:
        """TopK's encoder; then one sparse decode gives the nested reconstructions and the whole one together."""
        if self.inference_override.active or self.latent_edit is not None:
            return super().encode_output(x_ND)  # the latents are what counts: no codes
        pre_NF, codes = self.encode_codes(x_ND)
        sizes = self.cfg.prefix_sizes()
        *prefixes, x_hat_ND = codes.decode_prefixes(self.W_dec, self.b_dec, (*sizes, self.cfg.latent_size))
        extras = {f"prefix_{m}": x_hat_m for m, x_hat_m in zip(sizes, prefixes)}
        return Encoded(pre_NF, codes.dense(self.cfg.latent_size), x_hat_ND, codes, extras)

    def prefix_reconstructions(self, out: SAEOutput) -> list[Tensor]:
        """x̂_m for each prefix size m, ``[N, D]`` each: the forward's, or decoded from the latents it gave."""
        sizes = self.cfg.prefix_sizes()
        if all(f"prefix_{m}" in out.extras for m in sizes):
            return [out.extras[f"prefix_{m}"] for m in sizes]
        values, indices = out.latents.topk(min(self.cfg.k, out.latents.shape[-1]), dim=-1)  # an override or edit
        return SparseCodes(values, indices).decode_prefixes(self.W_dec, self.b_dec, sizes)

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """TopK's (AuxK, when on) and ``prefixes``: the sum of the nested dictionaries' NMSEs (as ``normalized_mse``,
        with the target's norms computed once for all of them)."""
        x_ND = out.target
        norm_N = x_ND.pow(2).mean(-1).clamp_min(torch.finfo(x_ND.dtype).tiny)
        errors = [(F.mse_loss(x_hat_ND, x_ND, reduction="none").mean(-1) / norm_N).mean()
                  for x_hat_ND in self.prefix_reconstructions(out)]
        return {**super().loss_terms(out, state), "prefixes": torch.stack(errors).sum()}
