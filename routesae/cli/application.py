"""``routesae contexts`` and ``routesae steer``: using a trained SAE on the model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from routesae.cli.options import (
    command,
    config_options,
    config_values,
    device_option,
    json_option,
    print_json,
    print_written,
)
from routesae.distributed import writes_here
from routesae.latent_scales import LatentScale
from routesae.plugins import PluginManager
from routesae.rundir import CONTEXTS_FILE, STEERING_FILE


def make_contexts_command(pm: PluginManager) -> click.Command:
    from routesae.contexts import ContextsConfig, extract_contexts

    def callback(paths: tuple[str, ...], device: str | None, as_json: bool, **values: Any) -> None:
        cfg = ContextsConfig.from_dict(config_values(ContextsConfig, values))
        results = extract_contexts(list(paths), cfg, device=device)
        if writes_here():  # under torchrun, rank 0 speaks for the job
            if as_json:
                keys = ("sae", "hits", "interpretable_latents", "latent_size", "settings")
                print_json({d: {"file": str(Path(d) / CONTEXTS_FILE), **{k: r[k] for k in keys}} for d, r in results.items()})
            print_written(f"{CONTEXTS_FILE} ({len(results)} SAE(s))", list(results))

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        *config_options(ContextsConfig),
        device_option(),
        json_option("Print a summary per SAE as JSON on stdout."),
    ]
    return command(
        "contexts",
        callback=callback,
        params=params,
        help_text="Find each latent's top-activating contexts on the apply split (one pass for several SAEs of one model); "
        "writes contexts.json next to each checkpoint.",
        example='routesae contexts runs/demo --threshold p75',
    )


def make_steer_command(pm: PluginManager) -> click.Command:
    from routesae.steering import SteerConfig, record_steering, steer_sweep

    def callback(
        sae_dir: str, clamp: tuple[str, ...], prompt: str, record: bool, device: str | None, as_json: bool,
        **values: Any,
    ) -> None:
        cfg = SteerConfig.from_dict(config_values(SteerConfig, values))
        results = steer_sweep(sae_dir, prompt, list(clamp), cfg, device=device)
        if record:
            written = record_steering(sae_dir, results)
        if as_json:
            print_json(results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results])
        else:
            _print_steering(results)
        if record:
            print_written(f"{len(results)} steering result(s) to {STEERING_FILE}", [written.parent])

    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--clamp"],
            multiple=True,
            metavar="LATENT=OP",
            help="Clamp a latent at every steered token; repeatable. 123=20 sets it to 20, 123=+15 adds 15, "
            "123=-15 subtracts 15, 123=*2 multiplies it by 2; 123=x2max sets it to twice its largest activation on "
            "held-out text (x1typical: its typical one); 123=5,10,20 steers once per value, side by side.",
        ),
        click.Option(
            ["--prompt"], required=True, help="Text to continue (wrapped as a user message for instruct models)."
        ),
        click.Option(["--record"], is_flag=True, help=f"Add the results to {STEERING_FILE} beside the SAE (the report "
                     "shows them)."),
        *config_options(SteerConfig),
        device_option(),
        json_option("Print the record (texts, token ids, settings) as JSON (a list for a sweep)."),
    ]
    return command(
        "steer",
        callback=callback,
        params=params,
        help_text="Continue a prompt twice from one seed, without and with latents clamped at every generated token, "
        "and show both continuations side by side, with how each clamped latent fires on held-out text.",
        example='routesae steer runs/demo/topk-L21-k32-F4096 --clamp 1234=x2max --prompt "Tell me about Paris."',
    )


def _print_steering(results: list[Any]) -> None:
    console = Console(width=160 if not sys.stdout.isatty() else None)
    first = results[0].settings
    for scale in first["scales"].values():
        console.print(LatentScale(**scale).describe(), highlight=False)
    table = Table(title=f"{first['sae']}  clamps {' '.join(first['asked']) or '(none)'}", expand=True)
    table.add_column("original", ratio=1, overflow="fold")
    for result in results:
        table.add_column("steered " + " ".join(result.settings["clamps"]) if len(results) > 1 else "steered",
                         ratio=1, overflow="fold")
    table.add_row(results[0].original, *(result.steered for result in results))
    console.print(table)
