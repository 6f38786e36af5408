"""Progress bar and final summary table on stderr (stdout stays free for ``--json``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from routesae.reporters.base import Reporter, StepReport


class ConsoleReporter(Reporter):
    name = "console"

    def start(self, run: dict[str, Any]) -> None:
        self.console = Console(stderr=True)
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
        speed = f"{report.tokens / report.seconds:,.0f} tok/s" if report.seconds > 0 else ""
        first = next(iter(report.saes.values()))
        stats = "  ".join(f"{k} {v:.4g}" for k, v in first.items() if k in ("loss", "l0"))
        self.progress.update(self.task, completed=report.tokens, speed=speed, stats=stats)

    def finish(self, summary: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=summary["tokens"])
        self.progress.stop()
        table = Table(title=f"Trained {len(summary['saes'])} SAE(s) on {summary['tokens']:,} tokens in {summary['seconds']:.1f} s")
        for column in ("SAE", "arch", "layers", "NMSE", "L0", "dead", "tok/s", "path"):
            table.add_column(column, justify="left" if column in ("SAE", "arch", "path") else "right")
        for sae in summary["saes"]:
            final = sae["final"]
            table.add_row(
                sae["name"],
                sae["architecture"],
                ",".join(map(str, sae["layers"])),
                f"{final.get('nmse', float('nan')):.4f}",
                f"{final.get('l0', float('nan')):.1f}",
                f"{sae['dead_fraction']:.1%}",
                f"{sae['tokens_per_s']:,.0f}",
                sae["path"],
            )
        self.console.print(table)

    def close(self) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()
