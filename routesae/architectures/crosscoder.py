"""Crosscoder (Lindsey et al. 2024; the RouteSAE paper's baseline, §3.7): shared latents over a layer range.

Each of the L layers has its own encoder and decoder; the latents are shared::

    x_l = standardize(h_l)                          per token and layer (docs/reference.md §2.3)
    a = Σ_l W_enc[:, l] x_l + b_enc                 one matmul: [N, L·D] @ [L·D, F]
    z = ReLU(a)            (k = 0, the reference)   or   z = ReLU(TopK_k(a))   (k > 0)
    x̂_l = z W_dec[:, l] (+ b_dec[l] if decoder_bias)
    loss = mean_{tokens, layers} NMSE(x_l, x̂_l) + l1 · mean_{tokens, latents} |z|   (l1 defaults to 0 when k > 0)

Weights are stored ``[F, L, D]`` (latent-major), so both the encoder and the decoder are a
single matmul over a free ``[F, L·D]`` view: no ``[N, L, F]`` buffer (the reference builds a
``[B, T, L, M]`` one, §12.26) and no per-step copy of the weights. ``W_dec[f, l]`` is latent
f's direction in layer l; each is kept at unit norm on its own, as the reference's per-layer
decoders are, and the base class's last-axis normalisation does exactly that.

Initialisation as the reference: each layer's encoder uses PyTorch's Linear default
U(±1/√D), the decoder is a copy (tied init per layer), then unit norm; zero biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routesae.architectures.base import SAE, MultiLayerConfig, SAEConfig, SAEOutput, TrainingState, standardize
from routesae.architectures.topk import check_k
from routesae.architectures.vanilla import DEFAULT_L1, L1_HELP, l1_penalty
from routesae.config import setting
from routesae.errors import ConfigError

# As the vanilla SAE's default, not the reference example's 0.01: on standardised inputs 0.01/latent_size per token
# leaves most latents firing on every token. Sweep it for real models (the paper reports L0 of about 46-69).


@dataclass
class CrosscoderConfig(MultiLayerConfig):
    l1: float | None = setting(
        None,
        f"{L1_HELP} Crosscoder default: {DEFAULT_L1} with k = 0, 0 with k > 0.",
    )
    k: int = setting(
        0, "Latents kept per token by TopK (0 < k < latent size); for the crosscoder 0 means ReLU + L1 (the reference)."
    )
    decoder_bias: bool = setting(
        False, "Add a learned per-layer output bias b_dec[l] (Lindsey et al.); the reference has none."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1 is None:
            self.l1 = 0.0 if self.k else DEFAULT_L1
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ConfigError(f"l1 must be a finite number >= 0, got {self.l1}")
        if self.k < 0:
            raise ConfigError(f"k must be 0 (ReLU + L1) or positive (TopK), got {self.k}")
        if self.k:
            check_k(self.k, self.latent_size)

    def name_parts(self) -> list[str]:
        span, *rest = super().name_parts()
        sparsity = f"k{self.k}" if self.k else f"l1_{self.l1:g}"
        return [span, sparsity, *rest]


class Crosscoder(SAE):
    name = "crosscoder"
    Config: ClassVar[type[SAEConfig]] = CrosscoderConfig
    cfg: CrosscoderConfig

    def __init__(self, cfg: CrosscoderConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        n_latents, n_layers = cfg.latent_size, len(cfg.resolved_layers())
        bound = 1 / math.sqrt(d_model)
        self.W_enc = nn.Parameter(torch.empty(n_latents, n_layers, d_model).uniform_(-bound, bound))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.register_parameter("b_dec", nn.Parameter(torch.zeros(n_layers, d_model)) if cfg.decoder_bias else None)
        self.normalize_decoder()

    @property
    def n_routed(self) -> int:
        return self.W_enc.shape[1]

    def preactivations(self, x_NLD: Tensor) -> Tensor:
        """Σ_l W_enc[:, l] x_l + b_enc as one [N, L·D] @ [L·D, F] matmul."""
        N = x_NLD.shape[0]
        return x_NLD.reshape(N, -1) @ self.W_enc.view(self.W_enc.shape[0], -1).T + self.b_enc

    def select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = pre_NF.topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def activation(self, pre_NF: Tensor) -> Tensor:
        if not self.cfg.k:
            return pre_NF.relu()
        values, indices = self.select(pre_NF)
        return torch.zeros_like(pre_NF).scatter(-1, indices, values)

    def encode_standardized(self, x_NLD: Tensor) -> Tensor:
        """Latents of standardised activations ``[N, L, D]`` (``out.target``)."""
        return self.sparsify(self.preactivations(x_NLD))

    def decode_standardized(self, latents_NF: Tensor) -> Tensor:
        """x̂ ``[N, L, D]`` in the standardised space."""
        x_hat = (latents_NF @ self.W_dec.view(self.W_dec.shape[0], -1)).view(-1, self.n_routed, self.d_model)
        return x_hat if self.b_dec is None else x_hat + self.b_dec

    def forward(self, acts_NLD: Tensor) -> SAEOutput:
        if acts_NLD.ndim != 3 or acts_NLD.shape[1] != self.n_routed:
            raise ValueError(
                f"crosscoder reads {self.n_routed} layers {list(self.layers)}; got input of shape {tuple(acts_NLD.shape)}"
            )
        x_NLD, norm = standardize(acts_NLD, self.cfg.normalize)
        pre_NF = self.preactivations(x_NLD)
        if not self.cfg.k or self.inference_override.active or self.latent_edit is not None:
            z_NF = self.sparsify(pre_NF)
            return SAEOutput(latents=z_NF, x_hat=self.decode_standardized(z_NF), target=x_NLD, pre=pre_NF, norm=norm)
        values, indices = self.select(pre_NF)  # sparse decode: gather only the k kept [L·D] rows
        x_hat = F.embedding_bag(indices, self.W_dec.view(self.W_dec.shape[0], -1), per_sample_weights=values, mode="sum")
        x_hat_NLD = x_hat.view(-1, self.n_routed, self.d_model)
        if self.b_dec is not None:
            x_hat_NLD = x_hat_NLD + self.b_dec
        z_NF = torch.zeros_like(pre_NF).scatter(-1, indices, values)
        return SAEOutput(latents=z_NF, x_hat=x_hat_NLD, target=x_NLD, pre=pre_NF, norm=norm)

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """``l1`` (the NMSE is per (token, layer) vector, then averaged)."""
        return {"l1": l1_penalty(self.cfg.l1, out.latents)}

    def reconstruction(self, out: SAEOutput) -> dict[int, tuple[Tensor, Tensor]]:
        """Every read block, every token."""
        x_hat = out.x_hat if out.norm is None else out.norm.undo(out.x_hat)
        mask = torch.ones(x_hat.shape[0], dtype=torch.bool, device=x_hat.device)
        return {block: (x_hat[:, i], mask) for i, block in enumerate(self.layers)}

    def decoder_directions(self) -> list[nn.Parameter]:
        return [self.W_dec]  # [F, L, D]: unit norm along D, per latent and layer
