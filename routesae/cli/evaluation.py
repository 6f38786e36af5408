"""``routesae evaluate``."""

from __future__ import annotations

from typing import Any

import click

from routesae.cli.options import (
    command,
    config_options,
    config_values,
    device_option,
    json_option,
    print_json,
    print_written,
    report_option,
    reporter_names,
)
from routesae.distributed import writes_here
from routesae.plugins import PluginManager
from routesae.rundir import EVAL_FILE


def make_evaluate_command(pm: PluginManager) -> click.Command:
    from routesae.evaluate import EvaluateConfig, evaluate

    def callback(
        paths: tuple[str, ...], metric: tuple[str, ...], device: str | None, as_json: bool, report: str, **values: Any
    ) -> None:
        cfg = EvaluateConfig.from_dict(config_values(EvaluateConfig, values))
        results = evaluate(list(paths), list(metric) or None, cfg, device=device, reporters=reporter_names(report))
        if writes_here():  # under torchrun, rank 0 speaks for the job
            if as_json:
                print_json(results)
            print_written(f"{EVAL_FILE} ({len(results)} SAE(s))", list(results))

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--metric"],
            multiple=True,
            help=f"Metric to compute; repeat for several (default: all). Installed: {', '.join(pm.names('metric'))}.",
        ),
        *config_options(EvaluateConfig),
        device_option(),
        json_option("Print the results as JSON on stdout (the table goes to stderr)."),
        report_option(pm),
    ]
    return command(
        "evaluate",
        callback=callback,
        params=params,
        help_text="Evaluate SAE or run directories on the eval split by splicing reconstructions into the model; "
        "writes eval.json next to each checkpoint.",
        example='routesae evaluate runs/demo --tokens 16384',
    )
