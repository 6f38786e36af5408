"""TopK SAE (Gao et al. 2024) as in the RouteSAE reference: keep each token's k largest pre-activations.

The reference keeps the selected values signed (no ReLU); ``relu=True`` gives Gao et al.'s
variant. The decode gathers only the k selected decoder rows (``embedding_bag``), so its cost
and its gradient scale with k, not with the dictionary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import SAEConfig, SingleLayerConfig, SingleLayerSAE
from routesae.config import setting
from routesae.errors import ConfigError


def check_k(k: int, latent_size: int) -> None:
    """The k of any top-k style architecture must leave some latents unselected."""
    if not 0 < k < latent_size:
        raise ConfigError(f"k must satisfy 0 < k < latent size; got k={k}, latent size {latent_size}")


def name_parts_with_k(parts: list[str], k: int) -> list[str]:
    """Insert ``k{k}`` after the layer tag: ``["L21", "k32", "F4096"]``."""
    return [parts[0], f"k{k}", *parts[1:]]


@dataclass
class TopKConfig(SingleLayerConfig):
    k: int = setting(32, "Latents kept per token (0 < k < latent size).")
    relu: bool = setting(False, "Apply ReLU to the kept values (Gao et al.); the reference keeps them signed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.latent_size)

    def name_parts(self) -> list[str]:
        return name_parts_with_k(super().name_parts(), self.k)


class TopKSAE(SingleLayerSAE):
    name = "topk"
    Config: ClassVar[type[SAEConfig]] = TopKConfig
    cfg: TopKConfig

    def select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) of the kept latents, [N, k] each."""
        values, indices = pre_NF.topk(self.cfg.k, dim=-1, sorted=False)
        return (values.relu() if self.cfg.relu else values), indices

    def activation(self, pre_NF: Tensor) -> Tensor:
        values, indices = self.select(pre_NF)
        return torch.zeros_like(pre_NF).scatter(-1, indices, values)

    def encode_decode(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.preactivations(x_ND)
        values, indices = self.select(pre)
        x_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        return torch.zeros_like(pre).scatter(-1, indices, values), x_hat
