"""One JSON object per line in ``<run>/metrics.jsonl``: the run's record, always on, append-only across resumes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from routesae.reporters.base import Reporter, StepReport
from routesae.rundir import METRICS_FILE


class JsonlReporter(Reporter):
    name = "jsonl"

    def _write(self, event: str, data: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"event": event, **data}) + "\n")

    def start(self, run: dict[str, Any]) -> None:
        self._write("start", {"train": run["train"], "saes": run["saes"]})

    def step(self, report: StepReport) -> None:
        self._write("step", dataclasses.asdict(report))

    def finish(self, summary: dict[str, Any]) -> None:
        self._write("finish", summary)

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        self._write("evaluate", {"results": records})
