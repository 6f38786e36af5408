"""Training curves for the report, as geometry an inline SVG draws (no plotting library, no script).

``metrics.jsonl`` logs every SAE's terms at each log step; one chart per term (loss, L0, ...) with
a line per SAE lets a reader compare how the SAEs of a run trained, which the final numbers alone
hide (a loss still falling, an L0 that collapsed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CURVES = ("loss", "nmse", "l0", "dead_window")  # the terms charted when an SAE logs them, in this order
PALETTE = ("#2456c7", "#c0392b", "#2c7a4b", "#7240b3", "#b06a00", "#0f8a8a", "#8a8f99", "#d4548a")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 420, 180, 52, 28, 10


def read_steps(metrics_path: Path) -> list[dict[str, Any]]:
    """The ``step`` records of a run's ``metrics.jsonl`` (unreadable lines skipped: a report never fails on a log)."""
    if not metrics_path.is_file():
        return []
    steps = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "step" and isinstance(record.get("saes"), dict):
            steps.append(record)
    return steps


def training_curves(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per logged term: ``{"term", "lines": [{"sae", "colour", "points"}], axis labels}``."""
    names = list(dict.fromkeys(name for step in steps for name in step["saes"]))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    charts = []
    for term in CURVES:
        series = {
            name: [(step["tokens"], step["saes"][name][term]) for step in steps
                   if _finite(step["saes"].get(name, {}).get(term)) and _finite(step.get("tokens"))]
            for name in names
        }
        series = {name: points for name, points in series.items() if len(points) >= 2}
        if series:
            charts.append(_chart(term, series, colours))
    return charts


def _chart(term: str, series: dict[str, list[tuple[float, float]]], colours: dict[str, str]) -> dict[str, Any]:
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP

    def at(x: float, y: float) -> str:
        px = LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w
        py = TOP + (1 - (y - y0) / (y1 - y0)) * plot_h
        return f"{px:.1f},{py:.1f}"

    return {
        "term": term,
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "top": TOP, "right": WIDTH - 8, "bottom": HEIGHT - BOTTOM,
        "y_max": f"{y1:.4g}", "y_min": f"{y0:.4g}", "x_min": f"{x0:,.0f}", "x_max": f"{x1:,.0f}",
        "lines": [{"sae": name, "colour": colours[name], "points": " ".join(at(x, y) for x, y in points),
                   "last": f"{points[-1][1]:.4g}"} for name, points in series.items()],
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
