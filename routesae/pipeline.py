"""The whole method in one call, like the reference's ``main.py``: train → evaluate → contexts → interpret → report.

Every stage writes into the run directory (checkpoints, ``eval.json``, ``contexts.json``,
``interpretations.json``, ``report.html``), and the run manifest ``run.json`` gains a ``pipeline``
entry: what each stage was asked to do, its status and timings, and the versions of the software
that ran it (next to the training request, seed and data fingerprint training already records).
Stages are resumable: a stage recorded ``done`` with the same request is skipped, training
continues from its last checkpoint, and interpretation skips latents already explained, so the
same command re-run after a crash or a budget stop picks up where it stopped. A changed request
for a finished stage re-runs that stage and every later one.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routesae.config import Config, setting
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import read_json, write_json
from routesae.rundir import MANIFEST_FILE
from routesae.specs import SAESpec
from routesae.train import train
from routesae.train_config import TrainConfig, run_request

STAGES = ("train", "evaluate", "contexts", "interpret", "report")
VERSIONED = ("routesae", "torch", "transformers", "transformer-lens", "datasets", "safetensors", "openai")


@dataclass
class PipelineConfig(Config):
    """What the stages after training do (training has its own :class:`TrainConfig`)."""

    eval_tokens: int | None = setting(None, "Eval-split tokens for evaluation (default: the whole split).")
    eval_batch_size: int = setting(8, "Sequences per language-model batch in evaluation and context extraction.")
    threshold: float = setting(15.0, "Activation threshold for contexts (see `routesae contexts --help`).")
    context_tokens: int | None = setting(None, "Apply-split tokens to scan for contexts (default: the whole split).")
    max_classes: int = setting(32, "Drop latents that fire on more token classes than this (0: keep all).")
    min_contexts: int = setting(5, "Keep latents with at least this many shown contexts.")
    interpreter: str = setting("local", "Interpreter backend that explains latents ('none' skips interpretation).")
    sample: int = setting(100, "Latents to interpret per SAE (the paper: 100), drawn with --interpret-seed.")
    interpret_seed: int = setting(42, "Seed of the latent sample.")
    detection: bool = setting(True, "Also score each explanation by detection (held-out vs non-activating contexts).")
    max_cost: float | None = setting(None, "Budget cap in USD for a paid interpreter, over the whole run.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("eval_tokens", "context_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.sample <= 0:
            raise ConfigError(f"sample must be positive, got {self.sample}")


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages whose behaviour shapes the results."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


class Pipeline:
    """Runs the stages in order, recording each in ``run.json`` so a re-run resumes."""

    def __init__(
        self,
        specs: Sequence[SAESpec],
        out: Path | str,
        train_cfg: TrainConfig,
        cfg: PipelineConfig,
        *,
        interpreter_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        reporters: Sequence[str] = ("console",),
    ) -> None:
        self.specs = list(specs)
        self.out = Path(out)
        self.train_cfg = train_cfg
        self.cfg = cfg
        self.interpreter_options = dict(interpreter_options or {})
        self.overwrite = overwrite
        self.reporters = list(reporters)
        self.record: dict[str, Any] = {}

    # -- requests and records --------------------------------------------------------------------
    def requests(self) -> dict[str, dict[str, Any]]:
        """What each stage is asked to do; a stage re-runs when its request changes."""
        c = self.cfg
        return {
            "train": run_request(self.specs, self.train_cfg),
            "evaluate": {"tokens": c.eval_tokens, "batch_size": c.eval_batch_size},
            "contexts": {
                "threshold": c.threshold,
                "tokens": c.context_tokens,
                "batch_size": c.eval_batch_size,
                "max_classes": c.max_classes,
                "min_contexts": c.min_contexts,
            },
            "interpret": {
                "interpreter": c.interpreter,
                "sample": c.sample,
                "seed": c.interpret_seed,
                "detection": c.detection,
                "options": self.interpreter_options,
            },
            "report": {},
        }

    def _stages_record(self) -> dict[str, Any]:
        manifest = self.out / MANIFEST_FILE
        if self.overwrite or not manifest.is_file():
            return {}
        return read_json(manifest).get("pipeline", {}).get("stages", {})

    def _save(self) -> None:
        """Merge our record into run.json (training rewrites the rest of it as it goes)."""
        manifest = read_json(self.out / MANIFEST_FILE)
        manifest["pipeline"] = {"config": self.cfg.to_dict(), "versions": versions(), "stages": self.record}
        write_json(self.out / MANIFEST_FILE, manifest)

    # -- the stages ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns the ``pipeline`` record written to ``run.json``."""
        previous = self._stages_record()
        requests = self.requests()
        upstream_ran = False
        for stage in STAGES:
            if stage == "interpret" and self.cfg.interpreter == "none":
                self.record[stage] = {"status": "skipped", "request": requests[stage]}
                continue
            before = previous.get(stage, {})
            changed = upstream_ran or before.get("request") != requests[stage]
            if not changed and before.get("status") == "done":
                self.record[stage] = before
                continue
            started = time.monotonic()
            result = self._runner(stage)(fresh=changed)
            upstream_ran = True
            self.record[stage] = {
                "status": "incomplete" if result and result.pop("incomplete", False) else "done",
                "request": requests[stage],
                "seconds": round(time.monotonic() - started, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **({"result": result} if result else {}),
            }
            self._save()
        return read_json(self.out / MANIFEST_FILE)["pipeline"]

    def _runner(self, stage: str) -> Callable[..., dict[str, Any] | None]:
        return {
            "train": self._train,
            "evaluate": self._evaluate,
            "contexts": self._contexts,
            "interpret": self._interpret,
            "report": self._report,
        }[stage]

    def _train(self, fresh: bool) -> dict[str, Any]:
        """Reuse a finished identical run, resume an unfinished one, else train (``train`` refuses to replace another run)."""
        manifest = self.out / MANIFEST_FILE
        existing = None if self.overwrite or not manifest.is_file() else read_json(manifest)
        same = existing is not None and existing.get("request") == self.requests()["train"]
        if same and existing.get("status") == "finished":
            return {"tokens": existing["progress"]["tokens"], "reused": True}
        resume = same and existing.get("status") == "running"
        summary = train(
            self.specs, self.out, self.train_cfg, overwrite=self.overwrite, resume=resume, reporters=self.reporters
        )
        return {"tokens": summary.get("tokens"), "seconds": summary.get("seconds"), "resumed": resume}

    def _evaluate(self, fresh: bool) -> None:
        from routesae.evaluate import evaluate

        evaluate([self.out], tokens=self.cfg.eval_tokens, batch_size=self.cfg.eval_batch_size, reporters=self.reporters)

    def _contexts(self, fresh: bool) -> dict[str, Any]:
        from routesae.contexts import extract_contexts

        c = self.cfg
        records = extract_contexts(
            [self.out],
            threshold=c.threshold,
            tokens=c.context_tokens,
            batch_size=c.eval_batch_size,
            max_classes=c.max_classes,
            min_contexts=c.min_contexts,
        )
        return {Path(d).name: r["interpretable_latents"] for d, r in records.items()}

    def _interpret(self, fresh: bool) -> dict[str, Any]:
        """Each SAE in turn; ``max_cost`` caps this call's spending over all of them.

        ``fresh``: the contexts or the request changed, so earlier interpretations are discarded;
        otherwise an interrupted interpretation continues where it stopped.
        """
        from routesae.interpret import BudgetReached, interpret
        from routesae.rundir import INTERPRETATIONS_FILE, expand_dirs

        scores: dict[str, Any] = {}
        spent = 0.0
        for directory in expand_dirs([self.out]):
            path = directory / INTERPRETATIONS_FILE
            before = 0.0 if fresh or not path.is_file() else read_json(path)["usage"].get("cost_usd") or 0.0
            budget = None if self.cfg.max_cost is None else self.cfg.max_cost - spent
            if budget is not None and budget <= 0:
                raise BudgetReached(
                    f"budget reached: --max-cost {self.cfg.max_cost:g} is spent before {directory.name}; "
                    "run the same command again to continue",
                    {},
                )
            result = interpret(
                directory,
                self.cfg.interpreter,
                sample=self.cfg.sample,
                seed=self.cfg.interpret_seed,
                detection=self.cfg.detection,
                max_cost=budget,
                overwrite=fresh,
                **self.interpreter_options,
            )
            spent += (result["usage"].get("cost_usd") or 0.0) - before
            scores[directory.name] = result["summary"].get("average_score")
            if not result.get("complete", True):
                scores["incomplete"] = True  # failed requests: a re-run of the same command retries them
        return scores

    def _report(self, fresh: bool) -> dict[str, Any]:
        from routesae.report import write_report

        return {"report": str(write_report(self.out))}


def pipeline(
    specs: Sequence[SAESpec],
    out: Path | str,
    train_cfg: TrainConfig | None = None,
    cfg: PipelineConfig | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train → evaluate → contexts → interpret → report into ``out``; see :class:`Pipeline`.

    >>> pipeline([SAESpec.build("routesae", k=32), SAESpec.build("topk", k=32)], "runs/demo",
    ...          TrainConfig(tokens=200_000), PipelineConfig(sample=5))
    """
    if not specs:
        raise RouteSAEError("the pipeline needs at least one SAE to train")
    return Pipeline(specs, out, train_cfg or TrainConfig(), cfg or PipelineConfig(), **kwargs).run()
