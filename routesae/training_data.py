"""Where a training run's activations come from: a live harvest through the language model, or a cache.

:func:`routesae.train.train` chooses; the trainer only consumes the stream. Both serve the same
batches in the same order (:class:`~routesae.activations.ShuffledStream` plans groups from the data
alone), so a run trained from a cache ends with the weights a live run would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from routesae.activations import WHOLE, ActivationStream, Shard, ShuffledStream
from routesae.cache import ActivationCache, CachedModel, CachedStream
from routesae.data import load_corpus
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel
from routesae.train_config import TrainConfig

SPLIT = "train"


@dataclass
class TrainingData:
    """The stream a run trains on, and what its records say about the model and data behind it."""

    stream: ShuffledStream
    model: LanguageModel | CachedModel  # describe() and hook_name() for the records
    description: dict[str, Any]  # the corpus' describe(), with the split and keep_bos
    source: Literal["live", "cache"]


Position = tuple[int, int, int]
"""Where a stream starts: (epoch, group within the epoch, batch within the group)."""


def _shuffle(cfg: TrainConfig, position: Position, shard: Shard) -> dict[str, Any]:
    return {
        "lm_batch_size": cfg.batch_size,
        "sae_batch_tokens": cfg.sae_batch_tokens,
        "buffer_tokens": cfg.buffer_tokens,
        "seed": cfg.seed,
        "epoch": position[0],
        "position": position[1:],
        "epochs": cfg.epochs or 1,
        "prefetch": cfg.overlap_harvest,
        "tokens": cfg.tokens,
        "shard": shard,
    }


def check_shard(stream: ShuffledStream, cfg: TrainConfig) -> None:
    """Under ``torchrun``: every rank must have LM batches to harvest and tokens to train on in every step."""
    W = stream.shard.world_size
    if W == 1:
        return
    order = stream.group_order(stream.epoch)
    group = stream.groups[order[min(stream.position[0], len(order) - 1)]]
    lm_batches = -(-(group.end_block - group.first_block) // cfg.batch_size)
    if lm_batches < W:
        raise RouteSAEError(
            f"{W} ranks cannot split the work: a shuffle group of --buffer-tokens {cfg.buffer_tokens:,} holds "
            f"{lm_batches} language-model batch(es) of --batch-size {cfg.batch_size}, fewer than the ranks; raise "
            f"--buffer-tokens to at least {W * cfg.batch_size * cfg.context_length:,} or run fewer ranks"
        )
    if cfg.sae_batch_tokens < W:
        raise RouteSAEError(f"--sae-batch-tokens {cfg.sae_batch_tokens} is smaller than the {W} ranks that share each batch")


def live_data(
    lm: LanguageModel, cfg: TrainConfig, layers: Sequence[int], position: Position, shard: Shard = WHOLE
) -> TrainingData:
    """Harvest ``layers`` from ``lm`` over the train split of ``cfg.dataset`` (tokenised here)."""
    corpus = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, text_field=cfg.text_field, seed=cfg.seed)
    stream = ActivationStream(lm, corpus.split(SPLIT), layers, keep_bos=cfg.keep_bos, **_shuffle(cfg, position, shard))
    check_shard(stream, cfg)
    return TrainingData(stream, lm, {**corpus.describe(), "split": SPLIT, "keep_bos": cfg.keep_bos}, "live")


def cached_data(
    cache: ActivationCache,
    cfg: TrainConfig,
    layers: Sequence[int],
    reads: Mapping[str, Sequence[int]],
    position: Position,
    shard: Shard = WHOLE,
) -> TrainingData:
    """Read ``layers`` from ``cache``; ``reads`` (SAE name -> its blocks) names the SAE when a block is missing."""
    lacking = [f"{name} reads {cache.missing_blocks(blocks)}" for name, blocks in reads.items() if cache.missing_blocks(blocks)]
    if lacking:
        raise RouteSAEError(
            f"the activation cache in {cache.path} holds blocks {cache.layers}, but {'; '.join(lacking)}: cache those "
            "blocks too (routesae cache --layer N / --layers A:B) or train without --from-cache"
        )
    stream = CachedStream(cache, layers, **_shuffle(cfg, position, shard))
    check_shard(stream, cfg)
    return TrainingData(stream, cache.model, cache.data, "cache")
