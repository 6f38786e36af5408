"""How strongly a latent fires on held-out text: the yardstick for a steering clamp's value.

"Set latent 1234 to 20" means little without knowing that the latent, when it fires, is usually
about 3 and at most 9 on real text. A short pass over the start of the SAE's ``apply`` split (the
text contexts are taken from, never trained on) measures, for the latents asked about, how often
each fires and its typical (mean when active) and largest value, in the SAE's own latent units —
the units a clamp is written in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from routesae.activations import training_positions
from routesae.architectures.base import SAE
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel
from routesae.loading import corpus_for

SPLIT = "apply"
DEFAULT_TOKENS = 4096
BATCH = 8


@dataclass(frozen=True)
class LatentScale:
    """One latent on ``tokens`` held-out tokens: its firing rate, mean value when active, and largest value."""

    latent: int
    tokens: int
    fire_rate: float
    typical: float
    max: float

    def describe(self) -> str:
        if not self.fire_rate:
            return f"latent {self.latent}: never fired on {self.tokens:,} tokens"
        return (f"latent {self.latent}: fires on {self.fire_rate:.2%} of {self.tokens:,} tokens, typically "
                f"{self.typical:.3g} when it does, at most {self.max:.3g}")


def measure_latent_scales(
    sae: SAE, lm: LanguageModel, checkpoint: dict[str, Any] | None, latents: list[int], tokens: int = DEFAULT_TOKENS
) -> dict[int, LatentScale]:
    """Firing statistics of ``latents`` on the first ``tokens`` real tokens (position 0 excluded) of the apply split.

    ``checkpoint`` is the SAE's ``config.json``, which names the data it was trained on.
    """
    if not checkpoint or "data" not in checkpoint:
        raise RouteSAEError(
            "measuring how a latent fires needs the SAE's training data, which its config.json records: load the SAE "
            "from its checkpoint directory (routesae.load) rather than building it in memory"
        )
    blocks = corpus_for(checkpoint, lm).split(SPLIT)
    index = torch.tensor(latents, dtype=torch.long, device=lm.device)
    seen, fired = 0, torch.zeros(len(latents), device=lm.device)
    total, largest = torch.zeros(len(latents), device=lm.device), torch.full((len(latents),), -torch.inf, device=lm.device)
    with torch.no_grad():
        for ids, mask in blocks.batches(BATCH):
            if seen >= tokens:
                break
            keep = training_positions(mask, keep_bos=False)
            acts = lm.capture(ids, mask, list(sae.layers), keep=keep)
            values = sae(acts[: tokens - seen]).latents.index_select(1, index)
            active = values != 0
            fired += active.sum(0)
            total += torch.where(active, values, 0).sum(0)
            largest = torch.maximum(largest, values.amax(0))
            seen += values.shape[0]
    if not seen:
        raise RouteSAEError(f"the {SPLIT} split of {checkpoint['data']['source']} holds no tokens to measure latents on")
    return {
        latent: LatentScale(latent, seen, float(fired[i] / seen), float(total[i] / fired[i]) if fired[i] else 0.0,
                            float(largest[i]))
        for i, latent in enumerate(latents)
    }
