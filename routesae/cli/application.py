"""``routesae contexts`` and ``routesae steer``: using a trained SAE on the model."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from routesae.cli.options import (
    device_option,
    inference_options,
    json_option,
    print_json,
)
from routesae.plugins import PluginManager


def make_contexts_command(pm: PluginManager) -> click.Command:
    from routesae.contexts import extract_contexts

    def callback(paths: tuple[str, ...], as_json: bool, **options: Any) -> None:
        results = extract_contexts(list(paths), **options)
        if as_json:
            keys = ("sae", "hits", "interpretable_latents", "latent_size", "settings")
            print_json({d: {"file": f"{d}/contexts.json", **{k: r[k] for k in keys}} for d, r in results.items()})

    def option(name: str, type_: Any, default: Any, help_: str) -> click.Option:
        return click.Option([name], type=type_, default=default, show_default=default is not None, help=help_)

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        option(
            "--threshold",
            float,
            15.0,
            "A latent activates at a token when z > threshold. 15 suits d_model 2048 "
            "(the reference); activations scale with sqrt(d_model): 3-4 suits the SmolLM2 demo SAEs.",
        ),
        option("--window", int, 64, "Most tokens per context (a sentence around the token, cropped around it)."),
        option("--top-per-class", int, 2, "Contexts kept per (latent, activating-token class), highest first."),
        option("--max-classes", int, 32, "Drop latents that fire on more token classes than this (0: keep all)."),
        option("--min-contexts", int, 5, "Keep latents with at least this many shown contexts."),
        option("--held-out", int, 5, "Random extra contexts per latent (and non-activating windows) for detection."),
        option("--pool", int, 100, "Random windows of the split, the negatives for detection."),
        option("--tokens", int, None, "Apply-split tokens to read. [default: the whole apply split]"),
        option("--batch-size", int, 8, "Sequences per language-model batch."),
        *inference_options(),
        option("--seed", int, 0, "Seed of the held-out sample and the pool."),
        device_option(),
        json_option("Print a summary per SAE as JSON on stdout."),
    ]
    return click.Command(
        "contexts",
        callback=callback,
        params=params,
        help="Find each latent's top-activating contexts on the apply split (one pass for several SAEs of one model); "
        "writes contexts.json next to each checkpoint.",
    )


def make_steer_command(pm: PluginManager) -> click.Command:
    from routesae.steering import POSITIONS, steer

    def callback(sae_dir: str, clamp: tuple[str, ...], as_json: bool, **options: Any) -> None:
        result = steer(sae_dir, options.pop("prompt"), list(clamp), **options)
        if as_json:
            print_json(result.to_dict())
            return
        table = Table(
            title=f"{result.settings['sae']}  clamps {' '.join(result.settings['clamps']) or '(none)'}", expand=True
        )
        table.add_column("original", ratio=1, overflow="fold")
        table.add_column("steered", ratio=1, overflow="fold")
        table.add_row(result.original, result.steered)
        Console(width=160 if not sys.stdout.isatty() else None).print(table)

    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--clamp"],
            multiple=True,
            metavar="LATENT=OP",
            help="Clamp a latent at every steered token; repeatable. 123=20 sets it to 20, 123=+15 adds 15, "
            "123=-15 subtracts 15, 123=*2 multiplies it by 2.",
        ),
        click.Option(
            ["--prompt"], required=True, help="Text to continue (wrapped as a user message for instruct models)."
        ),
        click.Option(
            ["--max-new-tokens"],
            type=int,
            default=64,
            show_default=True,
            help="Most tokens to generate (stops at EOS).",
        ),
        click.Option(
            ["--temperature"], type=float, default=0.7, show_default=True, help="Sampling temperature; 0 is greedy."
        ),
        click.Option(
            ["--top-p"],
            type=float,
            default=1.0,
            show_default=True,
            help="Nucleus sampling: keep the smallest set of tokens with this probability.",
        ),
        click.Option(
            ["--seed"],
            type=int,
            default=0,
            show_default=True,
            help="Seed of both continuations (the same stream for each).",
        ),
        click.Option(
            ["--chat/--no-chat"],
            default=None,
            help="Wrap the prompt in the tokenizer's chat template. [default: when the tokenizer has one]",
        ),
        click.Option(["--system"], default=None, help="A system message for the chat template."),
        click.Option(
            ["--replace"],
            is_flag=True,
            help="Put the clamped reconstruction itself in the residual stream (the reference), adding the SAE's error; "
            "by default only the clamp's change is added.",
        ),
        click.Option(
            ["--positions"],
            type=click.Choice(POSITIONS),
            default="all",
            show_default=True,
            help="'all': every token but position 0 (the attention sink), prompt included; 'generation': only the "
            "positions that pick new tokens.",
        ),
        click.Option(
            ["--soft-at-argmax"],
            is_flag=True,
            help="Steer a soft-routed RouteSAE at each token's highest-weight block, as evaluation splices it.",
        ),
        *inference_options("the SAE"),
        device_option(),
        json_option("Print the record (texts, token ids, settings) as JSON."),
    ]
    return click.Command(
        "steer",
        callback=callback,
        params=params,
        help="Continue a prompt twice from one seed, without and with latents clamped at every generated token, "
        "and show both continuations side by side.",
    )
