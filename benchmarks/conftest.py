"""Shared set-up of the throughput benchmarks: SmolLM2 loaded once, the wiki train split, the forward baseline.

Loading and tokenisation happen here, outside every measurement, as the trainer's ``seconds``
excludes them too. Each measurement reads the same blocks: the first ``GROUPS`` shuffle groups of
the train split (~36k tokens), so a training run harvests exactly the blocks the baseline forward
reads and trains on exactly the tokens it forwards.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from routesae import TrainConfig
from routesae.activations import plan_groups, training_positions
from routesae.data import TokenBlocks, load_corpus
from routesae.lm import LanguageModel

# The memory benchmark counts live tensors with the tests' watcher (tests/live_tensors.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# Shuffle groups per measurement: 2 x 18,288 kept tokens with the default buffer and batch. A loaded machine
# may set ROUTESAE_BENCH_GROUPS=1 (noisier ratios, half the time).
GROUPS = int(os.environ.get("ROUTESAE_BENCH_GROUPS", "2"))


@dataclass(frozen=True)
class Workload:
    """The blocks every measurement reads and the tokens they keep."""

    blocks: TokenBlocks  # the first ``n_blocks`` blocks of the train split
    n_blocks: int
    groups: int  # shuffle groups the blocks form
    tokens: int  # kept tokens (position 0 and padding excluded), what a training run trains on
    group_tokens: int  # kept tokens of the largest group: what the shuffle buffer holds at once
    cfg: TrainConfig  # the training settings of every run (same tokens, batch and buffer)

    def lm_batches(self, n_blocks: int | None = None) -> list[tuple[int, int]]:
        """(first, end) of each language-model batch over the first ``n_blocks`` blocks (default: all)."""
        n_blocks = self.n_blocks if n_blocks is None else n_blocks
        size = self.cfg.batch_size
        return [(first, min(first + size, n_blocks)) for first in range(0, n_blocks, size)]


@pytest.fixture(scope="session")
def lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel.load("smollm2")


@pytest.fixture(scope="session")
def workload(lm: LanguageModel) -> Workload:
    cfg = TrainConfig(checkpoint_every=0, log_every=10**9)
    blocks = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, seed=cfg.seed).split("train")
    kept = training_positions(blocks.attention_mask, cfg.keep_bos).sum(-1).tolist()
    groups = plan_groups(kept, cfg.batch_size, cfg.buffer_tokens)[:GROUPS]
    tokens = sum(g.tokens for g in groups)
    cfg = TrainConfig(tokens=tokens, checkpoint_every=0, log_every=10**9)
    return Workload(blocks, groups[-1].end_block, len(groups), tokens, max(g.tokens for g in groups), cfg)


def forward_seconds(lm: LanguageModel, workload: Workload, deepest: int, n_blocks: int | None = None) -> float:
    """Wall time of the truncated forward (``capture`` of the deepest block) over the workload, batch 16."""
    n_blocks = workload.n_blocks if n_blocks is None else n_blocks
    started = time.perf_counter()
    for first, last in workload.lm_batches(n_blocks):
        lm.capture(workload.blocks.input_ids[first:last], workload.blocks.attention_mask[first:last], [deepest])
    return time.perf_counter() - started


class PlainForward:
    """A Hugging Face forward through blocks 0..deepest of a fresh copy of the model: the physical limit.

    Fresh, because booting the TransformerLens bridge rewires the model it wraps; default attention
    (``sdpa``), no hooks, no unembedding, the same batches as the capture.
    """

    def __init__(self, lm: LanguageModel) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(lm.source.name_or_path, dtype=lm.dtype, local_files_only=True)
        self.model.to(lm.device).eval()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, deepest: int) -> None:
        body = self.model.model
        layers = body.layers
        body.layers = layers[: deepest + 1]
        try:
            with torch.no_grad():
                body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            body.layers = layers

    def seconds(self, workload: Workload, deepest: int) -> float:
        """Wall time over the workload's blocks (after one warm-up batch)."""
        ids, mask = workload.blocks.input_ids, workload.blocks.attention_mask
        self(ids[: workload.cfg.batch_size], mask[: workload.cfg.batch_size], deepest)
        started = time.perf_counter()
        for first, last in workload.lm_batches():
            self(ids[first:last], mask[first:last], deepest)
        return time.perf_counter() - started


@pytest.fixture(scope="session")
def plain_forward(lm: LanguageModel) -> PlainForward:
    return PlainForward(lm)


@pytest.fixture(scope="session")
def forward_baseline(lm: LanguageModel, workload: Workload):
    """``baseline(deepest)``: truncated-forward seconds over the workload.

    Measured afresh right before each measurement that divides by it: on a shared machine the load
    changes over minutes, and a baseline taken at another time skewed ratios by 2-4x in one run.
    """

    def baseline(deepest: int) -> float:
        forward_seconds(lm, workload, deepest, n_blocks=workload.cfg.batch_size)  # warm-up: first-call allocations
        return forward_seconds(lm, workload, deepest)

    return baseline
