"""Sparse codes: a fixed number K of active latents per token, as (values, indices), and their decode.

TopK keeps exactly k latents per token, so its fast paths never need the dense ``[N, F]`` latents:
the decode gathers the K decoder rows of each token (``embedding_bag``), whose cost and gradient
scale with K rather than with the dictionary size F. An architecture built on TopK codes
(Matryoshka TopK: nested prefixes of the dictionary) reads them from ``SAEOutput.codes`` and
decodes any subset of them the same way (``keep_NK``), at TopK's speed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class SparseCodes(NamedTuple):
    """K active latents per token: ``values_NK`` (their activations) and ``indices_NK`` (long, which latents)."""

    values_NK: Tensor
    indices_NK: Tensor

    def dense(self, latent_size: int) -> Tensor:
        """The latents as ``[N, F]``, zeros where inactive."""
        zeros_NF = self.values_NK.new_zeros(self.values_NK.shape[0], latent_size)
        return zeros_NF.scatter(-1, self.indices_NK, self.values_NK)

    def decode(self, W_dec_FD: Tensor, b_dec_D: Tensor | None = None, keep_NK: Tensor | None = None) -> Tensor:
        """Σ_k v_k · W_dec[i_k] (+ b_dec) per token, ``[N, D]``, from the K decoder rows of each token only.

        ``keep_NK`` (bool) decodes only those codes, e.g. ``indices_NK < m`` for the first m latents.
        Differentiable in the values and in ``W_dec_FD`` (whose gradient touches only the gathered rows).
        """
        weights_NK = self.values_NK.to(W_dec_FD.dtype)  # bf16 under autocast; embedding_bag wants the table's dtype
        if keep_NK is not None:
            weights_NK = weights_NK * keep_NK
        x_hat_ND = F.embedding_bag(self.indices_NK, W_dec_FD, per_sample_weights=weights_NK, mode="sum")
        return x_hat_ND if b_dec_D is None else x_hat_ND + b_dec_D
