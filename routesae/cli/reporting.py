"""``routesae report`` and ``routesae plugins``: what a run produced and what is installed."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from routesae.cli.options import (
    command,
    json_option,
    print_json,
)
from routesae.plugins import PluginManager


def make_report_command(pm: PluginManager) -> click.Command:
    from routesae.report import DEFAULT_MAX_CARDS, write_report

    def callback(paths: tuple[str, ...], out: str | None, max_cards: int) -> None:
        click.echo(f"wrote the report {write_report(list(paths), out, max_cards=max_cards)}", err=True)

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--out"],
            type=click.Path(dir_okay=False),
            default=None,
            help="HTML file to write. [default: the first PATH's report.html]",
        ),
        click.Option(
            ["--max-cards"],
            type=click.IntRange(min=0),
            default=DEFAULT_MAX_CARDS,
            show_default=True,
            help="Cards per SAE for latents that have contexts but no interpretation (interpreted ones are always shown).",
        ),
    ]
    return command(
        "report",
        callback=callback,
        params=params,
        help_text="Write a self-contained HTML report of run or SAE directories (routesae's or SAELens's), side by side: "
        "metrics, routing histogram, contexts and interpretations of each SAE; a `routesae compare` directory adds its "
        "figures and summary.",
        example='routesae report runs/demo',
    )


def make_plugins_command(pm: PluginManager) -> click.Command:
    def callback(as_json: bool) -> None:
        infos = pm.plugin_infos()
        if as_json:
            print_json([i.to_dict() for i in infos])
            return
        table = Table(title="routesae plugins")
        for column in ("plugin", "distribution", "version", "registered", "status"):
            table.add_column(column)
        for i in infos:
            registered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in i.registered.items())
            status = f"[red]{i.error}" if i.error else "\n".join(f"[yellow]{w}" for w in i.warnings) or "ok"
            table.add_row(i.name, i.distribution, i.version, registered or "-", status)
        Console(width=200 if not sys.stdout.isatty() else None).print(table)

    return command(
        "plugins",
        callback=callback,
        params=[json_option("Machine-readable output.")],
        help_text="List installed plugins, what each registered, and load errors.",
    )
