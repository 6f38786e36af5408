"""One self-contained HTML page per run: metrics, routing, contexts and interpretations side by side.

Every stage (``train``, ``evaluate``, ``contexts``, ``interpret``) leaves JSON beside the
checkpoints; reading several of those files at once is what comparing SAEs needs, and a page is
what people share. The page is a single file (inline CSS, inline SVG, no script, no external
resource) so it can be mailed, archived with the run or opened from disk anywhere; its
Content-Security-Policy allows only the one inline script it ships (a filter over the latent cards,
by its hash), so even an escaping bug could not run script.

Latent cards show, beside the contexts, each latent's dashboard from ``contexts.json`` (format 2):
its firing frequency, a small inline SVG histogram of its positive activations and its logit lens
(the tokens its direction promotes and suppresses); a card from an older file simply lacks them.
Scale: the report keeps at most ``max_cards`` uninterpreted cards per SAE inline and links to
per-SAE latent pages beside it (``report-latents/sae-<i>-<page>.html``, ``CARDS_PER_PAGE`` cards
each, every kept or interpreted latent in id order) rather than putting 4,096 cards in one page:
pages of a few hundred cards load at once where one 20 MB page does not, and no page needs script
to show them (``<details>`` sections would still ship every card in one file). Measured on a
synthetic 4,096-latent SAE (full contexts, lens and histogram per latent): the report is 117 kB, each of
its 16 latent pages 1.15 MB, where one page of every card would be 18 MB.

Everything taken from the data (SAE names, token texts, explanations, model answers) reaches the
page only through jinja2 with autoescaping on. A stage that has not run, or whose file cannot be
read, becomes a note telling which command produces it: a report is most useful while a run is
still being worked on, so a missing piece must never stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from routesae.checkpoint import read_sae_config
from routesae.comparison_figures import (
    COMPARISON_FILE,
    FIGURES_DIR,
    comparison_figures_for_report,
    family_key,
    mapping,
    read_comparison,
    threshold_rules,
)
from routesae.contexts import contexts_fingerprint, read_contexts
from routesae.errors import RouteSAEError
from routesae.files import read_json, remove_orphans, write_text
from routesae.interop.saelens import SAELENS_CONFIG
from routesae.interop.saelens_read import is_saelens_dir
from routesae.interpret import FORMAT as INTERPRETATIONS_FORMAT
from routesae.locks import writing_files
from routesae.metrics.base import Better
from routesae.plugins import get_plugin_manager
from routesae.report_charts import read_steps, training_curves
from routesae.rundir import (
    CONFIG_FILE,
    CONTEXTS_FILE,
    EVAL_FILE,
    INTERPRETATIONS_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    REPORT_FILE,
    STEERING_FILE,
    expand_dirs,
    run_dir_of,
)
from routesae.version import __version__

DEFAULT_MAX_CARDS = 24
CONTEXTS_PER_CARD = 5
CARDS_PER_PAGE = 256  # latent cards per page of an SAE's latent pages
PAGES_SUFFIX = "-latents"  # report.html's latent pages go in report-latents/
HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT, HISTOGRAM_LABELS = 128, 42, 10  # a card's activation histogram, px
WEAK_JUDGE = 0.5  # an interpreter whose answers are unreadable this often is called out, not shown as scores
# The page's one script: a filter over the latent cards. The Content-Security-Policy allows exactly this text (its
# hash), so nothing else can run; it only reads text and toggles visibility, never writes markup.
FILTER_SCRIPT = """
document.getElementById("filter").addEventListener("input", (event) => {
  const words = event.target.value.toLowerCase().split(/\\s+/).filter(Boolean);
  for (const card of document.querySelectorAll("article.card")) {
    const text = card.textContent.toLowerCase();
    card.hidden = !words.every((word) => text.includes(word));
  }
});
"""

CATEGORY_BADGES = {"low-level": "low", "high-level": "high", "undiscernible": "undiscernible"}
"""Known interpretation categories -> CSS class suffix; anything else is drawn as ``other``."""


@dataclass
class Stage:
    """A stage's file as read for the report: its data, or why there is none and which command makes it."""

    data: dict[str, Any] | None
    problem: str | None = None
    command: str | None = None


def _command(*words: str | Path) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def read_stage(path: Path, reader: Callable[[Path], dict[str, Any]], command: str) -> Stage:
    """Read a stage's file with its own reader, turning absence or damage into a problem that names ``command``."""
    if not path.is_file():
        return Stage(None, "not run yet", command)
    try:
        return Stage(reader(path))
    except (RouteSAEError, OSError, UnicodeDecodeError) as e:
        return Stage(None, f"{path.name} cannot be used ({e})", command)


def read_evaluation(path: Path) -> dict[str, Any]:
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise RouteSAEError(f"{path} holds no metrics")
    return record


def read_interpretations(path: Path) -> dict[str, Any]:
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != INTERPRETATIONS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise RouteSAEError(f"{path} is not a routesae interpretations file (format {found!r})")
    return doc


def read_steering(path: Path) -> dict[str, Any]:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise RouteSAEError(f"{path} holds no steering results")
    return doc


@dataclass
class SAEFiles:
    """One SAE checkpoint directory and what its stages have written so far."""

    directory: Path
    config: dict[str, Any]
    evaluation: Stage
    contexts: Stage
    interpretations: Stage
    contexts_sha256: str | None
    steering: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.directory.name)

    @classmethod
    def read(cls, directory: Path, evaluate_target: Path) -> SAEFiles:
        config = read_sae_config(directory)
        evaluation = read_stage(directory / EVAL_FILE, read_evaluation, _command("routesae", "evaluate", evaluate_target))
        contexts_path = directory / CONTEXTS_FILE
        contexts = read_stage(contexts_path, read_contexts, _command("routesae", "contexts", directory))
        interpretations = read_stage(
            directory / INTERPRETATIONS_FILE, read_interpretations, _command("routesae", "interpret", directory)
        )
        digest = contexts_fingerprint(contexts_path) if contexts.data is not None else None
        steering = read_stage(directory / STEERING_FILE, read_steering, _command("routesae", "steer", directory, "--record"))
        return cls(directory, config, evaluation, contexts, interpretations, digest, (steering.data or {}).get("results", []))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_directions(records: list[dict[str, Any]]) -> dict[str, Better | None]:
    """Which way each reported value improves: as ``eval.json`` records it (``better``, from the metric plugins).

    Records written before ``better`` existed are ranked by the installed metric of each name.
    """
    directions: dict[str, Better | None] = {}
    pm = get_plugin_manager()
    for record in records:
        if "better" in record:
            directions.update(record["better"])
        else:
            directions.update({n: pm.get("metric", n).better for n in record["metrics"] if n in pm.names("metric")})
    return directions


def metric_table(saes: list[SAEFiles]) -> dict[str, Any]:
    """Rows = SAEs, columns = every metric some eval.json holds; the best value of a ranked column marked.

    A column is ranked only when at least two SAEs have a finite value in it: a lone number is
    not "best" of anything. Ties are all marked.
    """
    names = list(dict.fromkeys(m for s in saes if s.evaluation.data for m in s.evaluation.data["metrics"]))
    better = metric_directions([s.evaluation.data for s in saes if s.evaluation.data])
    columns = [{"name": n, "label": n.replace("_", " "), "better": better.get(n)} for n in names]
    best: dict[str, float] = {}
    for column in columns:
        values = [
            s.evaluation.data["metrics"][column["name"]]
            for s in saes
            if s.evaluation.data and _finite(s.evaluation.data["metrics"].get(column["name"]))
        ]
        if column["better"] and len(values) >= 2:
            best[column["name"]] = min(values) if column["better"] == "lower" else max(values)
    rows = []
    for s in saes:
        record = s.evaluation.data
        metrics = record["metrics"] if record else {}
        cells = []
        for n in names:
            value = metrics.get(n)
            cells.append(
                {
                    "metric": n,
                    "text": f"{value:.4g}" if _finite(value) else ("–" if value is None else str(value)),
                    "best": n in best and _finite(value) and value == best[n],
                }
            )
        rows.append(
            {
                "sae": s.name,
                "anchor": f"sae-{len(rows)}",
                "tokens": record.get("tokens") if record else None,
                "split": record.get("split") if record else None,
                "settings": _eval_settings(record),
                "cells": cells,
                "missing": s.evaluation if s.evaluation.data is None else None,
            }
        )
    missing = {(s.evaluation.problem, s.evaluation.command): s.evaluation for s in saes if s.evaluation.data is None}
    return {"columns": columns, "rows": rows, "missing": list(missing.values())}


def _eval_settings(record: dict[str, Any] | None) -> str:
    """The settings that change what the numbers mean, in a few words."""
    if not record:
        return ""
    settings = record.get("settings", {})
    parts = []
    if settings.get("infer_k") is not None:
        parts.append(f"infer-k {settings['infer_k']}")
    if settings.get("theta") is not None:
        parts.append(f"theta {settings['theta']}")
    if settings.get("reference_metrics"):
        parts.append("reference metrics")
    return ", ".join(parts)


def histograms(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Bar-chart geometry for each ``{label: number}`` training statistic (RouteSAE's routing counts)."""
    charts = []
    statistics = config.get("training", {}).get("statistics", {})
    for stat, histogram in statistics.items():
        if not (isinstance(histogram, dict) and histogram and all(_finite(v) for v in histogram.values())):
            continue
        total, peak = sum(histogram.values()), max(histogram.values())
        bar, gap, height, top = 36, 8, 120, 18
        bars = []
        for i, (label, value) in enumerate(histogram.items()):
            share = value / total if total else 0.0
            h = round(height * value / peak, 1) if peak > 0 else 0.0
            bars.append(
                {"label": label, "value": value, "share": share, "x": gap + i * (bar + gap), "y": top + height - h, "height": h}
            )
        charts.append(
            {
                "title": "routing histogram" if stat == "routing_counts" else stat.replace("_", " "),
                "stat": stat,
                "bars": bars,
                "bar_width": bar,
                "width": gap + len(bars) * (bar + gap),
                "height": top + height + 20,
                "baseline": top + height,
                "total": total,
            }
        )
    return charts


def _split_context(context: dict[str, Any]) -> dict[str, Any]:
    """A context as (text before, activating token, text after), for HTML that marks the token.

    ``render_context`` joins the same tokens with text markers; HTML needs the token as its own
    escaped element instead, and splitting a marked string back apart breaks on tokens that
    contain the markers.
    """
    tokens = [str(t) for t in context.get("tokens", [])]
    index = context.get("index")
    if not isinstance(index, int) or not 0 <= index < len(tokens):
        return {"before": "".join(tokens), "token": None, "after": "", **_context_meta(context)}
    return {
        "before": "".join(tokens[:index]),
        "token": tokens[index],
        "after": "".join(tokens[index + 1 :]),
        **_context_meta(context),
    }


def _context_meta(context: dict[str, Any]) -> dict[str, Any]:
    return {"activation": context.get("activation"), "layer": context.get("layer")}


def activation_histogram(histogram: Any) -> dict[str, Any] | None:
    """Bar geometry of a latent's activation histogram (``contexts.json``'s ``{bin_width, counts}``) as one SVG path."""
    if not isinstance(histogram, dict):
        return None
    counts, width = histogram.get("counts"), histogram.get("bin_width")
    if not (isinstance(counts, list) and counts and all(_finite(c) and c >= 0 for c in counts) and _finite(width)):
        return None
    peak = max(counts)
    if peak <= 0:
        return None
    bar, plot = HISTOGRAM_WIDTH / len(counts), HISTOGRAM_HEIGHT - HISTOGRAM_LABELS
    path = "".join(
        f"M{i * bar:.4g} {plot}v-{max(plot * c / peak, 0.5):.3g}h{bar:.4g}V{plot}z" for i, c in enumerate(counts) if c
    )
    return {"width": HISTOGRAM_WIDTH, "height": HISTOGRAM_HEIGHT, "path": path, "bins": len(counts),
            "total": sum(counts), "bin_width": width, "top": width * len(counts)}


def _lens_tokens(entries: Any) -> list[dict[str, Any]]:
    """A logit-lens list (``[{token, id, logit}]``) as the card shows it; anything malformed is left out."""
    if not isinstance(entries, list):
        return []
    return [{"token": str(e.get("token", "")), "logit": e.get("logit")} for e in entries if isinstance(e, dict)]


def _frequency_text(frequency: Any) -> str | None:
    return f"{100 * frequency:.3g}%" if _finite(frequency) else None


def _card(latent_id: str, kept: dict[str, Any] | None, interpretation: dict[str, Any] | None) -> dict[str, Any]:
    contexts = []
    for token_class, items in (kept or {}).get("classes", {}).items():
        contexts.extend({**_split_context(c), "class": token_class} for c in items)
    contexts.sort(key=lambda c: -(c["activation"] if _finite(c["activation"]) else -math.inf))
    interpretation = interpretation or {}
    category = interpretation.get("category")
    detection = interpretation.get("detection") or {}
    return {
        "id": latent_id,
        "interpreted": bool(interpretation),
        "status": interpretation.get("status"),
        "category": category,
        "badge": CATEGORY_BADGES.get(category, "other") if category else None,
        "score": interpretation.get("score"),
        "explanation": interpretation.get("explanation"),
        "error": interpretation.get("error"),
        "answer": interpretation.get("answer") if interpretation.get("status") == "unparsable" else None,
        "detection": detection.get("accuracy") if detection.get("status", "done") == "done" else None,
        "detection_n": detection.get("n"),
        "activations": (kept or {}).get("activations"),
        "max_activation": (kept or {}).get("max_activation"),
        "classes": len((kept or {}).get("classes", {})),
        "contexts": contexts[:CONTEXTS_PER_CARD],
        "kept": kept is not None,
        "firings": (kept or {}).get("firings"),
        "frequency": (kept or {}).get("frequency") if _finite((kept or {}).get("frequency")) else None,
        "frequency_text": _frequency_text((kept or {}).get("frequency")),
        "histogram": activation_histogram((kept or {}).get("histogram")),
        "promoted": _lens_tokens(((kept or {}).get("logit_lens") or {}).get("promoted")),
        "suppressed": _lens_tokens(((kept or {}).get("logit_lens") or {}).get("suppressed")),
    }


def latent_cards(contexts: dict[str, Any] | None, interpretations: dict[str, Any] | None, max_cards: int) -> list[dict[str, Any]]:
    """Interpreted latents first (best score first, unscored after), then up to ``max_cards`` others.

    The uninterpreted ones are the kept latents with the strongest activations, so a run that
    has contexts but no interpretations still shows what its latents fire on.
    """
    kept = (contexts or {}).get("latents", {})
    interpreted = (interpretations or {}).get("latents", {})

    def by_score(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, int]:
        latent_id, entry = item
        score = entry.get("score")
        return (not _finite(score), -(score if _finite(score) else 0), _latent_order(latent_id))

    cards = [_card(i, kept.get(i), entry) for i, entry in sorted(interpreted.items(), key=by_score)]
    others = [i for i in kept if i not in interpreted]
    others.sort(key=lambda i: (-_number(kept[i].get("max_activation")), _latent_order(i)))
    return cards + [_card(i, kept[i], None) for i in others[:max_cards]]


def page_latents(contexts: dict[str, Any] | None, interpretations: dict[str, Any] | None) -> list[str]:
    """Every latent with a card on the latent pages: kept or interpreted, in id order."""
    ids = {*(contexts or {}).get("latents", {}), *(interpretations or {}).get("latents", {})}
    return sorted(ids, key=lambda i: (_latent_order(i), i))


def _page_href(pages_dir: str, index: int, page: int) -> str:
    return f"{urllib.parse.quote(pages_dir)}/sae-{index}-{page}.html"


def _number(value: Any) -> float:
    return value if _finite(value) else -math.inf


def _latent_order(latent_id: str) -> int:
    return int(latent_id) if latent_id.isdigit() else -1


def _interpretation_notes(files: SAEFiles) -> list[Stage]:
    data = files.interpretations.data
    if data is None or files.contexts_sha256 is None:
        return []
    if data.get("contexts_fingerprint") not in (None, files.contexts_sha256):
        command = _command("routesae", "interpret", files.directory, "--overwrite")
        return [Stage(None, f"these interpretations were made from an earlier {CONTEXTS_FILE}; redo them", command)]
    return []


def sae_section(files: SAEFiles, index: int, max_cards: int, pages_dir: str | None = None) -> dict[str, Any]:
    """What the template shows of one SAE; with ``pages_dir`` (relative to the report) its cards link to latent pages."""
    config = files.config
    contexts, interpretations = files.contexts.data, files.interpretations.data
    layers = config.get("layers", [])
    latents = page_latents(contexts, interpretations) if pages_dir is not None else []
    chunks = [latents[i : i + CARDS_PER_PAGE] for i in range(0, len(latents), CARDS_PER_PAGE)]
    return {
        "pages": [{"href": _page_href(pages_dir or "", index, p + 1), "label": f"{chunk[0]}–{chunk[-1]}", "latents": chunk}
                  for p, chunk in enumerate(chunks)],
        "page_cards": len(latents),
        "cards_per_page": CARDS_PER_PAGE,
        "name": files.name,
        "anchor": f"sae-{index}",
        "directory": str(files.directory),
        "architecture": config.get("architecture"),
        "layers": f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else ", ".join(map(str, layers)),
        "latent_size": config.get("config", {}).get("latent_size"),
        "config_json": json.dumps(config.get("config", {}), indent=2, ensure_ascii=False),
        "imported": _imported(config),
        "training": config.get("training", {}),
        "histograms": histograms(config),
        "contexts": files.contexts,
        "interpretations": files.interpretations,
        "interpretation_warnings": _interpretation_notes(files),
        "weak_judge": _weak_judge(interpretations),
        "routed": len(layers) > 1,
        "cards": latent_cards(contexts, interpretations, max_cards),
        "steering": [_steering_row(r) for r in files.steering if isinstance(r, dict)],
    }


def _imported(config: dict[str, Any]) -> str | None:
    """Where an SAE read from another library's format came from (``config["source"]``), or None."""
    source = config.get("source")
    if not isinstance(source, dict):
        return None
    version = f", sae-lens {source['sae_lens_version']}" if source.get("sae_lens_version") else ""
    return f"read from {source.get('format')} ({source.get('architecture')}{version})"


def _weak_judge(interpretations: dict[str, Any] | None) -> str | None:
    """A one-line verdict when most of the interpreter's answers could not be read (the embedded model's often cannot)."""
    summary = (interpretations or {}).get("summary", {})
    unparsable, scored = summary.get("unparsable") or 0, summary.get("features_scored") or 0
    if not unparsable or unparsable < WEAK_JUDGE * (unparsable + scored):
        return None
    name = (interpretations or {}).get("interpreter", {}).get("name", "the interpreter")
    return (f"{unparsable} of {unparsable + scored} answers could not be read: the {name} interpreter is a weak judge "
            "for this format. Use --interpreter openai (any OpenAI-compatible server) for scores worth comparing.")


def _steering_row(result: dict[str, Any]) -> dict[str, Any]:
    settings = result.get("settings", {})
    return {"clamps": " ".join(settings.get("clamps", [])), "asked": " ".join(settings.get("asked", [])),
            "prompt": result.get("prompt"), "original": result.get("original"), "steered": result.get("steered")}


def _modified(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(path: Path, saes: list[SAEFiles], run: dict[str, Any] | None, others: Sequence[Path] = ()) -> dict[str, Any]:
    """Run name, model, data, tokens, date and versions, from ``run.json`` or else a lone SAE's config; ``others``
    are the further directories reported beside it."""
    if run is not None:
        model, data = run.get("model", {}), run.get("data", {})
        tokens, status = run.get("progress", {}).get("tokens"), run.get("status")
        version, dated = run.get("routesae_version"), path / MANIFEST_FILE
    else:
        config = saes[0].config
        model, data = config.get("model", {}), config.get("data", {})
        training = config.get("training")  # none for an SAE read from another library's format
        tokens = (training or {}).get("tokens_done")
        status = None if training is None else "finished" if training.get("finished") else "unfinished"
        version = config.get("routesae_version")
        dated = path / SAELENS_CONFIG if is_saelens_dir(path) else path / CONFIG_FILE
    return {
        "name": path.resolve().name + (f" and {len(others)} more" if others else ""),
        "path": " · ".join(str(p) for p in [path, *others]),
        "model": model.get("spec"),
        "model_shape": f"{model['n_layers']} blocks, d_model {model['d_model']}" if "n_layers" in model and "d_model" in model else "",
        "data": data.get("source"),
        "fingerprint": data.get("fingerprint"),
        "tokens": tokens,
        "status": status,
        "date": _modified(dated),
        "run_version": version,
        "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _format_number(value: Any, spec: str = ",") -> str:
    if value is None or isinstance(value, jinja2.Undefined):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _format_share(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if _finite(value) else "–"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("routesae", "templates"),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,  # a file missing an optional key renders '–', not a crash
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _format_number
    env.filters["pct"] = _format_share
    return env


def _training_steps(saes: list[SAEFiles], is_run: bool) -> list[dict[str, Any]]:
    """The training steps charted for a run (all its SAEs) or an SAE directory (its own, from its run's log)."""
    if not saes:
        return []
    steps = read_steps(run_dir_of(saes[0].directory) / METRICS_FILE)
    if is_run:
        return steps
    name = saes[0].name
    return [{**step, "saes": {name: step["saes"][name]}} for step in steps if name in step["saes"]]


def _paths(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def _check_reportable(path: Path) -> bool:
    """Whether ``path`` is a run directory (else an SAE checkpoint, routesae's or SAELens's); refuse anything else."""
    if not path.is_dir():
        raise RouteSAEError(f"{path} is not a directory; pass a run or SAE directory written by `routesae train`")
    is_run = (path / MANIFEST_FILE).is_file() and not (path / CONFIG_FILE).is_file()
    if not is_run and not (path / CONFIG_FILE).is_file() and not is_saelens_dir(path):
        raise RouteSAEError(
            f"{path} is neither a run directory ({MANIFEST_FILE}) nor an SAE checkpoint ({CONFIG_FILE}, or SAELens's "
            f"{SAELENS_CONFIG}); pass a directory written by `routesae train`"
        )
    return is_run


# -- a `routesae compare` directory: its runs side by side, then its figures and summary ---------------------------
COMPARISON_COLUMNS = (("metrics", "kldiv", "KL"), ("metrics", "normmse", "NormMSE"), ("metrics", "l0", "L0"))


def is_comparison(path: Path) -> bool:
    """Whether ``path`` is what ``routesae compare`` writes: a ``comparison.json`` beside the runs it trained."""
    return (path / COMPARISON_FILE).is_file() and not (path / MANIFEST_FILE).is_file() and not (path / CONFIG_FILE).is_file()


def comparison_runs(directory: Path) -> list[Path]:
    """The run directories inside a compare directory, in the order ``comparison.json`` names them (others after)."""
    try:
        named = [s.get("run") for s in read_comparison(directory / COMPARISON_FILE)["saes"] if isinstance(s, dict)]
    except (RouteSAEError, OSError):
        named = []  # the section says what is wrong with the file; the runs are still worth showing
    order = {name: i for i, name in enumerate(dict.fromkeys(n for n in named if isinstance(n, str)))}
    runs = [p for p in directory.iterdir() if (p / MANIFEST_FILE).is_file() and not (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=lambda p: (order.get(p.name, len(order)), p.name))


def _mean_std_text(entry: Any) -> str:
    mean, std = mapping(entry).get("mean"), mapping(entry).get("std")
    if not _finite(mean):
        return "–"
    return f"{mean:.4g} ± {std:.2g}" if _finite(std) else f"{mean:.4g}"


def comparison_table(comparison: dict[str, Any]) -> dict[str, Any]:
    """The summary as family × k rows of mean ± std over seeds: the metrics, then features per threshold rule."""
    rules = threshold_rules(comparison)
    columns = [*COMPARISON_COLUMNS, *(("features", rule, f"features ({rule})") for rule in rules)]
    rows = []
    summary = [r for r in comparison["summary"] if isinstance(r, dict) and isinstance(r.get("family"), str)]
    for row in sorted(summary, key=lambda r: (family_key(r["family"]), r.get("k") if _finite(r.get("k")) else math.inf)):
        cells = [{"column": name, "text": _mean_std_text(mapping(row.get(section)).get(name))} for section, name, _ in columns]
        rows.append({"family": row["family"], "k": row.get("k"), "n": row.get("n"), "cells": cells})
    return {"columns": [{"name": name, "label": label} for _, name, label in columns], "rows": rows}


def comparison_section(directory: Path) -> dict[str, Any]:
    """The Comparison section of a compare directory's report: its grid, summary table and figures, or notes that
    say what is missing and which command makes it."""
    stage = read_stage(directory / COMPARISON_FILE, read_comparison, _command("routesae", "compare", "--out", directory))
    section: dict[str, Any] = {"directory": str(directory), "problem": stage if stage.data is None else None,
                               "grid": mapping((stage.data or {}).get("grid")), "figures": [], "figures_problem": None}
    if stage.data is None:
        return section
    section["table"] = comparison_table(stage.data)
    redraw = _command("python", "-m", "routesae.comparison_figures", directory)
    try:
        section["figures"] = comparison_figures_for_report(directory)
    except (RouteSAEError, OSError, UnicodeDecodeError) as e:
        section["figures_problem"] = Stage(None, f"the figures cannot be shown ({e})", redraw)
    else:
        if not section["figures"]:
            section["figures_problem"] = Stage(None, f"no figures in {directory / FIGURES_DIR}", redraw)
    return section


def render_report(paths: Path | str | Sequence[Path | str], *, max_cards: int = DEFAULT_MAX_CARDS) -> str:
    """The report's HTML for run directories (all their SAEs) and SAE checkpoint directories, side by side.

    The header describes the first one; the SAEs of all of them share the metric table and the curves. A compare
    directory stands for the runs it holds, and when it comes first the page adds its Comparison section.
    Its links to latent pages point where :func:`write_report` writes them beside ``report.html``.
    """
    return _render(paths, max_cards, REPORT_FILE)[0]


def _render(paths: Path | str | Sequence[Path | str], max_cards: int, report_name: str) -> tuple[str, dict[str, str]]:
    """(the report's HTML, ``{path relative to the report: HTML}`` of its latent pages) for a report named
    ``report_name``."""
    paths = _paths(paths)
    if max_cards < 0:
        raise RouteSAEError(f"max-cards must be 0 or more, got {max_cards}")
    if not paths:
        raise RouteSAEError("nothing to report: give at least one run or SAE directory")
    comparison = comparison_section(paths[0]) if is_comparison(paths[0]) else None
    paths = [run for path in paths for run in (comparison_runs(path) if is_comparison(path) else [path])]
    if not paths:
        raise RouteSAEError(f"{comparison['directory']} holds {COMPARISON_FILE} but no run directory to report")
    runs = [_check_reportable(path) for path in paths]
    saes: list[SAEFiles] = []
    steps: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for path, is_run in zip(paths, runs):
        found = [SAEFiles.read(d, path) for d in expand_dirs([path]) if d.resolve() not in seen]
        seen.update(f.directory.resolve() for f in found)
        saes.extend(found)
        steps.extend(_training_steps(found, is_run))
    env = _environment()
    first = paths[0]
    pages_dir = Path(report_name).stem + PAGES_SUFFIX
    sections = [sae_section(s, i, max_cards, pages_dir) for i, s in enumerate(saes)]
    head = header(first, saes, read_json(first / MANIFEST_FILE) if runs[0] else None, others=paths[1:])
    if comparison:  # the page is about the comparison; its runs' SAEs are listed below as usual
        head |= {"name": Path(comparison["directory"]).resolve().name, "path": comparison["directory"]}
    script_hash = base64.b64encode(hashlib.sha256(FILTER_SCRIPT.encode()).digest()).decode()
    html = env.get_template("report.html.j2").render(
        header=head,
        metrics=metric_table(saes),
        comparison=comparison,
        curves=training_curves(steps),
        saes=sections,
        script=FILTER_SCRIPT,
        script_hash=script_hash,
    )
    pages = {}
    page_template = env.get_template("latents.html.j2")
    for files, section in zip(saes, sections):
        kept = (files.contexts.data or {}).get("latents", {})
        interpreted = (files.interpretations.data or {}).get("latents", {})
        for number, page in enumerate(section["pages"], 1):
            pages[page["href"].removeprefix(urllib.parse.quote(pages_dir) + "/")] = page_template.render(
                header=head, sae=section, page=page, number=number, report=f"../{urllib.parse.quote(report_name)}",
                cards=[_card(i, kept.get(i), interpreted.get(i)) for i in page["latents"]],
                script=FILTER_SCRIPT, script_hash=script_hash,
            )
    return html, pages


def write_report(
    run_dir: Path | str | Sequence[Path | str], out: Path | str | None = None, *, max_cards: int = DEFAULT_MAX_CARDS
) -> Path:
    """Write the report of one or several run or SAE directories (default file: the first's ``report.html``)
    atomically and return its path.

    >>> write_report("runs/demo")
    PosixPath('runs/demo/report.html')
    >>> write_report(["runs/demo", "saelens/topk"], "compare.html")   # a routesae run beside a SAELens SAE
    PosixPath('compare.html')
    """
    paths = _paths(run_dir)
    if not paths:
        raise RouteSAEError("nothing to report: give at least one run or SAE directory")
    target = Path(out) if out is not None else paths[0] / REPORT_FILE
    if target.is_dir():
        raise RouteSAEError(f"--out {target} is a directory; give a file name such as {target / REPORT_FILE}")
    with writing_files([target.parent], "report", [target.name]):
        html, pages = _render(paths, max_cards, target.name)
        pages_dir = target.parent / (target.stem + PAGES_SUFFIX)
        if pages_dir.is_dir():  # a page an earlier report wrote and this one does not is stale
            remove_orphans(pages_dir, pages)
            for old in pages_dir.glob("sae-*.html"):
                if old.name not in pages:
                    old.unlink()
        for name, page in pages.items():
            write_text(pages_dir / name, page)
        write_text(target, html)
    return target
