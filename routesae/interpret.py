"""The interpretation protocol: explain and score a seeded sample of latents with an interpreter backend.

For each sampled latent of ``contexts.json`` the interpreter is shown the latent's contexts and
asked for a category (low-level, high-level, undiscernible), a 1-5 monosemanticity score and an
explanation (the paper's Appendix D rubric, in our words). Beyond the paper, a *detection* request
then shows the explanation with a shuffled mix of held-out activating and non-activating contexts
and asks which activate the feature: the fraction of right decisions is a check of the explanation
that does not rely on the interpreter grading itself.

What the reference lacked and this adds (docs/reference.md §8, §12.18, §12.23): a seeded sample; unreadable answers
kept and counted instead of silently shrinking the sample; bounded concurrency; a budget that
never starts a request that could exceed it; and resume — ``interpretations.json`` is rewritten
atomically after every finished latent, and a re-run does only what is missing.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from routesae.config import setting
from routesae.contexts import contexts_fingerprint, read_contexts
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import read_json, write_json
from routesae.interpreters.answers import CATEGORIES, parse_detection, parse_explanation
from routesae.interpreters.base import Completion, Interpreter, InterpreterError, InterpreterUnavailable, Message
from routesae.interpreters.templates import PromptTemplate, load_template, render_classes, render_numbered
from routesae.locks import writing_files
from routesae.progress import JobProgress
from routesae.rundir import CONTEXTS_FILE, INTERPRETATIONS_FILE
from routesae.stage_config import StageConfig
from routesae.version import __version__

FORMAT = "routesae.interpretations"
FORMAT_VERSION = 1
SYSTEM_PROMPT = "You are an assistant that explains what the features of language models respond to."


@dataclass
class InterpretConfig(StageConfig):
    """How to interpret: ``routesae interpret``'s options, ``interpret``'s settings, the pipeline's ``interpret``."""

    EXECUTION_SETTINGS = ("max_cost", "concurrency")  # how far and how fast a run goes, not what it answers

    sample: int = setting(100, "Latents to interpret (a seeded sample of the kept ones; all if fewer).")
    seed: int = setting(42, "Seed of the latent sample and of the detection shuffles.")
    prompt_template: str | None = setting(
        None, "Explanation prompt file ($contexts required, $latent optional) instead of the built-in one."
    )
    detection_template: str | None = setting(
        None, "Detection prompt file ($explanation, $contexts required; $count, $latent optional)."
    )
    max_cost: float | None = setting(
        None, "USD this command may spend; no request that could exceed it is started (needs known prices)."
    )
    concurrency: int | None = setting(None, "Requests at once. Default: the interpreter's.")
    detection: bool = setting(
        True, "Also score each explanation by asking which held-out and pool contexts activate the feature."
    )
    max_tokens: int = setting(128, "Longest answer, in tokens.")
    temperature: float = setting(0.1, "Sampling temperature of the answers.")

    def __post_init__(self) -> None:
        for name in ("prompt_template", "detection_template"):  # a Path is welcome; the config keeps JSON's text
            if isinstance(getattr(self, name), Path):
                setattr(self, name, str(getattr(self, name)))
        super().__post_init__()
        for name, low in (("sample", 1), ("max_tokens", 1), ("concurrency", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        if self.max_cost is not None and self.max_cost <= 0:
            raise ConfigError(f"max_cost must be positive, got {self.max_cost}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")


INTERPRET_SETTINGS = frozenset(f.name for f in fields(InterpretConfig))


class InterpretationStopped(RouteSAEError):
    """The run stopped before finishing; what it finished is in ``result`` (and on disk)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class BudgetReached(InterpretationStopped):
    """The next request could have exceeded ``max_cost``."""


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0

    def add(self, c: Completion) -> None:
        self.requests += 1
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd = None if self.cost_usd is None or c.cost_usd is None else self.cost_usd + c.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> _Usage:
        return cls(**d) if d else cls()


class _Stopped(Exception):
    """Raised inside a worker: no new request may start (budget reached or backend unavailable)."""


@dataclass
class _Requester:
    """Sends requests through the backend; owns the budget, the stop flag and this session's usage."""

    backend: Interpreter
    max_tokens: int
    temperature: float
    max_cost: float | None
    usage: _Usage = field(default_factory=_Usage)
    reserved: float = 0.0
    stop_reason: str | None = None  # "budget" | "unavailable" | "interrupted"
    stop_message: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _stop(self, reason: str, message: str = "") -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_message = reason, message

    def ask(self, messages: list[Message]) -> Completion:
        if self.stop_reason is not None:
            raise _Stopped
        estimate = 0.0
        if self.max_cost is not None:
            estimate = self.backend.cost(self.backend.estimate_prompt_tokens(messages), self.max_tokens) or 0.0
            with self.lock:
                spent = self.usage.cost_usd or 0.0
                if self.stop_reason is not None or spent + self.reserved + estimate > self.max_cost:
                    self._stop("budget")
                    raise _Stopped
                self.reserved += estimate
        try:
            completion = self.backend.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except InterpreterUnavailable as e:
            with self.lock:
                self._stop("unavailable", str(e))
            raise
        finally:
            with self.lock:
                self.reserved -= estimate
        with self.lock:
            self.usage.add(completion)
        return completion


def sample_latents(latent_ids: list[int], sample: int, seed: int) -> list[int]:
    """The seeded sample, sorted (as the reference, but reproducible); every latent if there are fewer."""
    ids = sorted(latent_ids)
    return ids if len(ids) <= sample else sorted(random.Random(seed).sample(ids, sample))


def detection_set(contexts: dict[str, Any], latent_id: int, seed: int) -> tuple[list[dict[str, Any]], list[bool]]:
    """Held-out activating contexts plus as many non-activating pool windows, shuffled (seeded per latent)."""
    latent = contexts["latents"][str(latent_id)]
    rng = random.Random(f"{seed}:{latent_id}")
    positives = list(latent.get("held_out", []))
    negatives_idx = list(latent.get("non_activating", []))
    negatives = [contexts["pool"][i] for i in rng.sample(negatives_idx, min(len(negatives_idx), len(positives)))]
    items = [(c, True) for c in positives] + [(c, False) for c in negatives]
    rng.shuffle(items)
    return [c for c, _ in items], [truth for _, truth in items]


def _messages(prompt: str) -> list[Message]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def _add_usage(record: dict[str, Any], completions: list[Completion]) -> dict[str, Any]:
    """``record`` with its ``usage`` (tokens and cost of the requests that made it) grown by ``completions``."""
    old = record.get("usage") or {}
    total = _Usage(0, old.get("prompt_tokens", 0), old.get("completion_tokens", 0), old.get("cost_usd", 0.0))
    for c in completions:
        total.add(c)
    return {**record, "usage": {k: v for k, v in total.to_dict().items() if k != "requests"}}


@dataclass
class _Job:
    """One latent's work: explain (unless already explained) and then detect (when wanted)."""

    latent_id: int
    record: dict[str, Any] | None  # the existing record when only detection is missing


def _explain(req: _Requester, template: PromptTemplate, latent_id: int, latent: dict[str, Any]) -> tuple[dict[str, Any], list[Completion]]:
    prompt = template.render(contexts=render_classes(latent), latent=latent_id)
    try:
        c = req.ask(_messages(prompt))
    except InterpreterError as e:
        return {"status": "error", "category": None, "score": None, "explanation": None, "answer": None,
                "error": str(e), "detection": None}, []
    parsed = parse_explanation(c.text)
    record = {
        "status": "done" if parsed else "unparsable",
        "category": parsed.category if parsed else None,
        "score": parsed.score if parsed else None,
        "explanation": parsed.explanation if parsed else None,
        "answer": c.text,
        "error": None,
        "detection": None,
    }
    return record, [c]


def _detect(req: _Requester, template: PromptTemplate, contexts: dict[str, Any], latent_id: int, explanation: str, seed: int) -> tuple[dict[str, Any], list[Completion]]:
    shown, truth = detection_set(contexts, latent_id, seed)
    prompt = template.render(explanation=explanation, contexts=render_numbered(shown), count=len(shown), latent=latent_id)
    try:
        c = req.ask(_messages(prompt))
    except InterpreterError as e:
        return {"status": "error", "accuracy": None, "n": len(shown), "correct": None, "answer": None, "error": str(e)}, []
    chosen = parse_detection(c.text, len(shown))
    result: dict[str, Any] = {"status": "unparsable", "accuracy": None, "n": len(shown), "correct": None, "answer": c.text,
                              "error": None, "truth": [i for i, t in enumerate(truth, 1) if t]}
    if chosen is not None:
        correct = sum((i in chosen) == t for i, t in enumerate(truth, 1))
        result.update(status="done", accuracy=correct / len(shown), correct=correct, predicted=sorted(chosen))
    return result, [c]


def _wants_detection(record: dict[str, Any], latent: dict[str, Any], detection: bool, retry_unparsable: bool = False) -> bool:
    redo = ("error", "unparsable") if retry_unparsable else ("error",)
    pending = record.get("detection") is None or record["detection"].get("status") in redo
    return detection and record["status"] == "done" and bool(latent.get("held_out")) and pending


def _run_job(job: _Job, req: _Requester, contexts: dict[str, Any], templates: tuple[PromptTemplate, PromptTemplate],
             detection: bool, seed: int) -> dict[str, Any] | None:
    """The latent's new record, or ``None`` when it was stopped before anything changed."""
    latent = contexts["latents"][str(job.latent_id)]
    record = job.record
    if record is None:
        try:
            record, spent = _explain(req, templates[0], job.latent_id, latent)
        except _Stopped:
            return None
        record = _add_usage(record, spent)
    if _wants_detection(record, latent, detection) or (job.record is not None and detection):
        try:
            found, spent = _detect(req, templates[1], contexts, job.latent_id, record["explanation"], seed)
        except _Stopped:  # keep a new explanation; its detection is done by the next run
            return record if job.record is None else None
        record = _add_usage({**record, "detection": found}, spent)
    return record


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Averages over the parsed features (undiscernible included, as the paper); failures counted, not dropped."""
    records = [doc["latents"][str(i)] for i in doc["sampled"] if str(i) in doc["latents"]]
    done = [r for r in records if r["status"] == "done"]
    categories = {}
    for name in CATEGORIES:
        scores = [r["score"] for r in done if r["category"] == name]
        categories[name] = {"count": len(scores), "mean_score": sum(scores) / len(scores) if scores else None}
    accuracies = [r["detection"]["accuracy"] for r in done if r.get("detection") and r["detection"]["status"] == "done"]
    return {
        "features_scored": len(done),
        "unparsable": sum(r["status"] == "unparsable" for r in records),
        "errors": sum(r["status"] == "error" for r in records),
        "pending": len(doc["sampled"]) - len(records),
        "average_score": sum(r["score"] for r in done) / len(done) if done else None,
        "categories": categories,
        "detection_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "detection_scored": len(accuracies),
    }


def _build_backend(interpreter: str | Interpreter, options: dict[str, Any]) -> tuple[Interpreter, bool]:
    """The backend and whether we own it (and must close it)."""
    if isinstance(interpreter, Interpreter):
        if options:
            raise ConfigError(f"interpreter options {', '.join(sorted(options))} cannot be applied to an interpreter instance")
        return interpreter, False
    from routesae.plugins import get_plugin_manager

    return get_plugin_manager().get("interpreter", interpreter).from_options(**options), True


def _check_resumable(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Refuse to mix results made from different contexts, samples, prompts or models."""
    if old.get("format") != FORMAT:
        raise RouteSAEError(f"{path} is not a routesae interpretations file; move it away or pass --overwrite")
    checks = [
        ("contexts.json (it changed since)", old.get("contexts_fingerprint"), new["contexts_fingerprint"]),
        ("sample", old["settings"].get("sample"), new["settings"]["sample"]),
        ("seed", old["settings"].get("seed"), new["settings"]["seed"]),
        ("detection", old["settings"].get("detection"), new["settings"]["detection"]),
        ("prompt template", old.get("prompt_template", {}).get("sha256"), new["prompt_template"]["sha256"]),
        ("detection template", old.get("detection_template", {}).get("sha256"), new["detection_template"]["sha256"]),
        ("interpreter", old["interpreter"].get("name"), new["interpreter"]["name"]),
        ("interpreter model", old["interpreter"].get("model"), new["interpreter"].get("model")),
    ]
    differ = [f"{what}: {a!r} then, {b!r} now" if "changed" not in what else what for what, a, b in checks if a != b]
    if differ:
        done = sum(r["status"] == "done" for r in old.get("latents", {}).values())
        raise RouteSAEError(
            f"{path} was made with other settings ({'; '.join(differ)}), so its {done} finished latent(s) cannot be "
            "continued; run with the same settings to resume, or pass --overwrite to discard them and start over"
        )


def _pending_jobs(doc: dict[str, Any], contexts: dict[str, Any], detection: bool, retry_unparsable: bool) -> list[_Job]:
    jobs = []
    for latent_id in doc["sampled"]:
        record = doc["latents"].get(str(latent_id))
        if record is None or record["status"] == "error" or (record["status"] == "unparsable" and retry_unparsable):
            jobs.append(_Job(latent_id, None))
        elif _wants_detection(record, contexts["latents"][str(latent_id)], detection, retry_unparsable):
            jobs.append(_Job(latent_id, record))
    return jobs


def interpret(
    sae_dir: str | Path,
    interpreter: str | Interpreter = "local",
    cfg: InterpretConfig | None = None,
    *,
    overwrite: bool = False,
    retry_unparsable: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Explain and score ``sample`` latents of ``sae_dir/contexts.json``; write ``sae_dir/interpretations.json``.

    ``interpreter`` is a registered backend name or an instance. ``cfg`` says how
    (:class:`InterpretConfig`); keyword ``options`` are its settings (``sample=5``, building or
    overriding it) and the named backend's own (``model=...``), told apart by name.
    ``overwrite`` discards an existing file instead of continuing it; ``retry_unparsable`` asks
    again where an earlier answer could not be read. Returns the written document. Raises
    :class:`BudgetReached` or :class:`InterpretationStopped` (after writing what was finished)
    when it stops early; re-running the same call continues.
    """
    settings = {name: options.pop(name) for name in INTERPRET_SETTINGS & set(options)}
    cfg = InterpretConfig.build(cfg, settings)
    sae_dir = Path(sae_dir)
    contexts_path = sae_dir / CONTEXTS_FILE
    if not contexts_path.is_file():
        raise RouteSAEError(f"{sae_dir} has no {CONTEXTS_FILE}: run `routesae contexts {sae_dir}` first")
    fingerprint = contexts_fingerprint(contexts_path)
    contexts = read_contexts(contexts_path)
    if not contexts["latents"]:
        raise RouteSAEError(f"{contexts_path} keeps no latents (none passed its filters), so there is nothing to interpret")
    templates = (load_template("explain", cfg.prompt_template), load_template("detect", cfg.detection_template))

    with writing_files([sae_dir], "interpret", [INTERPRETATIONS_FILE]):
        backend, owned = _build_backend(interpreter, options)
        try:
            workers = cfg.concurrency or backend.concurrency
            if backend.max_concurrency is not None and workers > backend.max_concurrency:
                raise ConfigError(f"the {backend.name} interpreter runs at most {backend.max_concurrency} request(s) at once, not {workers}")
            if cfg.max_cost is not None and backend.cost(1, 1) is None:
                raise ConfigError(
                    f"--max-cost needs prices, and the price of {backend.describe().get('model', backend.name)!r} is unknown: "
                    "pass --price-input and --price-output (USD per million tokens)"
                )
            path = sae_dir / INTERPRETATIONS_FILE
            doc = _start_document(path, contexts, fingerprint, templates, backend, cfg, overwrite)
            base = _Usage.from_dict(doc["usage"])
            req = _Requester(backend, cfg.max_tokens, cfg.temperature, cfg.max_cost)
            jobs = _pending_jobs(doc, contexts, cfg.detection, retry_unparsable)
            _write(doc, path, base, req)
            write = partial(_write, doc, path, base, req)
            _run(jobs, req, doc, write, contexts, templates, cfg.detection, cfg.seed, workers, progress)
        finally:
            if owned:
                backend.close()
        return _finish(doc, path, req, cfg.max_cost)


def _start_document(path: Path, contexts: dict[str, Any], fingerprint: str, templates: tuple[PromptTemplate, PromptTemplate],
                    backend: Interpreter, cfg: InterpretConfig, overwrite: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "routesae_version": __version__,
        "sae": contexts.get("sae"),
        "contexts_fingerprint": fingerprint,
        "interpreter": backend.describe(),
        "prompt_template": templates[0].describe(),
        "detection_template": templates[1].describe(),
        "settings": {"sample": cfg.sample, "seed": cfg.seed, "detection": cfg.detection, "max_tokens": cfg.max_tokens,
                     "temperature": cfg.temperature},  # the templates are described above, by checksum
        "sampled": sample_latents([int(k) for k in contexts["latents"]], cfg.sample, cfg.seed),
        "latents": {},
        "usage": _Usage().to_dict(),
    }
    if path.exists() and not overwrite:
        old = read_json(path)
        _check_resumable(old, doc, path)
        doc["latents"], doc["usage"] = old.get("latents", {}), old.get("usage") or doc["usage"]
    return doc


def _write(doc: dict[str, Any], path: Path, base: _Usage, req: _Requester) -> None:
    with req.lock:
        session = req.usage
        total = _Usage(
            base.requests + session.requests,
            base.prompt_tokens + session.prompt_tokens,
            base.completion_tokens + session.completion_tokens,
            None if base.cost_usd is None or session.cost_usd is None else base.cost_usd + session.cost_usd,
        )
    doc["latents"] = dict(sorted(doc["latents"].items(), key=lambda item: int(item[0])))
    doc["usage"] = total.to_dict()
    doc["summary"] = summarize(doc)
    doc["complete"] = doc["summary"]["pending"] == 0 and doc["summary"]["errors"] == 0 and req.stop_reason is None
    write_json(path, doc)


def _run(jobs: list[_Job], req: _Requester, doc: dict[str, Any], write: Callable[[], None], contexts: dict[str, Any],
         templates: tuple[PromptTemplate, PromptTemplate], detection: bool, seed: int, workers: int, progress: bool) -> None:
    """Run the jobs on a bounded thread pool; the calling thread alone updates and writes the document."""
    with (
        JobProgress("interpret", len(jobs), "latents", enabled=progress and bool(jobs)) as bar,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="interpret") as pool,
    ):
        futures = {pool.submit(_run_job, job, req, contexts, templates, detection, seed): job for job in jobs}
        try:
            for future in as_completed(futures):
                record = future.result()
                if record is not None:
                    doc["latents"][str(futures[future].latent_id)] = record
                    write()
                cost = req.usage.cost_usd
                bar.update(bar.completed + 1, status="" if cost is None else f"${cost:.4f}")
        except BaseException:  # Ctrl-C or a bug: queued jobs must not start while the pool winds down
            req.stop_reason = req.stop_reason or "interrupted"
            raise


def _finish(doc: dict[str, Any], path: Path, req: _Requester, max_cost: float | None) -> dict[str, Any]:
    """Raise if the run stopped early (the document is already written), else return it."""
    summary = doc["summary"]
    left = summary["pending"] + summary["errors"]
    if req.stop_reason == "budget":
        raise BudgetReached(
            f"budget reached: the next request could have cost more than the ${max_cost:g} left to --max-cost "
            f"(this run spent ${req.usage.cost_usd or 0:.4f}); {len(doc['sampled']) - left} of {len(doc['sampled'])} "
            f"latents are finished and kept in {path}. Run the same command again to continue (finished latents are "
            "skipped), with --max-cost for the next part or a larger one",
            doc,
        )
    if req.stop_reason == "unavailable":
        raise InterpretationStopped(
            f"stopped: {req.stop_message}. {len(doc['sampled']) - left} of {len(doc['sampled'])} latents are finished "
            f"and kept in {path}; run the same command again to continue",
            doc,
        )
    return doc
