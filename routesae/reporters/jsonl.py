"""One JSON object per line in ``<run>/metrics.jsonl``: the run's record, always on.

A resumed run first cuts the file back to its checkpoint (``RunDirectory.rewind_metrics``) and logs a
``resume`` event, so every step appears once.
"""

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
            f.write(json.dumps({"event": event, **data}, allow_nan=False) + "\n")

    def start(self, run: dict[str, Any]) -> None:
        step = run["progress"]["step"]
        where = {"from_step": step} if step else {}
        self._write("resume" if step else "start", {**where, "train": run["train"], "saes": run["saes"]})

    def step(self, report: StepReport) -> None:
        self._write("step", dataclasses.asdict(report))

    def finish(self, summary: dict[str, Any]) -> None:
        self._write("finish", summary)

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        self._write("evaluate", {"results": records})
