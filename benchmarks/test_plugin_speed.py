"""An architecture derived from TopK trains at TopK's speed (issue 16): Matryoshka TopK's step against TopK's.

The example plugin ``plugins/routesae-matryoshka`` adds one loss term per nested dictionary, each the
reconstruction from the token's kept latents below a prefix size. It reads them from ``SAEOutput.codes``
and decodes them sparsely (k rows per token), on top of TopK's own fast paths (sparse encoder backward,
sparse decode), which it inherits. The target: its training step within 10% of TopK's at SmolLM2 sizes.
For comparison, without a target, the same loss computed from the dense latents (an ``[N, F] × [F, D]``
product per prefix), which is what a TopK-based plugin paid before the codes were public.

Both sides are the trainer's own step (forward, loss, backward, fused Adam, renormalisation, dead-latent
count) on the same batch of 2,048 token vectors, alternated step by step and taken at their best of twelve,
as ``test_throughput.py``'s close ratios are (on a shared machine a neighbour's burst slows a few steps of
either side; the minimum drops them). Run with ``make bench``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from test_throughput import alternate, once, record

from routesae import SAEOutput, TrainConfig
from routesae.plugins import get_plugin_manager
from routesae.trained_sae import TrainedSAE

TOKENS, K = 2048, 32
SIZES = {"smollm2-F4096": (576, 4096), "smollm2-F16384": (576, 16384)}
STEPS, ROUNDS = 1, 12  # single steps, alternated: a slowed step of either side is dropped by the minimum
TARGET = 1.10


def build(architecture: str, d_model: int, latent_size: int) -> TrainedSAE:
    arch = get_plugin_manager().get("architecture", architecture)
    torch.manual_seed(0)
    sae = arch(arch.build_config({"latent_size": latent_size, "k": K, "layer": 0}), d_model).train()
    return TrainedSAE(architecture, sae, torch.arange(1), TrainConfig(), 1)


def dense_prefix_terms(sae: Any) -> None:
    """Make ``sae`` compute its prefix reconstructions from the dense latents, as without ``SAEOutput.codes``."""

    def prefix_reconstructions(out: SAEOutput) -> list[torch.Tensor]:
        index_F = torch.arange(out.latents.shape[-1], device=out.latents.device)
        return [(out.latents * (index_F < m)) @ sae.W_dec + sae.b_dec for m in sae.cfg.prefix_sizes()]

    sae.prefix_reconstructions = prefix_reconstructions


def seconds_per_step(trained: TrainedSAE, acts: torch.Tensor, first_step: int) -> float:
    started = time.perf_counter()
    for step in range(first_step, first_step + STEPS):
        trained.step(acts, 5e-4, step)
    return (time.perf_counter() - started) / STEPS


@pytest.mark.parametrize("size", sorted(SIZES))
def test_a_topk_derived_plugin_trains_within_10_percent_of_topk(benchmark, size):
    if "matryoshka" not in get_plugin_manager().names("architecture"):
        pytest.skip("the example plugin is not installed: pip install -e plugins/routesae-matryoshka (make setup does)")
    d_model, latent_size = SIZES[size]
    topk, matryoshka, dense = (build(a, d_model, latent_size) for a in ("topk", "matryoshka", "matryoshka"))
    dense_prefix_terms(dense.sae)
    acts = torch.randn(TOKENS, 1, d_model, generator=torch.Generator().manual_seed(0))
    for trained in (topk, matryoshka, dense):  # warm-up: first-call allocations
        seconds_per_step(trained, acts, 0)
    t_topk, t_matryoshka = alternate(lambda r: seconds_per_step(topk, acts, (r + 1) * STEPS),
                                     lambda r: seconds_per_step(matryoshka, acts, (r + 1) * STEPS), rounds=ROUNDS)
    t_dense = min(seconds_per_step(dense, acts, (r + 1) * STEPS) for r in range(3))
    ratio = t_matryoshka / t_topk
    record(benchmark, f"Matryoshka TopK step / TopK step, {size} (2 prefixes, codes)", ratio, f"≤ {TARGET:.2f}",
           ratio <= TARGET, topk_ms=t_topk * 1000, matryoshka_ms=t_matryoshka * 1000,
           dense_prefixes_ms=t_dense * 1000, dense_prefixes_ratio=t_dense / t_topk)
    once(benchmark, lambda: seconds_per_step(matryoshka, acts, 10**5))
