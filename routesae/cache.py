"""The on-disk activation cache: harvest a model's residual stream once, train many SAEs from it.

The language-model forward dominates the cost of training an SAE, so a sweep (many runs over the
same blocks) can pay for it once: ``routesae cache`` stores the activations the trainer would
feed its SAEs, and ``routesae train --from-cache DIR`` trains without loading the model.

A cache directory holds::

    manifest.json              what was harvested (model, data, blocks, dtype) and the shards written
    shard-00000.safetensors    "acts" [N, L, D]: the kept positions (``training_positions``) of
    shard-00001.safetensors    consecutive blocks of the train split, in corpus order, and
    ...                        "kept_per_block" [B]: how many positions each of those blocks kept

Because the rows are in corpus order and each shard records how many positions every block kept,
training from a cache plans the same shuffle groups as the live harvest and permutes them with the
same generator: given the same ``--batch-size``, seed and device it serves the same batches.

Crash safety: each shard is written to a temp file and renamed, and only then listed in the
manifest (also replaced atomically). A killed run leaves a manifest listing complete shards only;
running the same command again continues after the last of them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.console import Console
from rich.filesize import decimal
from safetensors import safe_open
from torch import Tensor

from routesae.activations import (
    Group,
    HarvestConfig,
    ShuffledStream,
    harvest_batches,
    too_few_tokens_advice,
    training_positions,
)
from routesae.architectures.base import check_layer
from routesae.config import setting
from routesae.data import load_corpus
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import file_sha256, read_json, write_json, write_safetensors
from routesae.lm import HOOK_TEMPLATE, LanguageModel
from routesae.locks import is_lock, writing
from routesae.progress import JobProgress
from routesae.version import __version__

if TYPE_CHECKING:
    from routesae.specs import SAESpec

FORMAT = "routesae-activation-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_FILE = "shard-{:05d}.safetensors"
SPLIT = "train"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CacheDtype = Literal["model", "float32", "bfloat16", "float16"]
# Settings that decide which activations a cache holds: training from it must use the same ones.
IDENTITY = ("model", "dataset", "text_field", "context_length", "keep_bos", "seed")
# Settings a from-cache training run takes from the cache unless given (same values: same batches as live).
TRAIN_DEFAULTS = (*IDENTITY, "batch_size", "tokens")


@dataclass
class CacheConfig(HarvestConfig):
    """What ``routesae cache`` harvests and how it stores it."""

    tokens: int = setting(
        200_000, "Tokens to cache (BOS and padding positions excluded); whole blocks are stored, so a few more may be."
    )
    seed: int = setting(42, "Seed for the data order; training from the cache uses this seed.")
    dtype: CacheDtype = setting(
        "model", "Storage dtype: 'model' (the LM's) or float32, bfloat16, float16 (half the disk; training reads float32)."
    )
    shard_mb: float = setting(256.0, "Approximate shard size in MiB; a shard holds whole LM batches and is written atomically.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard_mb <= 0:
            raise ConfigError(f"shard-mb must be positive, got {self.shard_mb}")


@dataclass(frozen=True)
class CachedModel:
    """The language model as a cache's manifest describes it: what training needs of it, without its weights."""

    description: dict[str, Any]

    @property
    def n_layers(self) -> int:
        return int(self.description["n_layers"])

    @property
    def d_model(self) -> int:
        return int(self.description["d_model"])

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def hook_name(self, layer: int) -> str:
        return HOOK_TEMPLATE.format(layer=layer)


# --- writing ---------------------------------------------------------------------------------------------


def cache_activations(
    out: Path | str,
    cfg: CacheConfig | None = None,
    layers: Sequence[int] = (),
    *,
    saes: Sequence[SAESpec] = (),
    resume: bool = False,
    overwrite: bool = False,
    lm: LanguageModel | None = None,
    progress: bool = True,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Harvest ``layers`` plus every block the ``saes`` read into a cache directory ``out``; returns ``out``.

    An unfinished cache of the same settings in ``out`` is continued (``resume=True`` insists on
    one); a finished one is left as it is. ``on_shard`` is called with each shard's manifest
    record once the shard is on disk and listed.

    >>> cache_activations("caches/smollm2-6-21", CacheConfig(tokens=1_000_000), layers=range(6, 22))
    """
    cfg = cfg or CacheConfig()
    out = Path(out)
    if resume and overwrite:
        raise RouteSAEError("--overwrite and --resume contradict each other; pick one")
    _check_target(out)
    with writing(out, "cache"):
        lm = lm or LanguageModel.load(cfg.model, device=cfg.resolved_device())
        wanted = _blocks(lm.n_layers, layers, saes)
        request = {"cache": {k: v for k, v in cfg.to_dict().items() if k != "device"}, "layers": wanted}
        existing = _existing(out, request, resume, overwrite)
        console = Console(stderr=True, quiet=not progress)
        if existing is not None and existing["status"] == "complete":
            console.print(f"{out} already holds this cache ({existing['tokens']:,} tokens); nothing to do")
            return out
        return _CacheWriter(out, cfg, lm, wanted, request, existing, console, on_shard).run()


def _blocks(n_layers: int, layers: Sequence[int], saes: Sequence[SAESpec]) -> list[int]:
    """The sorted union of ``layers`` and the blocks the ``saes`` read (their defaults resolved for this model)."""
    for layer in layers:
        check_layer(layer, n_layers)
    blocks = set(layers) | {b for s in saes for b in s.config.resolve(n_layers).resolved_layers()}
    if not blocks:
        raise RouteSAEError("no blocks to cache: give --layers A:B, --layer N (repeatable) or --arch with its settings")
    return sorted(blocks)


def _check_target(out: Path) -> None:
    """Refuse a file, or a non-empty directory that is not a cache: nothing of the user's is ever overwritten."""
    if out.exists() and not out.is_dir():
        raise RouteSAEError(f"--out {out} is a file; give a directory")
    if out.is_dir() and not (out / MANIFEST_FILE).exists() and any(not is_lock(p) for p in out.iterdir()):
        raise RouteSAEError(f"{out} is not empty and holds no activation cache ({MANIFEST_FILE}); choose a new or empty --out")


def _existing(out: Path, request: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The manifest to continue from, or None to start afresh."""
    path = out / MANIFEST_FILE
    if not path.exists():
        if resume:
            raise RouteSAEError(f"nothing to resume: {out} holds no activation cache ({MANIFEST_FILE} is missing)")
        return None
    manifest = _read_manifest(out)
    if overwrite:
        return None
    if manifest.get("request") != request:
        raise RouteSAEError(
            f"{out} holds a cache of other settings ({_describe_request(manifest.get('request'))}); "
            "choose another --out, repeat its settings to continue it, or --overwrite to replace it"
        )
    return manifest


def _describe_request(request: dict[str, Any] | None) -> str:
    if not request:
        return "unknown"
    c = request["cache"]
    return f"model {c['model']}, dataset {c['dataset']}, blocks {request['layers']}, {c['tokens']:,} tokens, {c['dtype']}"


class _CacheWriter:
    """One cache run: plan the blocks, check the disk, then harvest and write shard after shard."""

    def __init__(
        self,
        out: Path,
        cfg: CacheConfig,
        lm: LanguageModel,
        layers: list[int],
        request: dict[str, Any],
        existing: dict[str, Any] | None,
        console: Console,
        on_shard: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.out, self.cfg, self.lm, self.layers, self.console, self.on_shard = out, cfg, lm, layers, console, on_shard
        self.dtype = lm.dtype if cfg.dtype == "model" else STORAGE_DTYPES[cfg.dtype]
        self.bytes_per_token = len(layers) * lm.d_model * self.dtype.itemsize
        self.corpus = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, text_field=cfg.text_field, seed=cfg.seed)
        self.blocks = self.corpus.split(SPLIT)
        self.kept = training_positions(self.blocks.attention_mask, cfg.keep_bos).sum(-1)
        self.n_blocks, self.total_tokens = self._plan()
        data = {**self.corpus.describe(), "split": SPLIT, "keep_bos": cfg.keep_bos}
        if existing is not None and existing["data"]["fingerprint"] != data["fingerprint"]:
            raise RouteSAEError(
                f"the data of {cfg.dataset!r} changed since {out} was started; --overwrite to harvest it again"
            )
        self.manifest = existing or {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "routesae_version": __version__,
            "request": request,
            "status": "running",
            "model": lm.describe(),
            "data": data,
            "layers": layers,
            "d_model": lm.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "positions": "training_positions: real tokens" + ("" if cfg.keep_bos else ", minus each block's position 0"),
            "planned": {"tokens": self.total_tokens, "blocks": self.n_blocks},
            "tokens": 0,
            "blocks": 0,
            "bytes": 0,
            "harvest_seconds": 0.0,
            "shards": [],
        }

    def _plan(self) -> tuple[int, int]:
        """(blocks to harvest, tokens they keep): the fewest leading blocks of the train split holding ``tokens``."""
        cumulative = self.kept.cumsum(0)
        available = int(cumulative[-1]) if len(cumulative) else 0
        if self.cfg.tokens > available:
            raise RouteSAEError(
                f"asked to cache {self.cfg.tokens:,} tokens but the train split of {self.cfg.dataset!r} holds {available:,} "
                f"usable tokens (context {self.cfg.context_length}); lower --tokens or use a larger --dataset"
            )
        n = int(torch.searchsorted(cumulative, torch.tensor(self.cfg.tokens))) + 1
        return n, int(cumulative[n - 1])

    def _check_disk(self) -> None:
        needed = (self.total_tokens - self.manifest["tokens"]) * self.bytes_per_token
        free = shutil.disk_usage(_existing_parent(self.out)).free
        self.console.print(
            f"cache: {self.total_tokens:,} tokens × {len(self.layers)} blocks × d_model {self.lm.d_model} × "
            f"{self.dtype.itemsize} bytes = {decimal(self.total_tokens * self.bytes_per_token)}"
            + (f" ({decimal(needed)} still to write)" if self.manifest["tokens"] else "")
            + f"; {decimal(free)} free"
        )
        if needed > free:
            raise RouteSAEError(
                f"not enough disk space for the cache in {self.out}: it needs {needed:,} bytes ({decimal(needed)}) but only "
                f"{free:,} bytes ({decimal(free)}) are free; free some space, cache fewer --tokens or blocks, "
                "or use --dtype bfloat16"
            )

    def run(self) -> Path:
        self._check_disk()
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(".*.tmp"):  # temp files of a killed run (ours: written by files.atomic_write)
            stale.unlink(missing_ok=True)
        write_json(self.out / MANIFEST_FILE, self.manifest)
        listed = {s["file"] for s in self.manifest["shards"]}
        for orphan in self.out.glob("shard-*.safetensors"):  # a replaced cache's, or one renamed but never listed
            if orphan.name not in listed:
                orphan.unlink()
        rows_per_shard = max(1, int(self.cfg.shard_mb * 2**20) // self.bytes_per_token)
        start = self.manifest["blocks"]
        bar = JobProgress("cache", self.total_tokens, console=self.console, enabled=not self.console.quiet)
        bar.completed = self.manifest["tokens"]
        with bar:
            parts: list[Tensor] = []
            first, rows, started = start, 0, time.perf_counter()
            batches = harvest_batches(self.lm, self.blocks, self.layers, self.cfg.keep_bos, self.cfg.batch_size, start, self.n_blocks)
            for batch_start, acts in zip(range(start, self.n_blocks, self.cfg.batch_size), batches):
                parts.append(acts.to("cpu", self.dtype))
                rows += acts.shape[0]
                end = min(batch_start + self.cfg.batch_size, self.n_blocks)
                bar.advance(acts.shape[0])
                if rows >= rows_per_shard or end == self.n_blocks:
                    self._write_shard(torch.cat(parts), first, end, time.perf_counter() - started)
                    parts, first, rows, started = [], end, 0, time.perf_counter()
        self.manifest["status"] = "complete"
        write_json(self.out / MANIFEST_FILE, self.manifest)
        m = self.manifest
        self.console.print(f"wrote a cache of {m['tokens']:,} tokens of blocks {self.layers} ({decimal(m['bytes'])}) in "
                           f"{self.out}", highlight=False, soft_wrap=True)
        return self.out

    def _write_shard(self, acts_NLD: Tensor, first_block: int, end_block: int, seconds: float) -> None:
        """The shard file first, then the manifest that lists it: the manifest never names a partial shard."""
        m = self.manifest
        name = SHARD_FILE.format(len(m["shards"]))
        path = self.out / name
        write_safetensors(path, {"acts": acts_NLD, "kept_per_block": self.kept[first_block:end_block].clone()})
        record = {
            "file": name,
            "tokens": acts_NLD.shape[0],
            "first_block": first_block,
            "end_block": end_block,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        m["shards"].append(record)
        m["tokens"] += record["tokens"]
        m["blocks"] = end_block
        m["bytes"] += record["bytes"]
        m["harvest_seconds"] += seconds
        write_json(self.out / MANIFEST_FILE, m)
        if self.on_shard is not None:
            self.on_shard(record)


def _existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor: where the disk usage can be asked before anything is created."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


# --- reading ---------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RouteSAEError(
            f"{path} is not an activation cache (no {MANIFEST_FILE}); write one with `routesae cache --out {path} ...`"
        )
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RouteSAEError(f"{manifest_path} is not an activation-cache manifest; pass a directory written by `routesae cache`")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RouteSAEError(f"{path} was written by a newer routesae ({manifest.get('routesae_version')}); upgrade routesae")
    return manifest


def _same_source(given: str, cached: str) -> bool:
    """Two model or dataset specs naming the same thing (the same string, or paths to one file or folder)."""
    if given == cached:
        return True
    a, b = Path(given).expanduser(), Path(cached).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


class ActivationCache:
    """A complete cache directory, opened for reading."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest.get("status") != "complete":
            done, planned = manifest.get("tokens", 0), manifest.get("planned", {}).get("tokens", 0)
            raise RouteSAEError(
                f"the activation cache in {self.path} is unfinished ({done:,} of {planned:,} tokens); finish it by "
                "running the same `routesae cache` command again"
            )
        self.manifest = manifest
        self.request: dict[str, Any] = manifest["request"]["cache"]
        self.layers: list[int] = manifest["layers"]
        self.model = CachedModel(manifest["model"])
        self.data: dict[str, Any] = manifest["data"]
        self.tokens: int = manifest["tokens"]
        self.shards: list[dict[str, Any]] = manifest["shards"]
        for shard in self.shards:
            file = self.path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                raise RouteSAEError(
                    f"the activation cache in {self.path} is damaged: {shard['file']} is missing or has the wrong size; "
                    "write it again with `routesae cache ... --overwrite`"
                )

    def summary(self) -> dict[str, Any]:
        """What ``routesae cache --json`` prints: size and harvest speed of the whole cache."""
        m = self.manifest
        seconds = m["harvest_seconds"]
        return {
            "path": str(self.path),
            "model": m["model"]["spec"],
            "layers": self.layers,
            "dtype": m["dtype"],
            "tokens": self.tokens,
            "bytes": m["bytes"],
            "shards": len(self.shards),
            "seconds": seconds,
            "tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0,
        }

    @cached_property
    def kept_per_block(self) -> list[int]:
        """Kept positions of every cached block, in corpus order."""
        kept = []
        for shard in self.shards:
            with safe_open(self.path / shard["file"], "pt") as f:
                kept += f.get_tensor("kept_per_block").tolist()
        return kept

    def verify(self) -> None:
        """Check every shard against the SHA-256 in the manifest (reads the whole cache)."""
        for shard in self.shards:
            if file_sha256(self.path / shard["file"]) != shard["sha256"]:
                raise RouteSAEError(
                    f"the activation cache in {self.path} is damaged: {shard['file']} does not match its checksum; "
                    "write it again with `routesae cache ... --overwrite`"
                )

    def rows(self, start: int, end: int, layers: Sequence[int] | None = None) -> Tensor:
        """Cached rows ``start..end`` (corpus order) of ``layers`` (default: all cached blocks) as float32 ``[n, L, D]``."""
        index = None if layers is None or list(layers) == self.layers else torch.tensor(self._slots(layers))
        parts, offset = [], 0
        for shard in self.shards:
            lo, hi = max(start, offset), min(end, offset + shard["tokens"])
            if lo < hi:
                with safe_open(self.path / shard["file"], "pt") as f:
                    part = f.get_slice("acts")[lo - offset : hi - offset]
                parts.append(part if index is None else part.index_select(1, index))
            offset += shard["tokens"]
        return torch.cat(parts).to(torch.float32)

    def _slots(self, layers: Sequence[int]) -> list[int]:
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise RouteSAEError(f"the activation cache in {self.path} holds blocks {self.layers}, not {missing}")
        return [self.layers.index(layer) for layer in layers]

    def missing_blocks(self, layers: Sequence[int]) -> list[int]:
        return sorted(set(layers) - set(self.layers))

    def check_train_config(self, cfg: HarvestConfig) -> None:
        """Training from this cache must read the same data and positions, and no more tokens than it holds
        (times ``--epochs``)."""
        for name in IDENTITY:
            given, cached = getattr(cfg, name), self.request[name]
            same = _same_source(given, cached) if name in ("model", "dataset") else given == cached
            if not same:
                option = "--" + name.replace("_", "-")
                raise RouteSAEError(
                    f"the activation cache in {self.path} was harvested with {option} {cached!r}, not {given!r}; "
                    f"drop {option} (training from a cache takes it from the cache) or cache again with {option} {given!r}"
                )
        passes = getattr(cfg, "epochs", None) or 1  # training's --epochs: that many passes over the cached tokens
        if cfg.tokens is not None and cfg.tokens > passes * self.tokens:
            fix = too_few_tokens_advice(cfg.tokens, self.tokens, passes, "cache more (routesae cache --tokens ...)")
            raise RouteSAEError(
                f"asked for {cfg.tokens:,} training tokens but the activation cache in {self.path} holds {self.tokens:,}{fix}"
            )


class CachedStream(ShuffledStream):
    """The trainer's stream, served from a cache: same groups, same permutations, no language model."""

    def __init__(self, cache: ActivationCache, layers: Sequence[int], **shuffle: Any) -> None:
        """``shuffle``: the keyword arguments of :class:`ShuffledStream` (batch sizes, buffer, seed, position)."""
        self.cache = cache
        self.layers = list(layers)
        kept = cache.kept_per_block
        self.first_row = torch.tensor([0, *kept]).cumsum(0).tolist()  # row of each block's first kept position
        super().__init__(kept, **shuffle)

    def harvest(self, group: Group) -> Tensor:
        """The cached rows of this process's LM batches of ``group``, one read per run of adjacent batches."""
        runs: list[list[int]] = []
        for first, end in self.lm_batches(group):
            if runs and runs[-1][1] == first:
                runs[-1][1] = end
            else:
                runs.append([first, end])
        parts = [self.cache.rows(self.first_row[first], self.first_row[end], self.layers) for first, end in runs]
        if not parts:  # under torchrun, a group of fewer LM batches than ranks: this rank's share is empty
            return torch.empty(0, len(self.layers), self.cache.model.d_model)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
