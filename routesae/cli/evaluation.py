"""``routesae evaluate``."""

from __future__ import annotations

import click

from routesae.cli.options import (
    device_option,
    inference_options,
    json_option,
    print_json,
    report_option,
    reporter_names,
)
from routesae.plugins import PluginManager


def make_evaluate_command(pm: PluginManager) -> click.Command:
    from routesae.evaluate import evaluate

    def callback(
        paths: tuple[str, ...],
        metric: tuple[str, ...],
        tokens: int | None,
        batch_size: int,
        reference_metrics: bool,
        infer_k: int | None,
        theta: float | None,
        device: str | None,
        as_json: bool,
        report: str,
    ) -> None:
        results = evaluate(
            list(paths),
            list(metric) or None,
            tokens=tokens,
            batch_size=batch_size,
            reference_metrics=reference_metrics,
            infer_k=infer_k,
            theta=theta,
            device=device,
            reporters=reporter_names(report),
        )
        if as_json:
            print_json(results)

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--metric"],
            multiple=True,
            help=f"Metric to compute; repeat for several (default: all). Installed: {', '.join(pm.names('metric'))}.",
        ),
        click.Option(
            ["--tokens"],
            type=int,
            default=None,
            help="Eval tokens (counted positions) to use. [default: the whole eval split]",
        ),
        click.Option(
            ["--batch-size"], type=int, default=8, show_default=True, help="Sequences per language-model batch."
        ),
        click.Option(
            ["--reference-metrics"],
            is_flag=True,
            help="The reference's conventions: every position (BOS, padding) replaced and counted, KL summed over positions "
            "and divided by sequences, CE over all B*(T-1) positions.",
        ),
        *inference_options(),
        device_option(),
        json_option("Print the results as JSON on stdout (the table goes to stderr)."),
        report_option(pm),
    ]
    return click.Command(
        "evaluate",
        callback=callback,
        params=params,
        help="Evaluate SAE or run directories on the eval split by splicing reconstructions into the model; "
        "writes eval.json next to each checkpoint.",
    )
