"""The activation stream: harvest residual-stream activations, drop BOS/padding, shuffle, serve batches.

One stream feeds every SAE in a run: it captures the union of their layers in one truncated
forward per LM batch, and each SAE slices out its own layers. The shuffle buffer mixes tokens
from many LM batches so that an SAE step never sees one document's tokens in a row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
        start_block: int = 0,
    ) -> None:
        self.lm = lm
        self.blocks = blocks
        self.layers = list(layers)
        self.lm_batch_size = lm_batch_size
        self.sae_batch_tokens = sae_batch_tokens
        self.buffer_tokens = max(buffer_tokens, sae_batch_tokens)
        self.keep_bos = keep_bos
        self.generator = torch.Generator().manual_seed(seed)
        self.blocks_consumed = start_block  # for resume: the next block to harvest

    def harvest(self) -> Iterator[Tensor]:
        """Activations of the kept positions of each LM batch, ``[n, L, D]``."""
        for input_ids, mask in self.blocks.batches(self.lm_batch_size, start=self.blocks_consumed):
            acts_BTLD = self.lm.capture(input_ids.to(self.lm.device), mask.to(self.lm.device), self.layers)
            self.blocks_consumed += input_ids.shape[0]
            yield acts_BTLD[training_positions(mask, self.keep_bos).to(acts_BTLD.device)]

    def __iter__(self) -> Iterator[Tensor]:
        buffer: Tensor | None = None
        filled = 0
        for acts in self.harvest():
            if buffer is None:  # allocated once; sized to hold a full buffer plus one LM batch
                buffer = acts.new_empty((self.buffer_tokens + acts.shape[0] * 2, *acts.shape[1:]))
            if filled + acts.shape[0] > buffer.shape[0]:
                buffer = torch.cat([buffer[:filled], acts.new_empty((acts.shape[0], *acts.shape[1:]))])
            buffer[filled : filled + acts.shape[0]] = acts
            filled += acts.shape[0]
            if filled >= self.buffer_tokens:
                # Serve a random half of the buffer, keep the other half to mix with what comes next.
                perm = torch.randperm(filled, generator=self.generator).to(buffer.device)
                n_out = (filled // 2) // self.sae_batch_tokens * self.sae_batch_tokens or self.sae_batch_tokens
                served = buffer[perm[:n_out]]
                kept = buffer[perm[n_out:filled]]
                buffer[: kept.shape[0]] = kept
                filled = kept.shape[0]
                yield from served.split(self.sae_batch_tokens)
        if buffer is not None and filled:
            perm = torch.randperm(filled, generator=self.generator).to(buffer.device)
            yield from buffer[perm].split(self.sae_batch_tokens)
