"""The activation stream: harvest residual-stream activations, drop BOS/padding, shuffle, serve batches.

One stream feeds every SAE in a run: it captures the union of their layers in one truncated
forward per LM batch, and each SAE slices out its own layers.

Shuffling works on *groups*: consecutive LM batches holding at least ``buffer_tokens`` kept
tokens are harvested together, permuted with a generator seeded by (seed, group index) and
served as SAE batches. Which blocks form a group follows from the attention masks alone, so a
position in the stream is just (group, batch within group): a resumed run re-harvests the
current group, skips the batches already used, and continues bit-identically.

With ``epochs`` the stream passes over its blocks several times. The first pass is the one a
single-pass stream serves; each later pass serves the same groups in another seeded order, each
permuted anew, both drawn from (seed, epoch) alone, so the position gains the epoch and stays
exact on resume.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from routesae.config import Config, setting
from routesae.data import TokenBlocks
from routesae.devices import resolve_device
from routesae.errors import ConfigError
from routesae.lm import LanguageModel


@dataclass
class HarvestConfig(Config):
    """Which activations to harvest: model, text, packing, positions and data order.

    Shared by training and the on-disk cache (:mod:`routesae.cache`), so both read the same
    blocks and positions and a cache can stand in for the live harvest.
    """

    model: str = setting("smollm2", "Language model: 'smollm2' (embedded), a local HF directory, or a hub name.")
    dataset: str = setting("wiki", "Text: 'wiki' (embedded), local .txt/.jsonl/.json/.parquet files or a folder, or a hub dataset.")
    text_field: str = setting("text", "Field holding the text in record-shaped datasets.")
    context_length: int = setting(128, "Tokens per sequence fed to the language model.")
    batch_size: int = setting(16, "Sequences per language-model batch.")
    tokens: int = setting(200_000, "Tokens to harvest (BOS and padding positions excluded).")
    keep_bos: bool = setting(False, "Train on each sequence's first position too (the reference does; it is an attention sink).")
    seed: int = setting(42, "Seed for SAE initialisation, data order and shuffling.")
    device: str = setting("auto", "Device for the model and SAEs: 'auto' (CUDA when available), 'cpu', 'cuda', ...")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("context_length", "batch_size", "tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:  # training's tokens may be None: --epochs whole passes
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {value}")
        resolve_device(self.device)  # a wrong --device fails here, before the model loads

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


def too_few_tokens_advice(tokens: int, one_pass: int, epochs: int, more: str = "use a larger --dataset") -> str:
    """The end of a message refusing ``tokens`` beyond what ``epochs`` passes of ``one_pass`` tokens hold: the fixes.

    The trainer (a train split) and the cache (its tokens) refuse alike; ``more`` is how to get more data.
    """
    done = f", {epochs * one_pass:,} in {epochs} passes" if epochs > 1 else ""
    if not one_pass:
        return f"{done}; {more}"
    needed = -(-tokens // one_pass)
    epochs_option = f"raise --epochs to {needed}" if epochs > 1 else f"pass --epochs {needed} to train on it {needed} times"
    return f"{done}; lower --tokens, {more}, or {epochs_option}"


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
class Shard:
    """Which language-model batches this process harvests: every ``world_size``-th, from ``rank``.

    Under ``torchrun`` each rank takes global LM batches r, r + W, r + 2W, ... (batch i holds
    blocks i·B to (i+1)·B), so the ranks split the language-model work W ways. Shuffling and
    batching stay global: every rank draws the same permutation of a group and serves, of each
    SAE batch, the rows it harvested itself, so the ranks' shares of a step together are exactly
    the batch one process would train on.
    """

    rank: int = 0
    world_size: int = 1

    def owns(self, lm_batch: int) -> bool:
        return lm_batch % self.world_size == self.rank


WHOLE = Shard()


def epoch_generator(seed: int, epoch: int, what: str) -> torch.Generator:
    """A generator for ``what`` (a group's rows, the groups' order) in a later epoch, seeded by a hash of all three.

    Hashing keeps every (seed, epoch, what) apart; the first epoch keeps its historic seeds, so
    single-pass runs serve what they always served.
    """
    digest = hashlib.blake2b(f"routesae:{seed}:{epoch}:{what}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)


@dataclass(frozen=True)
class Group:
    first_block: int
    end_block: int
    tokens: int  # kept tokens in the group


def plan_groups(kept_per_block: Sequence[int], lm_batch_size: int, buffer_tokens: int) -> list[Group]:
    """Consecutive LM batches of blocks, cut once a group holds ``buffer_tokens`` kept tokens (the last may hold fewer)."""
    groups, first, tokens = [], 0, 0
    for start in range(0, len(kept_per_block), lm_batch_size):
        end = min(start + lm_batch_size, len(kept_per_block))
        tokens += sum(kept_per_block[start:end])
        if tokens >= buffer_tokens or end == len(kept_per_block):
            groups.append(Group(first, end, tokens))
            first, tokens = end, 0
    return groups


class ShuffledStream:
    """Group-shuffled ``[tokens, layers, d_model]`` batches; subclasses say where a group's activations come from.

    The plan (groups, batch sizes) depends only on how many tokens each block keeps, so a live
    harvest (:class:`ActivationStream`) and an on-disk cache (:class:`routesae.cache.CachedStream`)
    of the same blocks serve the same batches in the same order.
    """

    def __init__(
        self,
        kept_per_block: Sequence[int],
        *,
        lm_batch_size: int,
        sae_batch_tokens: int,
        buffer_tokens: int,
        seed: int = 0,
        position: tuple[int, int] = (0, 0),
        epoch: int = 0,
        epochs: int = 1,
        prefetch: bool = False,
        tokens: int | None = None,
        shard: Shard = WHOLE,
    ) -> None:
        """``tokens``: stop after serving this many (the last batch cut short); ``shard``: this process's LM batches;
        ``epochs``: passes over the blocks; ``epoch`` and ``position``: where to start."""
        self.prefetch = prefetch
        self.lm_batch_size = lm_batch_size
        self.sae_batch_tokens = sae_batch_tokens
        self.seed = seed
        self.limit = tokens
        self.shard = shard
        self.kept_per_block = list(kept_per_block)
        self.groups = plan_groups(self.kept_per_block, lm_batch_size, max(buffer_tokens, sae_batch_tokens))
        self.pass_tokens = sum(g.tokens for g in self.groups)  # kept tokens of one epoch
        self.epochs = epochs
        self.epoch = epoch  # the epoch of the next batch served (the last one's once the stream is spent)
        self.position = position  # (group within the epoch, batch within group) of the next batch served
        self.batch_tokens = 0  # tokens of the batch last served, all ranks' shares together
        # Time the consumer spent obtaining and permuting groups (LM forwards or cache reads), or with
        # ``prefetch`` waiting for them: the harvest time training did not hide.
        self.harvest_seconds = 0.0

    def harvest(self, group: Group) -> Tensor:
        """Activations of the kept positions of this process's LM batches of ``group`` (:meth:`lm_batches`),
        ``[n, L, D]``, in corpus order."""
        raise NotImplementedError

    def lm_batches(self, group: Group) -> list[tuple[int, int]]:
        """(first, end) blocks of each LM batch of ``group`` this process harvests."""
        B = self.lm_batch_size
        starts = range(group.first_block, group.end_block, B)
        return [(first, min(first + B, group.end_block)) for first in starts if self.shard.owns(first // B)]

    def kept_tokens(self, first: int, end: int) -> int:
        """Kept positions of blocks ``first..end``."""
        return sum(self.kept_per_block[first:end])

    def _local_rows(self, group: Group) -> Tensor | None:
        """For each row of ``group`` (corpus order), its row in this process's harvest, or -1; None when it holds all."""
        if self.shard.world_size == 1:
            return None
        local = torch.full((group.tokens,), -1, dtype=torch.long)
        row = held = 0
        for first in range(group.first_block, group.end_block, self.lm_batch_size):
            end = min(first + self.lm_batch_size, group.end_block)
            n = self.kept_tokens(first, end)
            if self.shard.owns(first // self.lm_batch_size):
                local[row : row + n] = torch.arange(held, held + n)
                held += n
            row += n
        return local

    def group_order(self, epoch: int) -> list[int]:
        """The plan's groups in the order ``epoch`` serves them: as planned in the first, seeded anew in each later one."""
        if epoch == 0:
            return list(range(len(self.groups)))
        return torch.randperm(len(self.groups), generator=epoch_generator(self.seed, epoch, "order")).tolist()

    def _row_generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator of group ``index``'s row order in ``epoch``."""
        if epoch == 0:
            return torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return epoch_generator(self.seed, epoch, f"group {index}")

    def _served_before(self, epoch: int, position: tuple[int, int]) -> int:
        """Tokens served (all ranks together) before ``position`` of ``epoch``."""
        group, batch = position
        order = self.group_order(epoch)
        done = epoch * self.pass_tokens + sum(self.groups[i].tokens for i in order[:group])
        return done + (min(batch * self.sae_batch_tokens, self.groups[order[group]].tokens) if group < len(order) else 0)

    def batch_sizes(self) -> Iterator[int]:
        """Sizes of every SAE batch the stream serves from the start, every epoch, known without running the LM."""
        for epoch in range(self.epochs):
            for index in self.group_order(epoch):
                full, rest = divmod(self.groups[index].tokens, self.sae_batch_tokens)
                yield from [self.sae_batch_tokens] * full + ([rest] if rest else [])

    def _schedule(self) -> list[tuple[int, int, int]]:
        """(epoch, group within the epoch, plan index) of every group still to serve, from the current position on."""
        schedule = []
        for epoch in range(self.epoch, self.epochs):
            order = self.group_order(epoch)
            first = self.position[0] if epoch == self.epoch else 0
            schedule += [(epoch, n, order[n]) for n in range(first, len(order))]
        return schedule

    def _after(self, epoch: int, n: int, batch: int, group: Group) -> tuple[int, tuple[int, int]]:
        """(epoch, position) after serving ``batch`` of the ``n``-th group of ``epoch``; a finished epoch but the
        last moves on to the next one's start."""
        if (batch + 1) * self.sae_batch_tokens < group.tokens:
            return epoch, (n, batch + 1)
        if n + 1 < len(self.groups) or epoch + 1 >= self.epochs:
            return epoch, (n + 1, 0)
        return epoch + 1, (0, 0)

    def __iter__(self) -> Iterator[Tensor]:
        """Serve each group's rows in a seeded random order.

        The permutation is applied to indices, not data: each SAE batch gathers its own rows from
        the group, so the group is copied once (into batches) instead of being permuted whole first,
        and peak memory is one group plus the batch being served (plus the batch the consumer
        still holds). For 16 SmolLM2 layers a 16k-token group is 600 MB, so this saves a 600 MB
        copy per group and as much memory. With ``prefetch`` the next group is harvested while
        the current one is served: two groups are alive at once, the price of the overlap.
        """
        skip = self.position[1]
        served = self._served_before(self.epoch, self.position)
        schedule = self._schedule()
        harvests = self._harvests([self.groups[index] for _, _, index in schedule])
        for epoch, n, index in schedule:
            if self.limit is not None and served >= self.limit:
                return
            start = time.perf_counter()
            acts = next(harvests)
            group = self.groups[index]
            order = torch.randperm(group.tokens, generator=self._row_generator(epoch, index))
            local = self._local_rows(group)
            if local is None:
                order = order.to(acts.device)
            self.harvest_seconds += time.perf_counter() - start
            for b, rows in enumerate(order.split(self.sae_batch_tokens)[skip:], start=skip):
                if self.limit is not None:
                    if served >= self.limit:
                        return
                    rows = rows[: self.limit - served]
                start = time.perf_counter()
                self.batch_tokens = len(rows)
                served += len(rows)
                if local is not None:  # this rank's share: the rows of the batch it harvested, in the batch's order
                    rows = local[rows]
                    rows = rows[rows >= 0].to(acts.device)
                batch = acts.index_select(0, rows)
                self.harvest_seconds += time.perf_counter() - start
                self.epoch, self.position = self._after(epoch, n, b, group)
                yield batch
                del batch  # the next batch is allocated while the consumer still holds this one: hold it once, not twice
            # Drop this group before harvesting the next, or two groups would be alive at once.
            del acts, order
            skip = 0

    def _harvests(self, groups: Sequence[Group]) -> Iterator[Tensor]:
        """Each of ``groups``' activations in turn; with ``prefetch`` the next group's harvest runs in a
        background thread while the consumer trains on the current one.

        The worker uses the caller's intra-op thread count, so it computes the same activations bit for bit.
        When the consumer stops early, a harvest already under way is abandoned (not waited for).
        """
        if not self.prefetch:
            for group in groups:
                yield self.harvest(group)
            return
        if not groups:
            return
        threads = torch.get_num_threads()

        def work(group: Group) -> Tensor:
            torch.set_num_threads(threads)
            return self.harvest(group)

        pool = ThreadPoolExecutor(1, thread_name_prefix="routesae-harvest")
        try:
            pending = pool.submit(work, groups[0])
            for index in range(len(groups)):
                acts = pending.result()
                if index + 1 < len(groups):
                    pending = pool.submit(work, groups[index + 1])
                yield acts
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class ActivationStream(ShuffledStream):
    """Harvest ``layers`` of ``lm`` over ``blocks`` live: one truncated forward per LM batch."""

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
        epoch: int = 0,
        epochs: int = 1,
        prefetch: bool = False,
        tokens: int | None = None,
        shard: Shard = WHOLE,
    ) -> None:
        self.lm = lm
        self.blocks = blocks
        self.layers = list(layers)
        self.keep_bos = keep_bos
        kept_per_block = training_positions(blocks.attention_mask, keep_bos).sum(-1).tolist()
        super().__init__(
            kept_per_block, lm_batch_size=lm_batch_size, sae_batch_tokens=sae_batch_tokens, buffer_tokens=buffer_tokens,
            seed=seed, position=position, epoch=epoch, epochs=epochs, prefetch=prefetch, tokens=tokens, shard=shard,
        )

    def harvest(self, group: Group) -> Tensor:
        """One LM forward per batch, each batch's kept rows written by the capture hooks straight into one group buffer."""
        batches = self.lm_batches(group)
        rows = sum(self.kept_tokens(first, end) for first, end in batches)
        out = torch.empty(rows, len(self.layers), self.lm.d_model, dtype=self.lm.dtype, device=self.lm.device)
        row = 0
        for first, end in batches:
            ids, mask, keep = batch_inputs(self.blocks, self.keep_bos, first, end)
            n = self.kept_tokens(first, end)
            self.lm.capture(ids, mask, self.layers, keep=keep, out=out[row : row + n])
            row += n
        return out


def harvest_batches(
    lm: LanguageModel, blocks: TokenBlocks, layers: Sequence[int], keep_bos: bool, lm_batch_size: int, start: int, end: int
) -> Iterator[Tensor]:
    """Kept positions' activations ``[n, L, D]`` of blocks ``start..end``, one LM batch at a time, in corpus order.

    Batches start at ``start`` and step by ``lm_batch_size``: the trainer and the cache batch the same
    blocks together, so (on one device) they compute bit-identical activations.
    """
    for first in range(start, end, lm_batch_size):
        ids, mask, keep = batch_inputs(blocks, keep_bos, first, min(first + lm_batch_size, end))
        yield lm.capture(ids, mask, layers, keep=keep)


def batch_inputs(blocks: TokenBlocks, keep_bos: bool, first: int, last: int) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and the positions that count (:func:`training_positions`) of blocks ``first..last``."""
    mask = blocks.attention_mask[first:last]
    return blocks.input_ids[first:last], mask, training_positions(mask, keep_bos)
