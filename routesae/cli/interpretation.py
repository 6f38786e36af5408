"""``routesae interpret``: interpreter backends explain latents from their contexts."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from routesae.cli.options import (
    cli_settable,
    command,
    config_options,
    config_values,
    field_default,
    field_option,
    json_option,
    option_name,
    print_json,
    print_written,
)
from routesae.config import field_help, field_types
from routesae.errors import PluginError, RouteSAEError
from routesae.plugins import PluginManager


def interpreter_options(pm: PluginManager, reserved: Iterable[str], prefix: str = "") -> list[click.Option]:
    """One option per settable config field across the installed interpreters.

    A setting several backends share (``--model``) gets one option whose help gives each one's meaning,
    or, where they mean the same (``--timeout`` of ``openai`` and ``azure``), that meaning once.
    ``prefix`` namespaces them (``routesae pipeline`` has its own ``--model``, the language model).
    """
    fields: dict[str, dict[str, dataclasses.Field]] = {}
    types: dict[str, Any] = {}
    for name in pm.names("interpreter"):
        config_cls = getattr(pm.get("interpreter", name), "Config", None)
        if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
            continue
        for f, (tp, _) in zip(dataclasses.fields(config_cls), field_types(config_cls).values()):
            if f.name in reserved:
                raise PluginError(
                    f"interpreter {name!r} has a setting {f.name!r} that clashes with an interpret option"
                )
            if cli_settable(tp) and types.setdefault(f.name, tp) == tp:
                fields.setdefault(f.name, {})[name] = f
    options = []
    for setting_name, owners in sorted(fields.items()):
        first = next(iter(owners.values()))
        if len({(field_help(f), repr(field_default(f))) for f in owners.values()}) == 1:  # one meaning (a shared base)
            only = f" ({', '.join(owners)} only)"
            options.append(field_option(first, types[setting_name], only, prefix=prefix))
            continue
        joined = "; ".join(f"{owner}: {field_help(f).rstrip('.')}" for owner, f in owners.items()) + "."
        shared = dataclasses.field(default=None, metadata={"help": joined})
        shared.name = setting_name
        defaults = {owner: field_default(f) for owner, f in owners.items()}
        default_text = (
            None if all(v is None for v in defaults.values()) else ", ".join(f"{o} {v}" for o, v in defaults.items())
        )
        options.append(field_option(shared, types[setting_name], default_text=default_text, prefix=prefix))
    return options


def make_interpret_command(pm: PluginManager) -> click.Command:
    from pathlib import Path

    from routesae.interpret import INTERPRET_SETTINGS, BudgetReached, InterpretConfig, interpret
    from routesae.rundir import INTERPRETATIONS_FILE

    reserved = INTERPRET_SETTINGS | {"sae_dir", "interpreter", "overwrite", "retry_unparsable", "as_json"}

    def callback(
        sae_dir: str, interpreter: str, retry_unparsable: bool, overwrite: bool, as_json: bool, **values: Any
    ) -> None:
        cfg = InterpretConfig.from_dict(config_values(InterpretConfig, values))
        options = {k: v for k, v in values.items() if v is not None}
        config_cls = getattr(pm.get("interpreter", interpreter), "Config", None)
        known = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set()
        if foreign := sorted(set(options) - known):
            raise RouteSAEError(
                f"{', '.join(map(option_name, foreign))}: not an option of the {interpreter} interpreter "
                f"(its options: {', '.join(map(option_name, sorted(known))) or 'none'})"
            )
        console = Console(stderr=True)
        try:
            doc = interpret(
                sae_dir, interpreter, cfg, overwrite=overwrite, retry_unparsable=retry_unparsable, **options
            )
        except BudgetReached as e:
            console.print(f"[bold]{e}", highlight=False)
            sys.exit(3)
        _print_interpretation(console, doc)
        if as_json:
            print_json(
                {"path": str(Path(sae_dir) / INTERPRETATIONS_FILE), "summary": doc["summary"], "usage": doc["usage"]}
            )
        print_written(INTERPRETATIONS_FILE, [sae_dir])

    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--interpreter"],
            default="local",
            show_default=True,
            help=f"Interpreter backend. Installed: {', '.join(pm.names('interpreter'))}.",
        ),
        *config_options(InterpretConfig),
        click.Option(
            ["--retry-unparsable"],
            is_flag=True,
            help="Ask again where an earlier answer (explanation or detection) could not be read.",
        ),
        click.Option(
            ["--overwrite"], is_flag=True, help="Discard an existing interpretations.json instead of continuing it."
        ),
        json_option("Print the summary and usage as JSON on stdout."),
        *interpreter_options(pm, reserved),
    ]
    return command(
        "interpret",
        callback=callback,
        params=params,
        help_text="Explain and score a sample of an SAE's latents from its contexts.json with an interpreter backend; "
        "writes interpretations.json after every latent and continues an interrupted run. API keys are read from the "
        "environment only (OPENAI_API_KEY, AZURE_OPENAI_API_KEY). Exit code 3: --max-cost reached (re-run to continue).",
        example='routesae interpret runs/demo/topk-L21-k32-F4096 --interpreter openai --sample 100',
    )


def _print_interpretation(console: Console, doc: dict[str, Any]) -> None:
    s, usage = doc["summary"], doc["usage"]
    prices = doc["interpreter"].get("prices", "")
    if prices.startswith("built-in"):
        console.print(f"note: costs use the {prices}", highlight=False)
    table = Table(title=f"{doc['sae']}: {s['features_scored']} of {len(doc['sampled'])} features scored")
    for column in ("category", "count", "mean score"):
        table.add_column(column)
    for name, c in s["categories"].items():
        table.add_row(name, str(c["count"]), "-" if c["mean_score"] is None else f"{c['mean_score']:.2f}")
    table.add_row("all", str(s["features_scored"]), "-" if s["average_score"] is None else f"{s['average_score']:.2f}")
    console.print(table)
    accuracy = "-" if s["detection_accuracy"] is None else f"{s['detection_accuracy']:.2f}"
    cost = "unknown" if usage["cost_usd"] is None else f"${usage['cost_usd']:.4f}"
    console.print(
        f"unparsable {s['unparsable']} · errors {s['errors']} · detection accuracy {accuracy} "
        f"({s['detection_scored']} features) · {usage['requests']} requests, {cost}",
        highlight=False,
    )
