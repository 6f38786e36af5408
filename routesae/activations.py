"""The activation stream: harvest residual-stream activations, drop BOS/padding, shuffle, serve batches.

One stream feeds every SAE in a run: it captures the union of their layers in one truncated
forward per LM batch, and each SAE slices out its own layers.

Shuffling works on *groups*: consecutive LM batches holding at least ``buffer_tokens`` kept
tokens are harvested together, permuted with a generator seeded by (seed, group index) and
served as SAE batches. Which blocks form a group follows from the attention masks alone, so a
position in the stream is just (group, batch within group): a resumed run re-harvests the
current group, skips the batches already used, and continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from routesae.data import TokenBlocks
from routesae.lm import LanguageModel


def training_positions(attention_mask_BT: Tensor, keep_bos: bool) -> Tensor:
    """Boolean [B, T]: real tokens, minus each block's first position unless ``keep_bos``.

    Position 0 is an attention sink with a residual norm ~100x the rest whether or not it holds a
    BOS token, so it is excluded from training and metrics by default.
    """
    keep = attention_mask_BT.bool().clone()
    if not keep_bos:
        keep[:, 0] = False
    return keep


@dataclass(frozen=True)
class Group:
    first_block: int
    end_block: int
    tokens: int  # kept tokens in the group


class ActivationStream:
    """Iterate over shuffled ``[tokens, layers, d_model]`` batches harvested from ``blocks``."""

    def __init__(
        self,
        lm: LanguageModel,
        blocks: TokenBlocks,
        layers: Sequence[int],
        *,
        lm_batch_size: int,
        sae_batch_tokens: int,
        buffer_tokens: int,
        keep_bos: bool = False,
        seed: int = 0,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        self.lm = lm
        self.blocks = blocks
        self.layers = list(layers)
        self.lm_batch_size = lm_batch_size
        self.sae_batch_tokens = sae_batch_tokens
        self.keep_bos = keep_bos
        self.seed = seed
        self.groups = self._plan_groups(max(buffer_tokens, sae_batch_tokens))
        self.position = position  # (group, batch within group) of the next batch served

    def _plan_groups(self, buffer_tokens: int) -> list[Group]:
        kept_per_block = training_positions(self.blocks.attention_mask, self.keep_bos).sum(-1).tolist()
        groups, first, tokens = [], 0, 0
        for start in range(0, len(kept_per_block), self.lm_batch_size):
            end = min(start + self.lm_batch_size, len(kept_per_block))
            tokens += sum(kept_per_block[start:end])
            if tokens >= buffer_tokens or end == len(kept_per_block):
                groups.append(Group(first, end, tokens))
                first, tokens = end, 0
        return groups

    def batch_sizes(self) -> Iterator[int]:
        """Sizes of every SAE batch the stream serves from the start, known without running the LM."""
        for group in self.groups:
            full, rest = divmod(group.tokens, self.sae_batch_tokens)
            yield from [self.sae_batch_tokens] * full + ([rest] if rest else [])

    def harvest(self, group: Group) -> Tensor:
        """Activations of the kept positions of one group, ``[n, L, D]``, in corpus order."""
        parts = []
        for start in range(group.first_block, group.end_block, self.lm_batch_size):
            end = min(start + self.lm_batch_size, group.end_block)
            ids, mask = self.blocks.input_ids[start:end], self.blocks.attention_mask[start:end]
            acts_BTLD = self.lm.capture(ids.to(self.lm.device), mask.to(self.lm.device), self.layers)
            parts.append(acts_BTLD[training_positions(mask, self.keep_bos).to(acts_BTLD.device)])
        return torch.cat(parts)

    def __iter__(self) -> Iterator[Tensor]:
        first_group, skip = self.position
        for index in range(first_group, len(self.groups)):
            acts = self.harvest(self.groups[index])
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            batches = acts[torch.randperm(acts.shape[0], generator=generator).to(acts.device)].split(self.sae_batch_tokens)
            for b in range(skip, len(batches)):
                self.position = (index, b + 1) if b + 1 < len(batches) else (index + 1, 0)
                yield batches[b]
            skip = 0
