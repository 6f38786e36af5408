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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesae.config import Config, setting
from routesae.contexts import ContextsConfig, extract_contexts
from routesae.errors import RouteSAEError
from routesae.evaluate import EvaluateConfig, evaluate
from routesae.files import read_json, write_json
from routesae.interpret import BudgetReached, InterpretConfig, interpret
from routesae.interpreters.base import recorded_options
from routesae.locks import writing
from routesae.plugins import get_plugin_manager
from routesae.reporters.console import stderr_console
from routesae.rundir import INTERPRETATIONS_FILE, MANIFEST_FILE, expand_dirs
from routesae.specs import SAESpec
from routesae.train import train
from routesae.train_config import TrainConfig, compare_requests, run_request

STAGES = ("train", "evaluate", "contexts", "interpret", "report")
VERSIONED = ("routesae", "torch", "transformers", "transformer-lens", "datasets", "safetensors", "openai")


@dataclass
class PipelineConfig(Config):
    """What the stages after training do (training has its own :class:`TrainConfig`): each stage's own config.

    Round-trips through JSON with the stages nested (``{"contexts": {"threshold": 4.0}, ...}``), so
    a stage's settings are those of its command (``routesae contexts --threshold`` is
    ``routesae pipeline --contexts-threshold``).
    """

    evaluate: EvaluateConfig = field(
        default_factory=EvaluateConfig, metadata={"help": "Evaluation of every SAE (`routesae evaluate`)."}
    )
    contexts: ContextsConfig = field(
        default_factory=ContextsConfig, metadata={"help": "Top-activating contexts of every SAE (`routesae contexts`)."}
    )
    interpreter: str = setting("local", "Interpreter backend that explains latents ('none' skips interpretation).")
    interpret: InterpretConfig = field(
        default_factory=InterpretConfig,
        metadata={"help": "Interpretation of every SAE (`routesae interpret`); its max_cost caps the whole run."},
    )


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
        self.console = stderr_console()

    # -- requests and records --------------------------------------------------------------------
    def requests(self) -> dict[str, dict[str, Any]]:
        """What each stage is asked to do; a stage re-runs when its request changes.

        A stage's request is its config's :meth:`~routesae.stage_config.StageConfig.request`: the
        settings that change only how it runs (a batch size, the budget) are left out, so changing
        them re-runs nothing.
        """
        c = self.cfg
        return {
            "train": run_request(self.specs, self.train_cfg),
            "evaluate": c.evaluate.request(),
            "contexts": c.contexts.request(),
            "interpret": {"interpreter": c.interpreter, **c.interpret.request(), "options": recorded_options(self.interpreter_options)},
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
        self._check_interpreter()
        previous = self._stages_record()
        requests = self.requests()
        upstream_ran = False
        for number, stage in enumerate(STAGES, start=1):
            header = f"pipeline {number}/{len(STAGES)}: {stage}"
            if stage == "interpret" and self.cfg.interpreter == "none":
                self.record[stage] = {"status": "skipped", "request": requests[stage]}
                self.console.print(f"{header} · skipped (--interpreter none)", highlight=False)
                continue
            before = previous.get(stage, {})
            changed = upstream_ran or before.get("request") != requests[stage]
            if not changed and before.get("status") == "done":
                self.record[stage] = before
                self.console.print(f"{header} · done before with these settings, kept", highlight=False)
                continue
            self.console.rule(header, align="left", style="bold")
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

    def _check_interpreter(self) -> None:
        """The backend's settings are checked before training, not hours later (its key when it starts)."""
        if self.cfg.interpreter == "none":
            return
        get_plugin_manager().get("interpreter", self.cfg.interpreter).Config.from_dict(self.interpreter_options)

    def _runner(self, stage: str) -> Callable[..., dict[str, Any] | None]:
        return {
            "train": self._train,
            "evaluate": self._evaluate,
            "contexts": self._contexts,
            "interpret": self._interpret,
            "report": self._report,
        }[stage]

    def _train(self, fresh: bool) -> dict[str, Any]:
        return train_or_continue(self.specs, self.out, self.train_cfg, overwrite=self.overwrite, reporters=self.reporters)

    def _evaluate(self, fresh: bool) -> None:
        evaluate([self.out], cfg=self.cfg.evaluate, reporters=self.reporters)

    def _contexts(self, fresh: bool) -> dict[str, Any]:
        records = extract_contexts([self.out], self.cfg.contexts)
        return {Path(d).name: r["interpretable_latents"] for d, r in records.items()}

    def _interpret(self, fresh: bool) -> dict[str, Any]:
        """Each SAE in turn; the interpret config's ``max_cost`` caps this call's spending over all of them.

        ``fresh``: the contexts or the request changed, so earlier interpretations are discarded;
        otherwise an interrupted interpretation continues where it stopped.
        """
        cfg = self.cfg.interpret
        scores: dict[str, Any] = {}
        spent = 0.0
        for directory in expand_dirs([self.out]):
            path = directory / INTERPRETATIONS_FILE
            before = 0.0 if fresh or not path.is_file() else read_json(path)["usage"].get("cost_usd") or 0.0
            budget = None if cfg.max_cost is None else cfg.max_cost - spent
            if budget is not None and budget <= 0:
                raise BudgetReached(
                    f"budget reached: --interpret-max-cost {cfg.max_cost:g} is spent before {directory.name}; "
                    "run the same command again to continue",
                    {},
                )
            result = interpret(
                directory,
                self.cfg.interpreter,
                cfg.replace(max_cost=budget),
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


def train_or_continue(
    specs: Sequence[SAESpec], out: Path, cfg: TrainConfig, *, overwrite: bool = False, reporters: Sequence[str] = ("console",)
) -> dict[str, Any]:
    """Reuse a finished identical run in ``out``, resume an unfinished one, else train (``train`` refuses to replace
    another run): what a command that trains as one of its stages does, so re-running it continues it."""
    manifest = out / MANIFEST_FILE
    existing = None if overwrite or not manifest.is_file() else read_json(manifest)
    changes = compare_requests(existing.get("request", {}), run_request(specs, cfg)) if existing else None
    if changes is not None and changes.same and existing.get("status") == "finished":
        return {"tokens": existing["progress"]["tokens"], "reused": True}
    resume = changes is not None and changes.resumable and existing.get("status") in ("running", "failed")
    summary = train(specs, out, cfg, overwrite=overwrite, resume=resume, reporters=list(reporters))
    return {"tokens": summary.get("tokens"), "seconds": summary.get("seconds"), "resumed": resume}


def pipeline(
    specs: Sequence[SAESpec],
    out: Path | str,
    train_cfg: TrainConfig | None = None,
    cfg: PipelineConfig | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train → evaluate → contexts → interpret → report into ``out``; see :class:`Pipeline`.

    >>> pipeline([SAESpec.build("routesae", k=32), SAESpec.build("topk", k=32)], "runs/demo",
    ...          TrainConfig(tokens=200_000), PipelineConfig(interpret=InterpretConfig(sample=5)))
    """
    if not specs:
        raise RouteSAEError("the pipeline needs at least one SAE to train")
    with writing(out, "train"):  # the whole pipeline writes the run; its stages take their own locks inside
        return Pipeline(specs, out, train_cfg or TrainConfig(), cfg or PipelineConfig(), **kwargs).run()
