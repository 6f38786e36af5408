"""The built-in architectures in SAELens's format, both ways: vanilla = ``standard``, topk = ``topk`` (ReLU'd
only), jumprelu = ``jumprelu``, gated = ``gated``. Registered by the built-in architectures' plugin."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from routesae.architectures.base import SAE
from routesae.errors import RouteSAEError
from routesae.interop.saelens import SAELensExporter

# routesae_exact.safetensors's log θ belongs to the SAELens θ beside it if exp gives θ back to within this
# relative error (a few float32 ulps: exp may round differently on another CPU); a θ edited since is another θ.
EXP_AGREEMENT = 4 * torch.finfo(torch.float32).eps


class VanillaToSAELens(SAELensExporter):
    """z = ReLU(W_enc(x − b_dec) + b_enc): SAELens's ``standard`` SAE, tensor for tensor."""

    architecture = "vanilla"
    saelens_architecture = "standard"


class TopKToSAELens(SAELensExporter):
    """TopK with ``relu``: SAELens's ``topk``, which always applies ReLU to the k kept values."""

    architecture = "topk"
    saelens_architecture = "topk"

    def check(self, sae: SAE) -> None:
        if not sae.cfg.relu:
            raise RouteSAEError(
                "this TopK SAE keeps its k largest pre-activations signed (relu=False, the RouteSAE reference's "
                "choice), while SAELens's topk applies ReLU to them (and its abstopk ranks by magnitude): no SAELens "
                "architecture computes it. Train with --relu to export to SAELens"
            )

    def fields(self, sae: SAE) -> dict[str, Any]:
        return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}

    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise RouteSAEError(
                "rescale_acts_by_decoder_norm is true: the SAE ranks pre-activations scaled by its decoder norms, "
                "which routesae's TopK does not do; only topk SAEs with rescale_acts_by_decoder_norm false are supported"
            )
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int):
            raise RouteSAEError(f"topk needs an integer k, got {k!r}")
        return {"k": k, "relu": True}


class JumpReLUToSAELens(SAELensExporter):
    """z = pre · 1[pre > θ], θ = exp(log θ) > 0: SAELens's ``jumprelu`` (ReLU(pre) · 1[pre > θ], the same for θ ≥ 0)."""

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    tensors = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

    def to_saelens(self, sae: SAE) -> dict[str, Tensor]:
        return {**super().to_saelens(sae), "threshold": sae.log_threshold.detach().exp()}

    def exact_tensors(self, sae: SAE) -> dict[str, Tensor]:
        return {"log_threshold": sae.log_threshold.detach().clone()}

    def from_saelens(self, tensors: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, Tensor]:
        """log θ from routesae_exact.safetensors when it gives this θ, else log θ (θ ≤ 0 acts as 0 here and in SAELens)."""
        theta_F = tensors["threshold"]
        log_theta_F = exact.get("log_threshold")
        if log_theta_F is None or not _gives(log_theta_F, theta_F):
            log_theta_F = theta_F.double().clamp_min(0).log().to(theta_F.dtype)
        return {**super().from_saelens(tensors, exact), "log_threshold": log_theta_F}


def _gives(log_theta_F: Tensor, theta_F: Tensor) -> bool:
    return log_theta_F.shape == theta_F.shape and bool(
        torch.isclose(log_theta_F.exp(), theta_F, rtol=EXP_AGREEMENT, atol=0).all()
    )


class GatedToSAELens(SAELensExporter):
    """The Gated SAE: SAELens's ``gated``, tensor for tensor (both variants; they differ only in training)."""

    architecture = "gated"
    saelens_architecture = "gated"
    shared = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")
    tensors = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")

    def fold_input_bias(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The gate path's bias takes b_dec W_enc, the magnitude path's b_dec (W_enc ⊙ exp(r_mag))."""
        shift_F = tensors["b_dec"].double() @ tensors["W_enc"].double()
        mag_shift_F = shift_F * tensors["r_mag"].double().exp()
        return {
            **tensors,
            "b_gate": (tensors["b_gate"].double() + shift_F).to(tensors["b_gate"].dtype),
            "b_mag": (tensors["b_mag"].double() + mag_shift_F).to(tensors["b_mag"].dtype),
        }


BUILTIN_SAELENS_EXPORTERS: tuple[type[SAELensExporter], ...] = (
    VanillaToSAELens,
    TopKToSAELens,
    JumpReLUToSAELens,
    GatedToSAELens,
)
