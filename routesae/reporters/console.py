"""Training progress and the final tables on stderr (stdout stays free for ``--json``).

The bar is :class:`~routesae.progress.JobProgress` (one style with every other long job): it says
that the first shuffle group is being harvested until the first step, moves and estimates the
time left after every step, shows one line per SAE (loss, L0) at each log step, and ends on the
run's own final speed. When stderr is not a terminal it becomes plain periodic lines.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from routesae.progress import JobProgress
from routesae.reporters.base import Reporter, StepReport

# What the tables call each figure, with the definition a reader needs beside it.
DEAD_WINDOW = "dead_window"
FOOTER_TRAINING = (
    "dead_window: share of latents that did not fire during the last {window:,} training tokens (n/a when the run "
    "was shorter); routesae evaluate reports dead_eval, latents that never fired on the evaluated tokens."
)
FOOTER_EVALUATION = (
    "normmse = mean ‖x − x̂‖² / mean ‖x‖² (error against the activations' size); fvu = ‖x − x̂‖² / ‖x − mean(x)‖² "
    "(variance left unexplained). dead_eval: share of latents that never fired on these tokens."
)


def stderr_console() -> Console:
    """A console on stderr; one too narrow to hold a table row is widened when it is a log, not a terminal."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=max(console.width, 220))


class ConsoleReporter(Reporter):
    name = "console"

    def start(self, run: dict[str, Any]) -> None:
        self.console = stderr_console()
        self.window = run["train"]["dead_after_tokens"]
        model, data = run["model"], run["data"]
        self.console.print(
            f"model {model['spec']} ({model['n_layers']} blocks, d_model {model['d_model']}) · layers {run['layers']}",
            highlight=False, soft_wrap=True,
        )
        splits = " · ".join(f"{name} {split['tokens']:,} tokens" for name, split in data["splits"].items())
        self.console.print(f"data {data['source']}: {splits}", highlight=False, soft_wrap=True)
        self.progress = JobProgress("train", run["train"]["tokens"], console=self.console)
        self.progress.completed = run["progress"]["tokens"]
        self.progress.status = "harvesting the first shuffle group" if not run["progress"]["tokens"] else "resuming"
        self.progress.__enter__()

    def tick(self, tokens: int, tokens_per_s: float) -> None:
        self.progress.update(tokens, status="", rate=tokens_per_s)

    def step(self, report: StepReport) -> None:
        lines = [
            f"{name}  " + "  ".join(f"{key} {value:.4g}" for key, value in terms.items() if key in ("loss", "l0"))
            for name, terms in report.saes.items()
        ]
        self.progress.update(report.tokens, lines=lines, rate=report.tokens_per_s)

    def finish(self, summary: dict[str, Any]) -> None:
        lines = [f"{sae['name']}  loss {sae['final'].get('loss', float('nan')):.4g}  l0 "
                 f"{sae['final'].get('l0', float('nan')):.4g}" for sae in summary["saes"]]
        self.progress.update(summary["tokens"], lines=lines, rate=summary["tokens_per_s"])
        self._close_progress(failed=False)
        table = Table(title=f"Trained {len(summary['saes'])} SAE(s) on {summary['tokens']:,} tokens in "
                            f"{summary['seconds']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s)")
        for column in ("SAE", "layers", "NMSE", "L0", DEAD_WINDOW):
            table.add_column(column, justify="left" if column == "SAE" else "right", overflow="fold")
        measured = summary["tokens"] >= self.window
        for sae in summary["saes"]:
            final, layers = sae["final"], sae["layers"]
            table.add_row(
                sae["name"],
                str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}",
                f"{final.get('nmse', float('nan')):.4f}",
                f"{final.get('l0', float('nan')):.1f}",
                f"{sae['dead_fraction']:.1%}" if measured else "n/a",
            )
        table.caption = FOOTER_TRAINING.format(window=self.window)
        self.console.print(table)
        for sae in summary["saes"]:
            for stat, histogram in sae.get("statistics", {}).items():
                if isinstance(histogram, dict) and histogram:
                    total = sum(histogram.values()) or 1
                    shares = " ".join(f"{label}:{value / total:.0%}" for label, value in histogram.items())
                    self.console.print(f"{sae['name']} {stat.replace('_', ' ')}: {shares}", highlight=False)

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        names = list(dict.fromkeys(name for record in records for name in record["metrics"]))
        table = Table(title=f"{self.run_dir}: {records[0]['tokens']:,} {records[0]['split']} tokens",
                      caption=FOOTER_EVALUATION)
        table.add_column("SAE", overflow="fold")
        for name in names:
            table.add_column(name.replace("_", " ") if name != "dead_eval" else name, justify="right", overflow="fold")
        for record in records:
            table.add_row(record["sae"], *(f"{record['metrics'][name]:.4g}" for name in names))
        stderr_console().print(table)

    def close(self) -> None:
        self._close_progress(failed=True)  # still open here: the run stopped before finish()

    def _close_progress(self, failed: bool) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.close(failed=failed)
            self.progress = None
