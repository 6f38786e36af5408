"""A miniature of the trainer's loop on synthetic data, for architecture tests that need a trained SAE."""

from collections.abc import Callable

import torch
from torch import Tensor

from routesae.architectures.base import TrainingState
from routesae.firing import FiringCounter


def low_rank(n: int, d: int, rank: int = 4, seed: int = 0) -> Callable[[], Tensor]:
    """A sampler of random rank-``rank`` data in ``d`` dimensions (plus a little noise), shaped [n, 1, d]."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    return lambda: (torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, d, generator=g))[:, None]


def train_steps(
    sae, sample: Callable[[], Tensor], steps: int = 300, lr: float = 3e-3, on_step=None, dead_after_tokens: int = 100_000
):
    """Adam, renormalise every 10 steps, after_step: returns (losses, the last step's logged terms).

    As the trainer does, a :class:`FiringCounter` (dead after ``dead_after_tokens``) gives each
    step's loss the latents dead before it. ``on_step(step, out)``, if given, sees each step's SAE
    output (e.g. to record which latents fire).
    """
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    firing = FiringCounter(sae.cfg.latent_size, dead_after_tokens)
    losses, terms = [], {}
    for step in range(steps):
        out = sae(sample())
        loss, terms = sae.loss(out, TrainingState(step=step, dead_F=firing.dead()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0:
            sae.normalize_decoder()
        sae.after_step(step)
        firing.update(out.latents)
        if on_step is not None:
            on_step(step, out)
        losses.append(loss.item())
    return losses, terms
