"""Encode, decode and one training step of every installed architecture, at real model sizes.

Sizes: SmolLM2-135M (d=576; 4,096 and 16,384 latents; multi-layer SAEs read its 16 routed
blocks) and Llama-3.2-1B (d=2048, 16,384 latents; 9 routed blocks of 16). One step is one
``--sae-batch-tokens`` batch of 2,048 token vectors, the unit the trainer's throughput is made of:
these SAE-side costs sit beside the language-model forward, and the targets are ratios to it
(see ``test_throughput.py``). Architectures come from the plugin manager, so plugins are
measured too. Run with ``make bench``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from routesae import TrainConfig
from routesae.plugins import get_plugin_manager
from routesae.trained_sae import TrainedSAE

TOKENS = 2048
PARAMETER_BUDGET = 2e8  # beyond this (with Adam's two moments) a CPU benchmark would need > 3 GB


@dataclass(frozen=True)
class Size:
    name: str
    d_model: int
    latent_size: int
    routed_layers: int


SIZES = [
    Size("smollm2-F4096", 576, 4096, 16),
    Size("smollm2-F16384", 576, 16384, 16),
    Size("llama1b-F16384", 2048, 16384, 9),
]
ARCHITECTURES = get_plugin_manager().names("architecture")


def build(architecture: str, size: Size) -> tuple[torch.nn.Module, torch.Tensor]:
    arch = get_plugin_manager().get("architecture", architecture)
    names = arch.setting_names()
    settings: dict = {"latent_size": size.latent_size}
    if "k" in names:
        settings["k"] = 32
    if "layers" in names:
        settings["layers"] = f"0:{size.routed_layers - 1}"
        n_layers = size.routed_layers
    else:
        settings["layer"] = 0
        n_layers = 1
    torch.manual_seed(0)
    sae = arch(arch.build_config(settings), size.d_model)
    n_parameters = sum(p.numel() for p in sae.parameters())
    if n_parameters > PARAMETER_BUDGET:
        pytest.skip(f"{architecture} at {size.name} has {n_parameters / 1e6:.0f}M parameters; measure it on a GPU")
    return sae, torch.randn(TOKENS, n_layers, size.d_model)


@pytest.fixture(params=[(a, s) for s in SIZES for a in ARCHITECTURES], ids=lambda p: f"{p[0]}-{p[1].name}")
def sae_and_batch(request, benchmark):
    architecture, size = request.param
    benchmark.extra_info.update(architecture=architecture, size=size.name)
    return build(architecture, size)


def test_encode(benchmark, sae_and_batch):
    """Encoding the SAE's input space (standardised; for RouteSAE routed): ``encode`` of raw activations adds the statistics."""
    sae, acts = sae_and_batch
    with torch.no_grad():
        target = sae(acts).target
        benchmark(sae.encode_standardized, target)


def test_decode(benchmark, sae_and_batch):
    sae, acts = sae_and_batch
    with torch.no_grad():
        latents = sae(acts).latents
        benchmark(sae.decode_standardized, latents)


def test_forward(benchmark, sae_and_batch):
    sae, acts = sae_and_batch
    with torch.no_grad():
        benchmark(sae, acts)


def test_training_step(benchmark, sae_and_batch):
    """The trainer's own step (forward, loss, backward, fused Adam, decoder renormalisation, dead-latent count)."""
    sae, acts = sae_and_batch
    trained = TrainedSAE("bench", sae.train(), torch.arange(acts.shape[1]), TrainConfig(), acts.shape[1])
    steps = iter(range(10**6))
    benchmark.pedantic(lambda: trained.step(acts, 5e-4, next(steps)), rounds=5, warmup_rounds=1)
