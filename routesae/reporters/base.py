"""The reporter contract: how a run's progress and results leave the trainer and the evaluator.

A reporter is constructed with the run directory. In training it receives ``start`` once,
``tick`` after every step (tokens and seconds only: numbers the host has without waiting for the
device, so a progress bar can move and estimate from the first step on), ``step`` every
``log_every`` steps with the losses (read back from the device then) and ``finish`` with the final
summary; after an evaluation it receives ``evaluation`` with the ``eval.json`` records of the run's
evaluated SAEs. ``close`` is always called (even on error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class StepReport:
    step: int
    total_steps: int
    tokens: int
    total_tokens: int
    seconds: float  # training-loop wall time of this session (resumes restart it)
    tokens_per_s: float
    lr: float
    saes: dict[str, dict[str, float]]  # SAE name -> logged terms (loss, nmse, l0, ...)


class Reporter:
    name: ClassVar[str] = ""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def start(self, run: dict[str, Any]) -> None:
        """``run`` is the run manifest (configs, model, data)."""

    def tick(self, tokens: int, tokens_per_s: float) -> None:
        """After every step: training tokens so far (``run.json``'s count) and this session's speed."""

    def step(self, report: StepReport) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        """``records``: one ``eval.json`` record per evaluated SAE of this run."""

    def close(self) -> None:
        pass
