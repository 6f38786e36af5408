"""BatchTopK in SAELens's format: at inference it is a JumpReLU with one threshold θ for every latent.

An architecture's plugin registers its exporters too (``register_exporters``). SAELens's
``jumprelu`` computes ReLU(pre)·1[pre > θ_i] per latent, which is BatchTopK's pre·1[pre > θ] when every
θ_i is the calibrated θ ≥ 0. A foreign ``jumprelu`` still reads back as routesae's JumpReLU
(``primary = False``); a directory this exporter wrote names ``batchtopk`` in its routesae metadata and
reads back as a BatchTopK SAE, its update count from ``routesae_exact.safetensors``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from routesae.architectures.base import SAE
from routesae.errors import RouteSAEError
from routesae.interop.saelens import SAELensExporter


class BatchTopKToSAELens(SAELensExporter):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    primary = False
    tensors = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

    def check(self, sae: SAE) -> None:
        if not sae.calibrated:
            raise RouteSAEError(
                "this BatchTopK SAE has no inference threshold yet (no training step estimated it), and SAELens has "
                "no batch rule to fall back to; train it first"
            )
        if float(sae.threshold) < 0:
            raise RouteSAEError(f"its threshold {float(sae.threshold)} is negative; SAELens's jumprelu applies ReLU first")

    def to_saelens(self, sae: SAE) -> dict[str, Tensor]:
        theta_F = sae.threshold.detach().to(sae.W_enc.dtype).expand(sae.cfg.latent_size).contiguous()
        return {**super().to_saelens(sae), "threshold": theta_F}

    def exact_tensors(self, sae: SAE) -> dict[str, Tensor]:
        return {"threshold_count": sae.threshold_count.detach().clone()}

    def from_saelens(self, tensors: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, Tensor]:
        theta_F = tensors["threshold"]
        if not bool((theta_F == theta_F[0]).all()):
            raise RouteSAEError("a BatchTopK SAE has one threshold for every latent; this SAELens SAE has several")
        count = exact.get("threshold_count", torch.ones((), dtype=torch.long))
        return {**super().from_saelens(tensors, exact), "threshold": theta_F[0].clone(), "threshold_count": count}
