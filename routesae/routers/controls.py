"""Control routers: what RouteSAE's learned routing is measured against.

RouteSAE beats a TopK SAE on its top block, but its router sends about half the tokens to the
bottom of the range, so "routing" might be no more than "reading an earlier, simpler layer". These
routers keep everything else of RouteSAE — the standardisation, the inner SAE, the splice at the
block a token was routed to — and replace only the learned choice:

- ``fixed``: every token to one block (``--route-block B``, default the top of the range): RouteSAE's
  pipeline without routing, to compare with TopK trained on that block and with learned routing;
- ``random``: every token to a uniformly random block of the range, chosen from the seed and the
  token itself, so the same token goes to the same block in training, evaluation, contexts and
  steering; ``--route-per batch`` draws one block per batch instead, as the reference code's
  "Random" baseline does;
- ``uniform``: x_route = the mean of the layers, equal weights and nothing learned (the paper's text for
  its "Random" baseline). It mixes blocks, so like ``soft`` it is spliced at one block per token: the
  top of the range, where the TopK baseline sits.

None of them scales x_route by a router probability (there is no learned router to reach); the
router's weights stay in the checkpoint, untrained, so every RouteSAE loads alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import StandardizedLayers
from routesae.config import setting
from routesae.errors import ConfigError, RouteSAEError
from routesae.routers.base import Router, RouterConfig, Routing

_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)  # odd constants of a 32-bit multiplicative hash


def _one_block(layers: StandardizedLayers, chosen_N: Tensor) -> Routing:
    """Each token's x at its block, unscaled, with one-hot weights."""
    weights_NL = F.one_hot(chosen_N, layers.n_layers).to(layers.raw_NLD.dtype)
    return Routing(layers.select(chosen_N), weights_NL, chosen_N)


@dataclass
class FixedConfig(RouterConfig):
    block: int | None = setting(None, "With --router fixed: the block every token goes to (inside the routed range). "
                                      "Default: the top of the range.")


class FixedRouter(Router):
    """Every token to one block."""

    name = "fixed"
    Config = FixedConfig
    single_block = True
    cfg: FixedConfig

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        block = layers.blocks[-1] if self.cfg.block is None else self.cfg.block
        if block not in layers.blocks:
            raise RouteSAEError(f"--route-block {block} is outside the routed range {layers.blocks[0]}..{layers.blocks[-1]}")
        index = layers.blocks.index(block)
        return _one_block(layers, torch.full((layers.raw_NLD.shape[0],), index, dtype=torch.long,
                                             device=layers.raw_NLD.device))


@dataclass
class RandomConfig(RouterConfig):
    seed: int = setting(0, "With --router random: the seed of the blocks drawn.")
    per: Literal["token", "batch"] = setting(
        "token", "With --router random: one block per token, or per batch (the reference code's 'Random').")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed < 0:
            raise ConfigError(f"route_seed must be >= 0, got {self.seed}")


class RandomRouter(Router):
    """Every token (or batch) to a uniformly random block, drawn from the seed and the token's own activations."""

    name = "random"
    Config = RandomConfig
    single_block = True
    cfg: RandomConfig

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        keys_N = token_keys(layers.raw_NLD, self.cfg.seed)
        if self.cfg.per == "batch":
            keys_N = keys_N[:1].expand_as(keys_N) if len(keys_N) else keys_N
        return _one_block(layers, keys_N % layers.n_layers)


def token_keys(raw_NLD: Tensor, seed: int) -> Tensor:
    """A 31-bit hash per token of its activations' bits and ``seed``: the same token gives the same key in any batch."""
    values_NK = raw_NLD.reshape(raw_NLD.shape[0], -1)
    values_NK = values_NK[:, :: max(1, values_NK.shape[1] // 64)]  # 64 values of the token are plenty
    bits_NK = values_NK.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF  # only those converted: not [N, L*D]
    key = torch.full((raw_NLD.shape[0],), (seed * _MIX[2] + 1) & 0xFFFFFFFF, dtype=torch.long, device=raw_NLD.device)
    for column in bits_NK.unbind(1):
        key = ((key ^ column) * _MIX[0]) & 0xFFFFFFFF
        key = key ^ (key >> 15)
    key = (key * _MIX[1]) & 0xFFFFFFFF
    return (key ^ (key >> 13)) & 0x7FFFFFFF


class UniformRouter(Router):
    """x_route = the mean of the layers; spliced at the top of the range."""

    name = "uniform"

    def route(self, layers: StandardizedLayers, probs_NL: Tensor) -> Routing:
        N, L = layers.raw_NLD.shape[:2]
        weights_NL = layers.raw_NLD.new_full((N, L), 1 / L)
        top_N = torch.full((N,), L - 1, dtype=torch.long, device=layers.raw_NLD.device)
        return Routing(layers.weighted_sum(weights_NL), weights_NL, top_N)
