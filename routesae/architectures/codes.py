"""Sparse codes: a fixed number K of active latents per token, as (values, indices), and their decode.

TopK keeps exactly k latents per token, so its fast paths never need the dense ``[N, F]`` latents:
the decode gathers the K decoder rows of each token (``embedding_bag``), whose cost and gradient
scale with K rather than with the dictionary size F. An architecture built on TopK codes
(Matryoshka TopK: nested prefixes of the dictionary) reads them from ``SAEOutput.codes`` and
decodes any subset of them the same way (``keep_NK``), or every prefix of the dictionary at once
(:meth:`SparseCodes.decode_prefixes`), at TopK's speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
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

    def decode_prefixes(self, W_dec_FD: Tensor, b_dec_D: Tensor | None, sizes: Sequence[int]) -> list[Tensor]:
        """For each m of ``sizes`` (increasing, at most F), the decode of the codes with index below m, ``[N, D]``.

        One gather for all of them, however many: each token's codes are sorted by latent index, so the
        codes of each nested group [m_{g-1}, m_g) are consecutive bags of one ``embedding_bag``, whose
        partial sums add up to the nested reconstructions; codes beyond the largest size become the
        padding index F − 1 (never below it), which the gather skips. With F as the last size, the last
        reconstruction is the whole decode. It costs about what :meth:`decode` does, where one
        :meth:`decode` per size would cost that many times as much.
        """
        N, K = self.indices_NK.shape
        padding = W_dec_FD.shape[0] - 1 if sizes[-1] < W_dec_FD.shape[0] else None  # the whole dictionary: no padding
        indices_NK, order_NK = self.indices_NK.sort(-1)
        values_NK = self.values_NK.gather(-1, order_NK)
        bounds_G = torch.as_tensor(list(sizes), device=indices_NK.device)
        below_NG = (indices_NK[:, :, None] < bounds_G).sum(1)  # each token's codes below each size
        starts_NG = torch.cat([below_NG.new_zeros(N, 1), below_NG[:, :-1]], -1)
        offsets = (starts_NG + K * torch.arange(N, device=indices_NK.device)[:, None]).reshape(-1)
        kept_NK = indices_NK if padding is None else torch.where(indices_NK < bounds_G[-1], indices_NK, padding)
        weights = values_NK.reshape(-1).to(W_dec_FD.dtype)
        groups = F.embedding_bag(kept_NK.reshape(-1), W_dec_FD, offsets, mode="sum", per_sample_weights=weights,
                                 padding_idx=padding).view(N, len(bounds_G), -1)
        first_ND, *rest = groups.unbind(1)  # one gradient buffer for all groups (indexing would fill one per group)
        prefixes = [first_ND if b_dec_D is None else first_ND + b_dec_D]
        for group_ND in rest:
            prefixes.append(prefixes[-1] + group_ND)
        return prefixes
