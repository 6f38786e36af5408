"""Weights & Biases reporter (``--report wandb``): the real wandb client, optional at run time.

Steps log every SAE's terms as ``<sae>/<term>``; at the end, list-valued SAE statistics (the
RouteSAE routing histogram) become bar charts. ``WANDB_PROJECT`` names the project (default
``routesae``); ``WANDB_MODE=offline`` keeps everything on disk under ``<run>/wandb``. The API key
comes from wandb's own environment or login, never from routesae's options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from routesae.errors import RouteSAEError
from routesae.reporters.base import Reporter, StepReport


class WandbReporter(Reporter):
    name = "wandb"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        try:
            import wandb
        except ImportError:
            raise RouteSAEError("--report wandb needs the wandb package: pip install 'routesae[wandb]'") from None
        self.wandb = wandb
        self.run: Any = None

    def _init(self, name: str, job_type: str, config: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "routesae"),
            name=name,
            job_type=job_type,
            dir=str(self.run_dir),
            config=config,
            reinit="finish_previous",
        )

    def start(self, run: dict[str, Any]) -> None:
        config = {"train": run["train"], "saes": run["saes"], "model": run["model"], "data": run["data"]}
        self._init(self.run_dir.name, "train", config)

    def evaluation(self, records: list[dict[str, Any]]) -> None:
        self._init(f"{self.run_dir.name}-eval", "evaluate", {"settings": records[0]["settings"], "split": records[0]["split"]})
        self.run.summary.update(
            {f"{r['sae']}/eval/{name}": value for r in records for name, value in r["metrics"].items()}
        )

    def step(self, report: StepReport) -> None:
        metrics = {f"{sae}/{term}": value for sae, terms in report.saes.items() for term, value in terms.items()}
        self.run.log({**metrics, "lr": report.lr, "tokens": report.tokens, "tokens_per_s": report.tokens_per_s}, step=report.step)

    def finish(self, summary: dict[str, Any]) -> None:
        charts = {}
        for sae in summary["saes"]:
            self.run.summary[f"{sae['name']}/dead_fraction"] = sae["dead_fraction"]
            for stat, histogram in sae.get("statistics", {}).items():
                if isinstance(histogram, dict) and histogram:
                    table = self.wandb.Table(columns=["label", stat], data=[[k, v] for k, v in histogram.items()])
                    charts[f"{sae['name']}/{stat}"] = self.wandb.plot.bar(table, "label", stat, title=f"{sae['name']} {stat}")
        self.run.summary.update({"tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"]})
        if charts:
            self.run.log(charts)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
