"""Gated SAE (Rajamanoharan et al. 2024a, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix W_gate (stored as ``W_enc``) serves two paths:

    h        = W_gate (x − b_dec)
    π_gate   = h + b_gate                 decides WHICH latents fire
    π_mag    = exp(r_mag) ⊙ h + b_mag     decides HOW MUCH
    z        = 1[π_gate > 0] ⊙ ReLU(π_mag),   x̂ = W_dec z + b_dec

The Heaviside has no gradient, so in the published method the gate path learns only from two
extra terms: an L1 penalty on ReLU(π_gate) and an auxiliary reconstruction of x from ReLU(π_gate)
through a *frozen* copy of the decoder (W_dec and b_dec detached, so that term trains the gate,
not the dictionary):

    loss = NMSE(x, x̂) + l1 · mean|ReLU(π_gate)| + NMSE(x, ReLU(π_gate) W_dec.detach() + b_dec.detach())

``variant="reference"`` reproduces the RouteSAE reference code instead: the same forward, but the
loss is NMSE + l1 · mean|z|, with no auxiliary term. Nothing then reaches b_gate (it stays at its
initial 0), so the gate is sign(h) and the model is a ReLU-gated magnitude SAE (docs/reference.md §3.3, §12.3).

Both variants take the L1 mean over all N·F entries, as the reference and :mod:`vanilla` do, so
``--l1`` means the same per-token weight (l1/F) for vanilla and gated in one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from routesae.architectures.base import (
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
    TrainingState,
    normalized_mse,
)
from routesae.architectures.vanilla import DEFAULT_L1, L1_HELP, check_l1, l1_penalty
from routesae.config import setting

# Shared with jumprelu: the CLI has one --variant option, so both describe both.
VARIANT_HELP = (
    "'published': the method as published; 'reference': the RouteSAE reference code's version (gated: no gate "
    "gradient, no auxiliary loss, L1 on z, b_gate never trained; jumprelu: the L0 term's step taken on the "
    "post-activation z instead of the pre-activation)."
)


@dataclass
class GatedConfig(SingleLayerConfig):
    # vanilla's default (see there), so one --l1 puts both at the same penalty. On SmolLM2 block 21 (4,096 latents,
    # 400k tokens) the published variant gave L0 800 / 498 / 186 at NMSE 0.05 / 0.10 / 0.26 for l1 = 3 / 10 / 30.
    l1: float = setting(DEFAULT_L1, L1_HELP + " Gated: on ReLU(pi_gate) (published) or on z (reference).")
    variant: Literal["published", "reference"] = setting("published", VARIANT_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_l1(self.l1)


class GatedSAE(SingleLayerSAE):
    name = "gated"
    Config: ClassVar[type[SAEConfig]] = GatedConfig
    cfg: GatedConfig
    # Latents are ReLU(π_mag) where π_gate > 0: no one value both selects and sets them, so TopK or a
    # threshold "over the pre-activations" has no single meaning here; the reference accepts and ignores them.
    supports_inference = False

    def __init__(self, cfg: GatedConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        del self.b_enc  # the two paths have their own biases
        F = cfg.latent_size
        self.b_gate = nn.Parameter(torch.zeros(F))
        self.b_mag = nn.Parameter(torch.zeros(F))
        self.r_mag = nn.Parameter(torch.zeros(F))

    def preactivations(self, x_ND: Tensor) -> Tensor:
        """h = W_gate(x − b_dec), [N, F]: both paths follow from it (:meth:`gate`, :meth:`activation`)."""
        return (x_ND - self.b_dec) @ self.W_enc.T

    def gate(self, h_NF: Tensor) -> Tensor:
        """π_gate = h + b_gate: a latent fires exactly where this is positive."""
        return h_NF + self.b_gate

    def activation(self, h_NF: Tensor) -> Tensor:
        """z = 1[π_gate > 0] ⊙ ReLU(π_mag), π_mag = exp(r_mag) ⊙ h + b_mag."""
        return torch.where(self.gate(h_NF) > 0, (h_NF * self.r_mag.exp() + self.b_mag).relu(), 0.0)

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """Published: ``l1`` on ReLU(π_gate) and the frozen-decoder ``aux``; reference: ``l1`` on z."""
        if self.cfg.variant == "reference":
            return {"l1": l1_penalty(self.cfg.l1, out.latents)}
        gate_NF = self.gate(out.pre).relu()
        aux = normalized_mse(gate_NF @ self.W_dec.detach() + self.b_dec.detach(), out.target)
        return {"l1": self.cfg.l1 * gate_NF.mean(), "aux": aux}  # l1_penalty's convention; ReLU(·) is its own |·|
