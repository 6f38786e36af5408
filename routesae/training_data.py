"""Where a training run's activations come from: a live harvest through the language model, or a cache.

:func:`routesae.train.train` chooses; the trainer only consumes the stream. Both serve the same
batches in the same order (:class:`~routesae.activations.ShuffledStream` plans groups from the data
alone), so a run trained from a cache ends with the weights a live run would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from routesae.activations import ActivationStream, ShuffledStream
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


def _shuffle(cfg: TrainConfig, position: tuple[int, int]) -> dict[str, Any]:
    return {
        "lm_batch_size": cfg.batch_size,
        "sae_batch_tokens": cfg.sae_batch_tokens,
        "buffer_tokens": cfg.buffer_tokens,
        "seed": cfg.seed,
        "position": position,
        "prefetch": cfg.overlap_harvest,
    }


def live_data(lm: LanguageModel, cfg: TrainConfig, layers: Sequence[int], position: tuple[int, int]) -> TrainingData:
    """Harvest ``layers`` from ``lm`` over the train split of ``cfg.dataset`` (tokenised here)."""
    corpus = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, text_field=cfg.text_field, seed=cfg.seed)
    stream = ActivationStream(lm, corpus.split(SPLIT), layers, keep_bos=cfg.keep_bos, **_shuffle(cfg, position))
    return TrainingData(stream, lm, {**corpus.describe(), "split": SPLIT, "keep_bos": cfg.keep_bos}, "live")


def cached_data(
    cache: ActivationCache, cfg: TrainConfig, layers: Sequence[int], reads: Mapping[str, Sequence[int]], position: tuple[int, int]
) -> TrainingData:
    """Read ``layers`` from ``cache``; ``reads`` (SAE name -> its blocks) names the SAE when a block is missing."""
    lacking = [f"{name} reads {cache.missing_blocks(blocks)}" for name, blocks in reads.items() if cache.missing_blocks(blocks)]
    if lacking:
        raise RouteSAEError(
            f"the activation cache in {cache.path} holds blocks {cache.layers}, but {'; '.join(lacking)}: cache those "
            "blocks too (routesae cache --layer N / --layers A:B) or train without --from-cache"
        )
    return TrainingData(CachedStream(cache, layers, **_shuffle(cfg, position)), cache.model, cache.data, "cache")
