"""What a latent's dashboard shows beside its contexts: how often it fires, how strongly, and what it writes.

:class:`FiringHistogram` counts, during the contexts pass, every latent's positive activations on the
counted tokens and bins their values, with tensor operations on the SAE's device: memory
``O(F × HISTOGRAM_BINS)``, one scatter per batch, no loop over latents.

The bins of a latent span ``[0, 2^e)``, ``2^e`` the smallest power of two above its largest activation
so far, in ``HISTOGRAM_BINS`` (a power of two) equal bins. When a larger activation arrives, ``e`` grows
and each new bin is the sum of ``2^shift`` old ones, exactly: an activation's bin is
``floor(v · 2^-e · bins)``, a product by powers of two that float arithmetic does exactly, so the counts
are those of binning every value at the final ``e`` at once, whatever the batching and the number of
``torchrun`` ranks (they agree on the largest ``e`` and merge their bins the same way before summing).
The last non-empty bin holds the latent's largest activation; the record keeps the bins up to it.

:class:`LogitLens` passes each latent's direction (:meth:`~routesae.SAE.latent_directions`) through
the final norm's gain and the unembedding, as logit-lens tooling does for a direction: a direction has
no per-token scale, so the norm's division by the token's RMS has nothing to act on and only its
elementwise gain applies. Our SAEs standardise each token, so a decoder row is a residual-stream
direction up to that token's scale; it is used as it is. For RouteSAE the direction is the inner
decoder's, written at whichever block the router chose; the lens reads it as if it reached the final
norm unchanged from there (the later blocks are not run).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from routesae.architectures.base import SAE
from routesae.distributed import Ranks
from routesae.lm import LanguageModel

HISTOGRAM_BINS = 32  # a power of two, so rescaling merges whole bins and binning is exact
_EMPTY = -(2**20)  # the exponent of a latent that has not fired: any real one exceeds it
_MAX_SHIFT = HISTOGRAM_BINS.bit_length()  # a larger shift leaves every old bin in bin 0 too
LENS_CHUNK = 256  # latents per [chunk, V] logit matrix


class FiringHistogram:
    """Per latent: positive activations counted (``firings``) and binned (``counts`` ``[F, bins]``); counted tokens."""

    def __init__(self, latent_size: int, device: torch.device | str) -> None:
        self.firings = torch.zeros(latent_size, dtype=torch.long, device=device)
        self.counts = torch.zeros(latent_size, HISTOGRAM_BINS, dtype=torch.long, device=device)
        self.exponent = torch.full((latent_size,), _EMPTY, dtype=torch.long, device=device)
        self.tokens = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, z_NF: Tensor, counted_N: Tensor) -> None:
        """Add a batch: latents ``[N, F]`` and which of its ``N`` tokens count (bool ``[N]``)."""
        self.tokens += counted_N.sum()
        n, f = ((z_NF > 0) & counted_N[:, None]).nonzero(as_tuple=True)
        values = z_NF[n, f].float()
        self.firings += torch.bincount(f, minlength=len(self.firings))
        exponent = self.exponent.scatter_reduce(0, f, torch.frexp(values).exponent.long(), "amax")  # v < 2^exponent
        self.rescale(exponent)
        bins = (torch.ldexp(values, -exponent[f].float()) * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
        self.counts.view(-1).index_add_(0, f * HISTOGRAM_BINS + bins, torch.ones_like(f))

    def rescale(self, exponent: Tensor) -> None:
        """Widen every latent's bins to ``[0, 2^exponent)`` (``exponent`` ≥ the current one), merging whole bins."""
        shift = (exponent - self.exponent).clamp(0, _MAX_SHIFT)
        index = torch.arange(HISTOGRAM_BINS, device=shift.device)[None] >> shift[:, None]
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, index, self.counts)
        self.exponent = exponent

    def reduce(self, ranks: Ranks) -> None:
        """Every rank's counts combined into this one's: what one process reading all batches counts."""
        exponent = self.exponent.clone()
        ranks.max_(exponent)
        self.rescale(exponent)
        ranks.sum_([self.firings, self.counts, self.tokens])

    def records(self, latents: list[int]) -> dict[int, dict[str, Any]]:
        """``{latent: {firings, frequency, histogram: {bin_width, counts}}}`` for ``latents``; counts run up to the
        bin of the largest activation (bin i holds activations in ``[i·bin_width, (i+1)·bin_width)``)."""
        index = torch.tensor(latents, dtype=torch.long)
        firings = self.firings.cpu()[index].tolist()
        counts = self.counts.cpu()[index]
        exponent = self.exponent.cpu()[index].tolist()
        tokens = int(self.tokens.sum())
        result = {}
        for latent, fired, row, e in zip(latents, firings, counts, exponent):
            filled = row.nonzero()
            last = int(filled[-1]) + 1 if len(filled) else 0
            result[latent] = {
                "firings": fired,
                "frequency": fired / tokens if tokens else 0.0,
                "histogram": {"bin_width": 2.0**e / HISTOGRAM_BINS if fired else 0.0, "counts": row[:last].tolist()},
            }
        return result


class LogitLens:
    """The ``n`` tokens each latent's direction promotes and suppresses most, through the final norm's gain and ``W_U``."""

    def __init__(self, lm: LanguageModel, texts: list[str], n: int) -> None:
        self.W_U = lm.unembedding()  # [D, V]
        self.gain = lm.final_norm_gain()
        self.texts = texts
        self.n = min(n, self.W_U.shape[1])

    def setting(self, sae: SAE) -> tuple[dict[str, Any], Tensor | None]:
        """(what the record says about the lens for ``sae``, its directions ``[F, D]`` or None when it has none)."""
        about: dict[str, Any] = {
            "tokens": self.n,
            "final_norm": "gain" if self.gain is not None else "none",
            "note": None,
        }
        if not self.n:
            about["note"] = "logit_lens is 0: no tokens asked for"
            return about, None
        directions = sae.latent_directions()
        if directions is None or tuple(directions.shape) != (sae.cfg.latent_size, self.W_U.shape[0]):
            shape = None if directions is None else list(directions.shape)
            about["note"] = (f"{sae.name} gives no [latents, d_model] directions (latent_directions() returned "
                             f"{'None' if shape is None else shape}): no logit lens")
            return about, None
        return about, directions

    @torch.no_grad()
    def logits(self, directions_KD: Tensor) -> Tensor:
        """``[K, V]`` logits of ``K`` directions: ``(direction · gain) @ W_U``, in the model's dtype, as float."""
        x_KD = directions_KD.to(self.W_U.device, self.W_U.dtype)
        if self.gain is not None:
            x_KD = x_KD * self.gain
        return (x_KD @ self.W_U).float()

    def tokens(self, directions_FD: Tensor, latents: list[int]) -> dict[int, dict[str, list[dict[str, Any]]]]:
        """``{latent: {"promoted": [...], "suppressed": [...]}}``, each ``n`` ``{token, id, logit}`` strongest first."""
        result = {}
        index = torch.tensor(latents, dtype=torch.long, device=directions_FD.device)
        for first in range(0, len(latents), LENS_CHUNK):
            logits_KV = self.logits(directions_FD.detach()[index[first : first + LENS_CHUNK]])
            top = logits_KV.topk(self.n, dim=-1)
            bottom = logits_KV.topk(self.n, dim=-1, largest=False)
            for i, latent in enumerate(latents[first : first + LENS_CHUNK]):
                result[latent] = {
                    "promoted": self._entries(top.indices[i], top.values[i]),
                    "suppressed": self._entries(bottom.indices[i], bottom.values[i]),
                }
        return result

    def _entries(self, ids: Tensor, values: Tensor) -> list[dict[str, Any]]:
        return [{"token": self.texts[i] if i < len(self.texts) else "", "id": i, "logit": v}
                for i, v in zip(ids.tolist(), values.tolist())]
