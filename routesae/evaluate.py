"""Evaluate SAEs by splicing their reconstructions into the model, on the ``eval`` split.

One pass over the data serves every SAE: per batch, one clean forward captures the residual
stream of all blocks the SAEs read and one gives the clean logits. Each SAE then runs on the
clean activations at every position (so routing decisions come from the clean forward), and
its ``reconstruction()`` says which tokens it replaces at which block. The spliced, zero- and
mean-ablated forwards are run only if a requested metric needs them, once per SAE and batch.
Each starts at the SAE's first block, from the clean stream captured after the block before
(``LanguageModel.splice(..., after)``), where the model allows it: the blocks below compute
nothing the clean forward did not, so a TopK on block 21 of 30 runs 9 blocks per splice, not 30.

Positions (default)
    Counted positions are real tokens except each block's position 0 (the attention sink, BOS
    when the tokenizer adds one), as in training. Only counted positions are ever replaced, and
    every metric averages over them: KL is the mean per counted position; CE scores the logits at
    a counted position t on token t+1 when t+1 is a real token. ``tokens`` counts counted positions.

Positions (``reference_metrics=True``, ``--reference-metrics``)
    The reference's conventions, to set numbers beside the paper's: every position is replaced
    and counted (position 0 and padding included), KL is summed over positions and divided by
    the number of sequences (the paper's scale of ~80–430), CE is the mean over all B·(T−1)
    positions. Unlike the reference, batches are weighted by their tokens, not averaged.

Inference overrides (``infer_k``, ``theta``; ``--infer-k``, ``--theta``)
    Every SAE is read with :class:`~routesae.architectures.base.Inference` in place of its trained
    activation (see there and :meth:`SAE.inference`): TopK over the pre-activations, or one global
    threshold. The record's ``settings`` say which, and ``eval.json`` is overwritten like any run.

Under ``torchrun`` (``torchrun --nproc-per-node N -m routesae evaluate ...``) each rank evaluates
every N-th batch and the metrics' sums are combined (:meth:`Metric.reduce`), so the numbers are
one process's up to the order of float additions; rank 0 writes ``eval.json`` and reports.

Recovered uses zero-ablation of the spliced positions (the reference) and also reports
``recovered_mean_ablation`` (the block's mean residual over the batch's counted positions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from routesae.activations import training_positions
from routesae.architectures.base import SAE, Inference
from routesae.checkpoint import load_sae, read_sae_config
from routesae.config import setting
from routesae.data import leading_blocks
from routesae.distributed import SINGLE, Ranks, joined
from routesae.errors import ConfigError
from routesae.faults import contained
from routesae.files import write_json
from routesae.lm import Edit, LanguageModel
from routesae.loading import corpus_for, model_for, stage_device, training_seed
from routesae.locks import writing_files
from routesae.metrics.base import FORWARDS, EvalBatch, Forward, Metric
from routesae.plugins import get_plugin_manager
from routesae.progress import JobProgress
from routesae.reporters.build import build_reporters
from routesae.rundir import EVAL_FILE, expand_dirs, run_dir_of
from routesae.stage_config import StageConfig, infer_k_setting, theta_setting
from routesae.version import __version__

SPLIT = "eval"
ALL_TOKENS, AUTO_TOKENS = "all", "auto"
# Enough for KL and the other means to settle (docs/speed.md#evaluation-tokens) in about a minute on a CPU; the
# whole eval split of the embedded corpus (54k tokens) took 13 minutes on 2 cores with 3 SAEs.
DEFAULT_TOKENS = 16_384


@dataclass
class EvaluateConfig(StageConfig):
    """How to evaluate: ``routesae evaluate``'s options, ``evaluate``'s settings, the pipeline's ``evaluate``."""

    tokens: int | Literal["auto", "all"] = setting(
        AUTO_TOKENS,
        f"Eval tokens (counted positions) to read from the start of the eval split: a number, 'all' (the whole "
        f"split), or 'auto' (the first {DEFAULT_TOKENS:,}, or the whole split when it is smaller).",
    )
    batch_size: int = setting(8, "Sequences per language-model batch.")
    reference_metrics: bool = setting(
        False,
        "The reference's conventions: every position (BOS, padding) replaced and counted, KL summed over positions "
        "and divided by sequences, CE over all B*(T-1) positions.",
    )
    infer_k: int | None = infer_k_setting("every SAE")
    theta: float | None = theta_setting("every SAE")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tokens, int) and self.tokens <= 0:
            raise ConfigError(f"tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        Inference(k=self.infer_k, theta=self.theta)  # a contradictory override fails before anything loads


def metric_classes(names: Sequence[str] | None, ranks: Ranks = SINGLE) -> list[type[Metric]]:
    """The requested metrics (default: every installed one); unknown names list what is installed.

    Under ``torchrun`` every metric must combine its ranks' sums (:meth:`Metric.reduce`).
    """
    pm = get_plugin_manager()
    classes = list(dict.fromkeys(pm.get("metric", name) for name in (names or pm.names("metric"))))
    single = [cls.name for cls in classes if not cls.reduces()]
    if ranks.distributed and single:
        raise ConfigError(
            f"metric(s) {', '.join(single)} cannot combine the sums of several ranks (no Metric.reduce): evaluate "
            "them in one process, or leave them out with --metric"
        )
    return classes


def counted_positions(attention_mask_BT: Tensor, reference: bool) -> Tensor:
    """Positions replaced and counted: see the module docstring."""
    if reference:
        return torch.ones_like(attention_mask_BT, dtype=torch.bool)
    return training_positions(attention_mask_BT, keep_bos=False)


def ce_mask(attention_mask_BT: Tensor, counted_BT: Tensor, reference: bool) -> Tensor:
    """``[B, T-1]``: the logits at t are scored on token t+1 (t counted, t+1 real; every t under reference)."""
    if reference:
        return counted_BT[:, :-1]
    return counted_BT[:, :-1] & attention_mask_BT[:, 1:].bool()


def splice_edits(
    reconstruction: dict[int, tuple[Tensor, Tensor]], counted_BT: Tensor, fill: Forward, clean: dict[int, Tensor]
) -> dict[int, Edit]:
    """Edits replacing, at each block, the counted positions the SAE reconstructs.

    ``fill`` is what they are replaced with: the reconstruction, 0, or the block's mean clean
    residual over the batch's counted positions.
    """
    B, T = counted_BT.shape
    edits: dict[int, Edit] = {}
    for block, (x_hat_ND, mask_N) in reconstruction.items():
        replace_BT1 = (mask_N.view(B, T) & counted_BT)[..., None]
        if fill == "spliced":
            value = x_hat_ND.view(B, T, -1)
        elif fill == "zero":
            value = torch.zeros_like(x_hat_ND[0])
        else:
            value = clean[block][counted_BT].mean(0)
        edits[block] = _replace(replace_BT1, value)
    return edits


def ablated_positions(reconstruction: dict[int, tuple[Tensor, Tensor]], counted_BT: Tensor) -> list[tuple[int, bytes]]:
    """Which positions of which blocks an SAE replaces: SAEs that agree share their ablated forwards.

    A zero- or mean-ablated forward depends only on these positions (never on the SAE's weights), so
    SAEs reading the same block — a k-sweep, a comparison of architectures on one layer — need one
    such forward per batch between them, not one each.
    """
    B, T = counted_BT.shape
    return [
        (block, (mask_N.view(B, T) & counted_BT).cpu().numpy().tobytes())
        for block, (_, mask_N) in sorted(reconstruction.items())
    ]


def _replace(replace_BT1: Tensor, value: Tensor) -> Edit:
    def edit(resid_BTD: Tensor) -> Tensor:
        return torch.where(replace_BT1, value.to(resid_BTD.dtype), resid_BTD)

    return edit


@dataclass
class Evaluated:
    """One SAE under evaluation and its metric accumulators."""

    directory: Path
    config: dict[str, Any]
    sae: SAE
    metrics: list[Metric]
    architecture: str  # the checkpoint's (a splice view of an MLSAE is a TopK SAE, but the record is the MLSAE's)
    block: int | None = None  # the block this view splices, for an SAE evaluated one block at a time
    seconds: float = 0.0  # this SAE's own work: its forward and its spliced forwards (the clean forwards are shared)

    @property
    def forwards(self) -> list[Forward]:
        needed = set().union(*(m.needs for m in self.metrics))
        return [f for f in FORWARDS if f in needed]


def _evaluate_batch(
    lm: LanguageModel, layers: list[int], saes: list[Evaluated], input_ids: Tensor, attention_mask: Tensor, reference: bool
) -> None:
    input_ids, attention_mask = input_ids.to(lm.device), attention_mask.to(lm.device)
    B, T = input_ids.shape
    counted_BT = counted_positions(attention_mask, reference)
    acts_BTLD = lm.capture(input_ids, attention_mask, layers)
    after = {block: acts_BTLD[:, :, i] for i, block in enumerate(layers)}  # where spliced forwards may start
    clean_logits = lm.logits(input_ids, attention_mask) if any(s.forwards for s in saes) else None
    ablated: dict[tuple[Any, ...], Tensor] = {}
    for s in saes:
        started = time.perf_counter()
        slots = [layers.index(block) for block in s.sae.layers]
        acts_NLD = acts_BTLD[:, :, slots].reshape(B * T, len(slots), -1)
        with torch.no_grad():
            out = s.sae(acts_NLD)
            reconstruction = s.sae.reconstruction(out)
        clean = {block: acts_BTLD[:, :, layers.index(block)] for block in s.sae.layers}
        logits = {} if clean_logits is None else {"clean": clean_logits}
        edits = partial(splice_edits, reconstruction, counted_BT, clean=clean)
        replaced = ablated_positions(reconstruction, counted_BT) if set(s.forwards) - {"spliced"} else []
        for fill in s.forwards:
            if fill == "spliced":
                logits[fill] = lm.splice(input_ids, attention_mask, edits(fill=fill), after)
                continue
            key = (fill, *replaced)
            if key not in ablated:
                ablated[key] = lm.splice(input_ids, attention_mask, edits(fill=fill), after)
            logits[fill] = ablated[key]
        batch = EvalBatch(
            input_ids_BT=input_ids,
            counted_BT=counted_BT,
            ce_mask_BT=ce_mask(attention_mask, counted_BT, reference),
            reference=reference,
            out=out,
            reconstruction=reconstruction,
            clean=clean,
            logits=logits,
        )
        for metric in s.metrics:
            metric.update(batch)
        s.seconds += time.perf_counter() - started


def evaluate(
    sae_dirs: Path | str | Sequence[Path | str],
    metrics: Sequence[str] | None = None,
    cfg: EvaluateConfig | None = None,
    *,
    lm: LanguageModel | None = None,
    device: str | torch.device | None = None,
    reporters: Sequence[str] = ("console",),
    **settings: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate SAEs of one model on the ``eval`` split in one pass; returns ``{directory: record}``.

    ``cfg`` says how (:class:`EvaluateConfig`; keyword ``settings`` such as ``tokens=4096`` build
    or override it). ``tokens`` (default: up to 16,384) counts counted positions. The data is
    the eval split of the first SAE's training data (same source, context length and split seed).
    Each record also goes to ``eval.json`` in its checkpoint directory. ``infer_k`` or ``theta``
    (not both) replaces every SAE's trained activation (see the module docstring). The records
    also go to ``reporters`` (and always to the run's ``metrics.jsonl``), one set per run directory.

    >>> evaluate(["runs/demo"], ["kldiv", "l0"], tokens=100_000)
    """
    cfg = EvaluateConfig.build(cfg, settings)
    if isinstance(sae_dirs, (str, Path)):
        sae_dirs = [sae_dirs]
    dirs = expand_dirs(sae_dirs)
    with (
        joined(stage_device(lm, device)) as (ranks, rank_device),
        writing_files(dirs, "evaluate", [EVAL_FILE], enabled=ranks.writes),
    ):
        # rank 0 reports; its reporters are built first, so a bad one fails before any work
        runs = {run: build_reporters(reporters, run) if ranks.writes else [] for run in dict.fromkeys(map(run_dir_of, dirs))}
        try:
            with contained("while evaluating", "the SAEs are untouched: evaluate again once it is fixed"):
                results = _evaluate(dirs, metrics, cfg, lm, rank_device, ranks)
            for run, run_reporters in runs.items():
                records = [results[str(d)] for d in dirs if run_dir_of(d) == run]
                for reporter in run_reporters:
                    reporter.evaluation(records)
            return results
        finally:
            for run_reporters in runs.values():
                for reporter in run_reporters:
                    reporter.close()


def view_metrics(views: list[Evaluated]) -> dict[str, Any]:
    """``{"metrics": ..., "details": ...}`` of one SAE; for one evaluated a block at a time, the mean over its
    blocks, and each block's metrics and details under ``"per_block"`` (the MLSAE's per-layer and mean metrics, as
    the paper reports them)."""
    results = [{k: v for m in view.metrics for k, v in m.result().items()} for view in views]
    details = [{k: v for m in view.metrics for k, v in m.details().items()} for view in views]
    if views[0].block is None:
        return {"metrics": results[0], **({"details": details[0]} if details[0] else {})}
    return {
        "metrics": {k: sum(r[k] for r in results) / len(results) for k in results[0]},
        "per_block": {str(view.block): {**r, **({"details": d} if d else {})} for view, r, d in zip(views, results, details)},
    }


def resume_points(lm: LanguageModel, saes: list[Evaluated]) -> set[int]:
    """The blocks before each SAE's first block: captured with the rest, its spliced forwards start after them."""
    if not lm.resumed.enabled:
        return set()
    return {min(s.sae.layers) - 1 for s in saes if min(s.sae.layers) > 0}


def wanted_tokens(tokens: int | str, counted_BT: Tensor) -> int | None:
    """The ``tokens`` setting as :func:`~routesae.data.leading_blocks` takes it: a count, or None for the whole split."""
    if tokens == ALL_TOKENS:
        return None
    if tokens == AUTO_TOKENS:
        return min(DEFAULT_TOKENS, int(counted_BT.sum())) or None
    return int(tokens)


def _evaluate(
    dirs: list[Path],
    metrics: Sequence[str] | None,
    cfg: EvaluateConfig,
    lm: LanguageModel | None,
    device: torch.device,
    ranks: Ranks,
) -> dict[str, dict[str, Any]]:
    override = Inference(k=cfg.infer_k, theta=cfg.theta)
    configs = [read_sae_config(d) for d in dirs]
    classes = metric_classes(metrics, ranks)
    lm = model_for(dirs, configs, lm, device)
    saes = [Evaluated(d, c, part, [cls() for cls in classes], sae.name, block)
            for d, c in zip(dirs, configs)
            for sae in [load_sae(d, lm.device)[0]]
            for block, part in (sae.splice_views() or {None: sae}).items()]

    data = configs[0].get("data", {})
    seed = training_seed(configs[0])
    with ExitStack() as overrides:
        for s in saes:  # before the data: an override an SAE refuses fails fast
            overrides.enter_context(s.sae.inference(override))
        corpus = corpus_for(configs[0], lm)
        blocks = corpus.split(SPLIT)
        counted_BT = counted_positions(blocks.attention_mask, cfg.reference_metrics)
        n_blocks, n_tokens = leading_blocks(counted_BT, wanted_tokens(cfg.tokens, counted_BT), SPLIT)
        layers = sorted({block for s in saes for block in s.sae.layers} | resume_points(lm, saes))
        mine = [slice(b * cfg.batch_size, min((b + 1) * cfg.batch_size, n_blocks))
                for b in ranks.batches(math.ceil(n_blocks / cfg.batch_size), SPLIT)]
        with JobProgress("evaluate", int(sum(counted_BT[rows].sum() for rows in mine)), enabled=ranks.writes) as bar:
            held = int(counted_BT.sum())
            part = "all" if n_tokens == held else f"the first {n_tokens:,}"
            bar.print(f"evaluating {len(saes)} SAE(s) on {part} of the {held:,} counted tokens of {corpus.source}'s eval "
                      "split (--tokens N or all to change)")
            started = time.perf_counter()  # the pass only: model loading and tokenisation excluded
            for rows in mine:
                _evaluate_batch(lm, layers, saes, blocks.input_ids[rows], blocks.attention_mask[rows], cfg.reference_metrics)
                bar.advance(int(counted_BT[rows].sum()))
            seconds = time.perf_counter() - started
    if ranks.distributed:  # every rank's sums, and the slowest rank's times (the pass ends when it does)
        for s in saes:
            for metric in s.metrics:
                metric.reduce(ranks)
        seconds, *sae_seconds = ranks.max_numbers(seconds, *(s.seconds for s in saes))
        for s, own in zip(saes, sae_seconds):
            s.seconds = own

    rate = n_tokens / seconds if seconds > 0 else 0.0
    timing = {  # the pass all SAEs shared; each record's seconds/tokens_per_s are the same, its sae_seconds its own
        "saes": len(saes),
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": rate,
        "world_size": ranks.world_size,
        "shared_seconds": max(0.0, seconds - sum(s.seconds for s in saes)),
    }

    asked = cfg.request()
    del asked["tokens"]  # the record's own "tokens" says how many were counted
    settings = {
        "metrics": [cls.name for cls in classes],
        **asked,
        "positions": "all" if cfg.reference_metrics else "real tokens except position 0",
        "data": {
            "source": data["source"],
            "text_field": data["text_field"],
            "context_length": data["context_length"],
            "seed": seed,
            "fingerprint": corpus.fingerprint,
        },
    }
    results: dict[str, dict[str, Any]] = {}
    for directory in dict.fromkeys(s.directory for s in saes):
        views = [s for s in saes if s.directory == directory]
        s = views[0]
        record = {
            "routesae_version": __version__,
            "sae": s.config.get("name", s.directory.name),
            "architecture": s.architecture,
            "model": s.config["model"]["spec"],
            "split": SPLIT,
            "tokens": n_tokens,
            "seconds": seconds,
            "tokens_per_s": rate,
            "sae_seconds": sum(v.seconds for v in views),
            "pass": timing,
            "settings": settings,
            **view_metrics(views),
            "better": {k: m.better for m in s.metrics for k in m.result()},  # which way each value improves
        }
        if ranks.writes:
            write_json(s.directory / EVAL_FILE, record)
        results[str(s.directory)] = record
    return results
