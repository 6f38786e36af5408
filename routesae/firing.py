"""The dead-latent counter: training tokens since each latent last fired.

One counter per trained SAE, kept by the trainer on the SAE's device (updating it never waits for
the device) and checkpointed with the optimiser state. It serves both uses of "dead": the
``dead_fraction`` statistic of a run, and losses that act on dead latents (TopK's AuxK), which
receive its mask through :class:`~routesae.architectures.base.TrainingState`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FiringCounter:
    """Per latent, the training tokens seen since it last fired; dead after ``dead_after_tokens`` of them."""

    def __init__(self, latent_size: int, dead_after_tokens: int, device: torch.device | str = "cpu") -> None:
        self.dead_after_tokens = dead_after_tokens
        self.tokens_since_fired = torch.zeros(latent_size, dtype=torch.long, device=device)

    def update(self, latents_NF: Tensor) -> None:
        """Age every latent by this batch's tokens; reset those that fired on any of them."""
        self.update_fired(latents_NF.any(0), latents_NF.shape[0])

    def update_fired(self, fired_F: Tensor, tokens: int) -> None:
        """Age every latent by ``tokens``; reset those in ``fired_F`` (a batch's firing, e.g. gathered over ranks)."""
        self.tokens_since_fired.add_(tokens).masked_fill_(fired_F, 0)

    def dead(self) -> Tensor:
        """``[F]`` bool: latents that have not fired for ``dead_after_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_after_tokens

    def dead_fraction(self) -> Tensor:
        """The share of dead latents, a 0-d tensor on the counter's device (read it back when reporting)."""
        return self.dead().float().mean()
