"""Progress bar and final summary table on stderr (stdout stays free for ``--json``).

When stderr is not a terminal (CI logs, ``nohup``), a live bar would print nothing until the
end, so a plain progress line is written at most every ``PLAIN_EVERY_S`` seconds instead.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from routesae.reporters.base import Reporter, StepReport

PLAIN_EVERY_S = 15.0


class ConsoleReporter(Reporter):
    name = "console"

    def start(self, run: dict[str, Any]) -> None:
        self.console = Console(stderr=True)
        self.last_plain = time.monotonic()
        model, data = run["model"], run["data"]
        self.console.print(
            f"model {model['spec']} ({model['n_layers']} blocks, d_model {model['d_model']}) · layers {run['layers']}"
        )
        splits = " · ".join(f"{name} {split['tokens']:,} tokens" for name, split in data["splits"].items())
        self.console.print(f"data {data['source']}: {splits}")
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=run["train"]["tokens"], speed="", stats="")
        self.progress.start()

    def step(self, report: StepReport) -> None:
        speed = f"{report.tokens_per_s:,.0f} tok/s"
        first = next(iter(report.saes.values()))
        stats = "  ".join(f"{k} {v:.4g}" for k, v in first.items() if k in ("loss", "l0"))
        self.progress.update(self.task, completed=report.tokens, speed=speed, stats=stats)
        if not self.console.is_terminal and time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.monotonic()
            self.console.print(f"train {report.tokens:,}/{report.total_tokens:,} tok  {speed}  {stats}")

    def finish(self, summary: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=summary["tokens"])
        self.progress.stop()
        table = Table(title=f"Trained {len(summary['saes'])} SAE(s) on {summary['tokens']:,} tokens in {summary['seconds']:.1f} s")
        for column in ("SAE", "layers", "NMSE", "L0", "dead"):
            table.add_column(column, justify="left" if column == "SAE" else "right", overflow="fold")
        for sae in summary["saes"]:
            final, layers = sae["final"], sae["layers"]
            table.add_row(
                sae["name"],
                str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}",
                f"{final.get('nmse', float('nan')):.4f}",
                f"{final.get('l0', float('nan')):.1f}",
                f"{sae['dead_fraction']:.1%}",
            )
        self.console.print(table)
        for sae in summary["saes"]:
            for stat, histogram in sae.get("statistics", {}).items():
                if isinstance(histogram, dict) and histogram:
                    total = sum(histogram.values()) or 1
                    shares = " ".join(f"{label}:{value / total:.0%}" for label, value in histogram.items())
                    self.console.print(f"{sae['name']} {stat.replace('_', ' ')}: {shares}")
        self.console.print(f"{summary['tokens_per_s']:,.0f} tokens/s · checkpoints in {summary['run']}/<SAE>")

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        names = list(dict.fromkeys(name for record in records for name in record["metrics"]))
        table = Table(title=f"{self.run_dir}: {records[0]['tokens']:,} {records[0]['split']} tokens")
        table.add_column("SAE", overflow="fold")
        for name in names:
            table.add_column(name.replace("_", " "), justify="right", overflow="fold")
        for record in records:
            table.add_row(record["sae"], *(f"{record['metrics'][name]:.4g}" for name in names))
        console = Console(stderr=True)
        if not console.is_terminal:  # logs: one row per SAE, however many metrics
            console = Console(stderr=True, width=220)
        console.print(table)

    def close(self) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()
