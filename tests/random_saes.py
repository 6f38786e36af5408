"""Seeded SAEs whose every tensor is non-trivial (biases, thresholds, gate terms), for the SAELens tests and
``make interop``'s routesae half."""

from __future__ import annotations

from typing import Any

import torch

from routesae.architectures.base import SAE
from routesae.plugins import get_plugin_manager


def random_sae(
    arch: str, settings: dict[str, Any], normalize: str = "none", *, d: int = 64, latent_size: int = 96, layer: int = 2,
    n_layers: int = 4, seed: int = 0,
) -> SAE:
    torch.manual_seed(seed)
    cls = get_plugin_manager().get("architecture", arch)
    config = cls.build_config({"latent_size": latent_size, "layer": layer, "normalize": normalize, **settings})
    sae = cls(config.resolve(n_layers), d)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae.eval()
