"""Top-activating contexts per latent (docs/reference.md §7.1), vectorised, for many SAEs in one pass.

One pass over the ``apply`` split serves every SAE of one model: per batch, one forward captures
every block the SAEs read. For each SAE, all (token, latent) pairs with z > ``threshold`` are found
with tensor ops and merged into running top-N tables (:mod:`routesae.contexts.topn`):

- per (latent, token class), the ``top_per_class`` highest activations (what is shown);
- per latent, the hits with the highest random keys (a key hashed from seed, block, position and
  latent: a uniform sample of all hits, independent of batching and of the other SAEs), from which
  ``held_out`` contexts not among the shown ones are drawn for detection scoring;
- per pool window (random sentences of the split, chosen before the pass), the maximum activation
  of every latent, so ``non_activating`` can list windows where a latent never fires.

Text is built only at the end, for the contexts written out. Each latent's dashboard — its firing
frequency, a histogram of its positive activations, and its logit lens — is gathered in the same pass
(:mod:`routesae.contexts.dashboard`). Latents are those of the SAE's own
input, as in training (``sae(acts).latents``): for RouteSAE the routed (p-scaled) vector, whose
block — the router's argmax — is recorded with each context.

Positions: real tokens, never padding; position 0 (the attention sink) only when the SAE was
trained with ``keep_bos`` (:func:`routesae.activations.training_positions`), and never a special
token (BOS, EOS between documents), which has no text to explain. See
:mod:`routesae.contexts.windows` for the window rules and how they differ from the reference.

Under ``torchrun`` (``torchrun --nproc-per-node N -m routesae contexts ...``) each rank reads every
N-th batch; the ranks' counts and maxima are combined and their top-N candidates merged in the
order one process would have met them (by row and position), so ``contexts.json`` is exactly what
one process writes. Rank 0 writes it.

Thresholds: the reference uses 15 for Llama-3.2-1B (d_model 2048). Inputs are standardised per
token, so ‖x‖ ≈ √d and latent activations scale roughly with √d: 15·√(576/2048) ≈ 8 for SmolLM2.
Briefly trained SAEs spread their activations thinly, so a threshold near the 90th percentile of
positive activations is the useful one (docs/contexts.md gives the measured distribution on the
demo SAEs and what each threshold keeps). Each SAE's summary line gives its hits per token and
largest activation, so a far-off threshold shows at once.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from routesae.activations import training_positions
from routesae.architectures.base import SAE, Inference, SAEOutput
from routesae.checkpoint import load_sae, read_sae_config
from routesae.config import setting
from routesae.contexts.dashboard import FiringHistogram, LogitLens
from routesae.contexts.schema import FORMAT, FORMAT_VERSION
from routesae.contexts.topn import TopN
from routesae.contexts.windows import Vocabulary, crop, sentence_bounds, window_tokens
from routesae.data import TokenBlocks, leading_blocks
from routesae.distributed import Ranks, joined
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import write_json
from routesae.lm import LanguageModel
from routesae.loading import corpus_for, model_for, stage_device
from routesae.locks import writing_files
from routesae.progress import JobProgress
from routesae.rundir import CONTEXTS_FILE, expand_dirs
from routesae.stage_config import StageConfig, infer_k_setting, theta_setting
from routesae.version import __version__

SPLIT = "apply"
NO_LAYER = -1
SHOWN_BOUND_WITHOUT_CLASS_FILTER = 256  # classes assumed shown when sizing the held-out sample, if max_classes=0
_HASH_MOD = 2**31 - 1  # keys stay below 2^31, so products with the multipliers fit in int64
_HASH_MULTIPLIERS = (1_103_515_245, 48_271, 69_621)
_PAYLOAD = {"row": torch.long, "position": torch.long, "layer": torch.long, "activation": torch.float32}


# The default threshold rule: the top quarter of each SAE's activations. A fixed number means something else at
# every width and training length (the reference's 15, for d_model 2048 and 100M training tokens, keeps no latent of
# the demo's SmolLM2 SAEs); a percentile of the SAE's own activations keeps latents on both (docs/contexts.md).
DEFAULT_THRESHOLD = "p75"
REFERENCE_THRESHOLD, REFERENCE_WIDTH = 15.0, 2048
PERCENTILE_TOKENS = 4096  # apply tokens whose non-zero activations set a percentile threshold
QUANTILE_MAX = 2**24 - 1  # torch.quantile's input limit; a larger set is sampled (seeded)
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def threshold_rule(threshold: float | str) -> tuple[str, float]:
    """("number" | "scaled" | "percentile", its number): a threshold setting, checked."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
        return "number", float(threshold)
    if threshold == "scaled":
        return "scaled", REFERENCE_THRESHOLD
    match = _PERCENTILE.match(str(threshold))
    if match and 0 < float(match.group(1)) < 100:
        return "percentile", float(match.group(1))
    try:
        return threshold_rule(float(threshold))
    except ValueError:
        raise ConfigError(
            f"threshold {threshold!r} is neither a number nor a rule: give e.g. 4, 'scaled' (15 x sqrt(d_model/2048)) "
            "or 'p75' (the 75th percentile of the SAE's non-zero activations)"
        ) from None


@dataclass
class ContextsConfig(StageConfig):
    """What an extraction is asked for (``routesae contexts``' options, the pipeline's ``contexts``)."""

    EXECUTION_SETTINGS = ("batch_size",)  # hits are independent of batching

    threshold: float | str = setting(
        DEFAULT_THRESHOLD,
        "A latent activates at a token when z > threshold: a number; 'scaled', the reference's 15 for d_model 2048 "
        "times sqrt(d_model/2048); or 'pNN' (e.g. p75), that percentile of the SAE's non-zero activations on the "
        "first 4,096 apply tokens, which means the same at any width and training length.",
    )
    window: int = setting(64, "Most tokens per context (a sentence around the token, cropped around it).")
    top_per_class: int = setting(2, "Contexts kept per (latent, activating-token class), highest first.")
    max_classes: int = setting(32, "Drop latents that fire on more token classes than this (0: keep all).")
    min_contexts: int = setting(5, "Keep latents with at least this many shown contexts.")
    held_out: int = setting(5, "Random extra contexts per latent (and non-activating windows) for detection.")
    pool: int = setting(100, "Random windows of the split, the negatives for detection.")
    tokens: int | None = setting(None, "Apply-split tokens to read. Default: the whole apply split.")
    batch_size: int = setting(8, "Sequences per language-model batch.")
    infer_k: int | None = infer_k_setting("every SAE")
    theta: float | None = theta_setting("every SAE")
    seed: int = setting(0, "Seed of the held-out sample and the pool.")
    logit_lens: int = setting(
        10, "Tokens each kept latent's direction promotes (and suppresses) most through the final norm's gain and the "
        "unembedding, for the report's logit lens (0: none).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        kind, value = threshold_rule(self.threshold)  # neither a number nor a rule: refused before anything loads
        if kind == "number":
            self.threshold = value  # "4" from the command line is the number 4
        positive = {"window": self.window, "top_per_class": self.top_per_class, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("max_classes", "min_contexts", "held_out", "pool", "logit_lens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError(f"tokens must be positive, got {self.tokens}")
        if self.max_classes and self.min_contexts > self.max_classes * self.top_per_class:
            raise ConfigError(
                f"min_contexts={self.min_contexts} can never be met: a latent shows at most max_classes × top_per_class "
                f"= {self.max_classes * self.top_per_class} contexts; lower --min-contexts or raise --max-classes/--top-per-class"
            )
        Inference(k=self.infer_k, theta=self.theta)  # --infer-k with --theta fails here

    @property
    def sample_size(self) -> int:
        """Random hits kept per latent: enough that ``held_out`` remain after removing the shown ones."""
        if not self.held_out:
            return 0
        classes = self.max_classes or SHOWN_BOUND_WITHOUT_CLASS_FILTER
        return self.held_out + classes * self.top_per_class


def random_key(seed: int, row: Tensor, position: Tensor, latent: Tensor) -> Tensor:
    """A float in [0, 1) per hit, a hash of (seed, row, position, latent): a random order that no batching changes."""
    h = torch.full_like(row, seed % _HASH_MOD)
    for value, multiplier in zip((row, position, latent), _HASH_MULTIPLIERS):
        h = (h * multiplier + value) % _HASH_MOD
        h = h ^ (h >> 13)
        h = (h * _HASH_MULTIPLIERS[0]) % _HASH_MOD
    return h.double().div(_HASH_MOD).float()


class Extraction:
    """One SAE's running state during the pass."""

    def __init__(
        self, directory: Path, config: dict[str, Any], sae: SAE, cfg: ContextsConfig, n_classes: int, n_pool: int
    ) -> None:
        self.directory, self.config, self.sae, self.cfg = directory, config, sae, cfg
        self.threshold = threshold_rule(cfg.threshold)[1]  # a rule's number is set by resolve_thresholds before the pass
        device = next(sae.parameters()).device
        self.F = sae.cfg.latent_size
        self.n_classes = n_classes
        self.keep_bos = bool(config.get("data", {}).get("keep_bos", False))
        self.top = TopN(cfg.top_per_class, _PAYLOAD, device)
        self.sample = TopN(cfg.sample_size, _PAYLOAD, device)
        self.hits = torch.zeros(self.F, dtype=torch.long, device=device)
        self.max_activation = torch.full((self.F,), -math.inf, device=device)
        self.overflow = torch.zeros(self.F, dtype=torch.bool, device=device)
        self.pool_max = torch.full((n_pool, self.F), -math.inf, device=device)
        self.histogram = FiringHistogram(self.F, device)

    def reduce(self, ranks: Ranks, T: int) -> None:
        """Combine every rank's tables into this one's (under ``torchrun``): what one process reading all batches holds."""
        ranks.sum_([self.hits])
        self.histogram.reduce(ranks)
        for maxima in (self.max_activation, self.overflow, self.pool_max):
            ranks.max_(maxima)
        for table in (self.top, self.sample):
            rows = {name: ranks.gather_rows(column) for name, column in table.rows.items()}
            group, score = ranks.gather_rows(table.group), ranks.gather_rows(table.score)
            met = torch.sort(rows["row"] * T + rows["position"], stable=True).indices  # one process's order of hits
            table.clear()
            table.update(group[met], score[met], **{name: column[met] for name, column in rows.items()})
        self.drop_overflowing()

    def drop_overflowing(self) -> None:
        """Latents shown for more than ``max_classes`` token classes are dropped (and their later hits skipped)."""
        if self.cfg.max_classes:
            classes = torch.bincount(torch.unique_consecutive(self.top.group) // self.n_classes, minlength=self.F)
            self.overflow |= classes > self.cfg.max_classes
            self.top.keep(~self.overflow[self.top.group // self.n_classes])

    def hit_layers(self, out: SAEOutput, n: int) -> Tensor:
        """The block each token was read at (:meth:`~routesae.SAE.routed_blocks`), or ``NO_LAYER`` for every token."""
        blocks = self.sae.routed_blocks(out)
        return torch.full((n,), NO_LAYER, device=out.latents.device) if blocks is None else blocks

    def update(self, acts_BTLD: Tensor, slots: list[int], ids_BT: Tensor, mask_BT: Tensor, first_row: int, tables: Tables,
               pool_windows: list[tuple[int, int, int, int]]) -> None:
        B, T = ids_BT.shape
        with torch.no_grad():
            out = self.sae(acts_BTLD[:, :, slots].reshape(B * T, len(slots), -1))
        z_NF = out.latents
        counted_N = (training_positions(mask_BT, self.keep_bos) & ~tables.special[ids_BT]).reshape(-1)
        self.histogram.update(z_NF, counted_N)
        n, f = ((z_NF > self.threshold) & counted_N[:, None]).nonzero(as_tuple=True)
        activation = z_NF[n, f]
        self.hits += torch.bincount(f, minlength=self.F)
        self.max_activation.scatter_reduce_(0, f, activation, "amax")
        payload = {"row": first_row + n // T, "position": n % T, "layer": self.hit_layers(out, B * T)[n], "activation": activation}
        fresh = ~self.overflow[f]  # a latent past max_classes is dropped anyway: skip its hits
        self.top.update(f[fresh] * self.n_classes + tables.class_id[ids_BT.reshape(-1)[n[fresh]]], activation[fresh],
                        **{k: v[fresh] for k, v in payload.items()})
        self.drop_overflowing()
        self.sample.update(f, random_key(self.cfg.seed, payload["row"], payload["position"], f), **payload)
        counted_BT = counted_N.view(B, T)
        for p, row, lo, hi in pool_windows:
            inside = counted_BT[row - first_row, lo : hi + 1]
            if inside.any():
                z = z_NF.view(B, T, -1)[row - first_row, lo : hi + 1][inside]
                self.pool_max[p] = torch.maximum(self.pool_max[p], z.amax(0))


@dataclass
class Tables:
    """Vocabulary tables on the model's device, plus the text-side tables on the CPU."""

    vocab: Vocabulary
    class_id: Tensor
    special: Tensor


def apply_blocks(blocks: TokenBlocks, tokens: int | None) -> tuple[int, int]:
    """(blocks to read, counted tokens in them) of the apply split; an empty split is an error."""
    counted_BT = training_positions(blocks.attention_mask, keep_bos=False)
    if not counted_BT.any():
        raise RouteSAEError("the apply split holds no tokens: the corpus is too small; use a larger --dataset")
    return leading_blocks(counted_BT, tokens, "apply")


def choose_pool(ids_BT: Tensor, counted_BT: Tensor, start_BT: Tensor, end_BT: Tensor, cfg: ContextsConfig) -> Tensor:
    """``[P, 3]`` (row, first, last) of ``cfg.pool`` distinct random sentence windows, in a seeded order."""
    rows, positions = counted_BT.nonzero(as_tuple=True)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    rows, positions = rows[order], positions[order]
    lo, hi = crop(start_BT[rows, positions], end_BT[rows, positions], positions, cfg.window)
    windows = torch.stack([rows, lo, hi], 1)
    unique, inverse = torch.unique(windows, dim=0, return_inverse=True)
    first_seen = torch.full((len(unique),), len(windows), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(windows)), "amin"
    )
    return windows[first_seen.sort().values[: cfg.pool]]


def extract_contexts(
    sae_dirs: Path | str | Sequence[Path | str],
    cfg: ContextsConfig | None = None,
    *,
    lm: LanguageModel | None = None,
    device: str | torch.device | None = None,
    **settings: Any,
) -> dict[str, dict[str, Any]]:
    """Extract top-activating contexts for SAEs of one model in one pass over the ``apply`` split.

    ``cfg`` says how (:class:`ContextsConfig`; keyword ``settings`` such as ``threshold=4.0``
    build or override it). Writes ``contexts.json`` into each SAE directory (run directories
    expand to their SAEs) and returns ``{directory: record}``. ``tokens`` (default: the whole
    split) counts real tokens except each block's position 0. See the module docstring for the
    algorithm and thresholds.

    >>> extract_contexts(["runs/demo"], threshold=5.0)
    """
    cfg = ContextsConfig.build(cfg, settings)
    if isinstance(sae_dirs, (str, Path)):
        sae_dirs = [sae_dirs]
    dirs = expand_dirs(sae_dirs)
    with (
        joined(stage_device(lm, device)) as (ranks, rank_device),
        writing_files(dirs, "contexts", [CONTEXTS_FILE], enabled=ranks.writes),
    ):
        return _extract(dirs, cfg, lm, rank_device, ranks)


def _extract(
    dirs: list[Path], cfg: ContextsConfig, lm: LanguageModel | None, device: torch.device, ranks: Ranks
) -> dict[str, dict[str, Any]]:
    configs = [read_sae_config(d) for d in dirs]
    lm = model_for(dirs, configs, lm, device)
    corpus = corpus_for(configs[0], lm)
    blocks = corpus.split(SPLIT)
    n_blocks, n_tokens = apply_blocks(blocks, cfg.tokens)
    ids_BT, mask_BT = blocks.input_ids[:n_blocks], blocks.attention_mask[:n_blocks]
    vocab = Vocabulary.build(lm.tokenizer, max(lm.vocab_size, len(lm.tokenizer), int(ids_BT.max()) + 1))
    tables = Tables(vocab, vocab.class_id.to(lm.device), vocab.special.to(lm.device))
    start_BT, end_BT = sentence_bounds(ids_BT, mask_BT, vocab)
    counted_BT = training_positions(mask_BT, keep_bos=False) & ~vocab.special[ids_BT]
    pool_windows = choose_pool(ids_BT, counted_BT, start_BT, end_BT, cfg)

    with ExitStack() as overrides:
        extractions = []
        for directory, config in zip(dirs, configs):
            sae = load_sae(directory, lm.device)[0]
            if sae.vectors_per_token > 1:
                raise ConfigError(
                    f"{directory.name}: a {sae.name} SAE has one activation per token and block, and contexts rank one "
                    "per token; evaluate it (per block), or extract contexts from a single-block SAE"
                )
            overrides.enter_context(sae.inference(Inference(k=cfg.infer_k, theta=cfg.theta)))
            extractions.append(Extraction(directory, config, sae, cfg, len(vocab.class_names), len(pool_windows)))
        resolve_thresholds(lm, extractions, ids_BT, mask_BT, tables, cfg.batch_size)
        _pass(lm, extractions, ids_BT, mask_BT, tables, pool_windows, cfg.batch_size, ranks)
    if ranks.distributed:
        for e in extractions:
            e.reduce(ranks, ids_BT.shape[1])

    data = {"source": corpus.source, "split": SPLIT, "fingerprint": corpus.fingerprint}
    recorded = {**cfg.request(), "tokens": n_tokens, "data": data}
    results = {}
    console = Console(stderr=True)
    lens = LogitLens(lm, vocab.texts, cfg.logit_lens)
    for e in extractions:
        record = _record(e, recorded, ids_BT, start_BT, end_BT, pool_windows, lm.tokenizer, vocab, lens)
        results[str(e.directory)] = record
        if ranks.writes:
            write_json(e.directory / CONTEXTS_FILE, record)
            _summarise(console, e, record, n_tokens)
    return results


def resolve_thresholds(lm: LanguageModel, extractions: list[Extraction], ids_BT: Tensor, mask_BT: Tensor,
                       tables: Tables, batch_size: int) -> None:
    """Each SAE's threshold as a number: 'scaled' from its width, a percentile from its activations on the first
    ``PERCENTILE_TOKENS`` counted tokens (real tokens but position 0 and special tokens; every rank reads the same
    ones, so ranks agree)."""
    percentiles = []
    for e in extractions:
        kind, value = threshold_rule(e.cfg.threshold)
        if kind == "scaled":
            e.threshold = value * math.sqrt(e.sae.d_model / REFERENCE_WIDTH)
        elif kind == "percentile":
            percentiles.append((e, value))
    if not percentiles:
        return
    layers = sorted({block for e, _ in percentiles for block in e.sae.layers})
    values: dict[int, list[Tensor]] = {id(e): [] for e, _ in percentiles}
    seen = 0
    for first in range(0, len(ids_BT), batch_size):
        if seen >= PERCENTILE_TOKENS:
            break
        ids, mask = ids_BT[first : first + batch_size].to(lm.device), mask_BT[first : first + batch_size].to(lm.device)
        B, T = ids.shape
        acts = lm.capture(ids, mask, layers)
        counted_N = (training_positions(mask, keep_bos=False) & ~tables.special[ids]).reshape(-1)
        for e, _ in percentiles:
            slots = [layers.index(block) for block in e.sae.layers]
            with torch.no_grad():
                z_NF = e.sae(acts[:, :, slots].reshape(B * T, len(slots), -1)).latents[counted_N][: PERCENTILE_TOKENS - seen]
            values[id(e)].append(z_NF[z_NF != 0].float().cpu())
        seen += int(counted_N.sum())
    for e, percentile in percentiles:
        active = torch.cat(values[id(e)])
        if not len(active):
            raise RouteSAEError(f"{e.directory}: no latent fired on the first {seen:,} apply tokens, so there is no "
                                f"p{percentile:g} to take; give --threshold a number")
        e.threshold = float(torch.quantile(active[torch.randperm(len(active), generator=torch.Generator().manual_seed(0))
                                                  [:QUANTILE_MAX]], percentile / 100))


def _pass(lm: LanguageModel, extractions: list[Extraction], ids_BT: Tensor, mask_BT: Tensor, tables: Tables,
          pool_windows: Tensor, batch_size: int, ranks: Ranks) -> None:
    layers = sorted({block for e in extractions for block in e.sae.layers})
    slots = [[layers.index(block) for block in e.sae.layers] for e in extractions]
    pool_by_row: dict[int, list[tuple[int, int, int, int]]] = {}
    for p, (row, lo, hi) in enumerate(pool_windows.tolist()):
        pool_by_row.setdefault(row, []).append((p, row, lo, hi))
    starts = [batch * batch_size for batch in ranks.batches(math.ceil(len(ids_BT) / batch_size), SPLIT)]
    real = mask_BT.sum(-1)
    with JobProgress("contexts", int(sum(real[first : first + batch_size].sum() for first in starts)),
                     enabled=ranks.writes) as bar:
        for first in starts:
            ids, mask = ids_BT[first : first + batch_size].to(lm.device), mask_BT[first : first + batch_size].to(lm.device)
            acts = lm.capture(ids, mask, layers)
            in_batch = [w for row in range(first, first + len(ids)) for w in pool_by_row.get(row, [])]
            for e, s in zip(extractions, slots):
                e.update(acts, s, ids, mask, first, tables, in_batch)
            bar.advance(int(real[first : first + batch_size].sum()))


def _record(e: Extraction, recorded: dict[str, Any], ids_BT: Tensor, start_BT: Tensor, end_BT: Tensor,
            pool_windows: Tensor, tokenizer: Any, vocab: Vocabulary, lens: LogitLens) -> dict[str, Any]:
    top = {k: v.cpu() for k, v in e.top.rows.items()}
    top_latent = e.top.group.cpu() // e.n_classes
    top_class = e.top.group.cpu() % e.n_classes
    shown = torch.bincount(top_latent, minlength=e.F)
    classes = torch.bincount(torch.unique_consecutive(e.top.group.cpu()) // e.n_classes, minlength=e.F)
    kept = (shown >= max(e.cfg.min_contexts, 1)) & ~e.overflow.cpu()
    if e.cfg.max_classes:
        kept &= classes <= e.cfg.max_classes
    in_kept = kept[top_latent]

    sample = {k: v.cpu() for k, v in e.sample.rows.items()}
    sample_latent = e.sample.group.cpu()
    T = ids_BT.shape[1]
    shown_key = (top["row"][in_kept] * T + top["position"][in_kept]) * e.F + top_latent[in_kept]
    candidate = kept[sample_latent] & ~torch.isin((sample["row"] * T + sample["position"]) * e.F + sample_latent, shown_key)
    held = candidate.nonzero().squeeze(1)
    rank = torch.arange(len(held)) - torch.searchsorted(sample_latent[held], sample_latent[held], side="left")
    held = held[rank < e.cfg.held_out]

    rows = torch.cat([top["row"][in_kept], sample["row"][held]])
    positions = torch.cat([top["position"][in_kept], sample["position"][held]])
    contexts = _contexts(rows, positions, torch.cat([top["activation"][in_kept], sample["activation"][held]]),
                         torch.cat([top["layer"][in_kept], sample["layer"][held]]), ids_BT, start_BT, end_BT,
                         e.cfg.window, tokenizer, vocab)
    pool = [_context(tokens, None, 0.0, NO_LAYER, row, lo) for tokens, (row, lo, _) in zip(
        window_tokens(tokenizer, vocab, [ids_BT[r, lo : hi + 1].tolist() for r, lo, hi in pool_windows.tolist()]),
        pool_windows.tolist())]

    latents: dict[str, Any] = {}
    kept_ids = kept.nonzero().squeeze(1).tolist()
    firing = e.histogram.records(kept_ids)
    lens_setting, directions = lens.setting(e.sae)
    logit_lens = lens.tokens(directions, kept_ids) if directions is not None else {}
    for latent in kept_ids:
        latents[str(latent)] = {
            "activations": int(e.hits[latent]),
            "max_activation": float(e.max_activation[latent]),
            "classes": {},
            "held_out": [],
            "non_activating": _non_activating(e, latent),
            **firing[latent],
            "logit_lens": logit_lens.get(latent),
        }
    n_shown = int(in_kept.sum())
    for context, latent, cls in zip(contexts[:n_shown], top_latent[in_kept].tolist(), top_class[in_kept].tolist()):
        latents[str(latent)]["classes"].setdefault(vocab.class_names[cls], []).append(context)
    for context, latent in zip(contexts[n_shown:], sample_latent[held].tolist()):
        latents[str(latent)]["held_out"].append(context)
    for record in latents.values():
        record["classes"] = dict(sorted(record["classes"].items()))

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "routesae_version": __version__,
        "sae": e.config.get("name", e.directory.name),
        "architecture": e.sae.name,
        "model": e.config["model"]["spec"],
        "latent_size": e.F,
        "settings": {**recorded, "threshold": e.threshold, "threshold_rule": e.cfg.threshold},
        "hits": int(e.hits.sum()),
        "counted_tokens": int(e.histogram.tokens.sum()),
        "logit_lens": lens_setting,
        "interpretable_latents": len(latents),
        "latents": latents,
        "pool": pool,
    }


def _non_activating(e: Extraction, latent: int) -> list[int]:
    """Up to ``held_out`` pool windows (a seeded random choice) where the latent is never positive."""
    inactive = (e.pool_max[:, latent] <= 0).nonzero().squeeze(1).cpu()
    keys = random_key(e.cfg.seed + 1, inactive, torch.zeros_like(inactive), torch.full_like(inactive, latent))
    return sorted(inactive[keys.argsort(descending=True)[: e.cfg.held_out]].tolist())


def _contexts(rows: Tensor, positions: Tensor, activations: Tensor, layers: Tensor, ids_BT: Tensor, start_BT: Tensor,
              end_BT: Tensor, window: int, tokenizer: Any, vocab: Vocabulary) -> list[dict[str, Any]]:
    lo, hi = crop(start_BT[rows, positions], end_BT[rows, positions], positions, window)
    spans = list(zip(rows.tolist(), lo.tolist(), hi.tolist()))
    texts = window_tokens(tokenizer, vocab, [ids_BT[r, a : b + 1].tolist() for r, a, b in spans])
    return [
        _context(tokens, position - a, activation, layer, row, position)
        for tokens, (row, a, _), position, activation, layer in zip(
            texts, spans, positions.tolist(), activations.tolist(), layers.tolist()
        )
    ]


def _context(tokens: list[str], index: int | None, activation: float, layer: int, row: int, position: int) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "index": index,
        "activation": activation,
        "layer": None if layer == NO_LAYER else layer,
        "document": row,
        "position": position,
    }


def _summarise(console: Console, e: Extraction, record: dict[str, Any], n_tokens: int) -> None:
    hits, kept, threshold = record["hits"], record["interpretable_latents"], e.threshold
    top = float(e.max_activation.max()) if hits else None
    largest = f", largest {top:.3g}" if top is not None else ""
    console.print(
        f"{record['sae']}: {hits:,} activations > {threshold:g} ({hits / max(n_tokens, 1):.3g} per token{largest}); "
        f"{kept:,} of {e.F:,} latents kept ({kept / e.F:.1%}) → {e.directory / CONTEXTS_FILE}"
    )
    if not kept:
        hint = (
            "no activation exceeded the threshold: lower --threshold, or give a rule that follows the SAE (p75, scaled)"
            if not hits else "no latent passed the filters: lower --min-contexts or raise --max-classes"
        )
        warnings.warn(f"{record['sae']}: 0 interpretable latents; {hint}", stacklevel=3)
