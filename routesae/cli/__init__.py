"""The ``routesae`` command line: a thin layer over the Python API.

Commands are built after the plugins are loaded, so ``--arch`` and the architecture options
(``--k``, ``--layer``, ...) come from whatever architectures are installed: each config field
of each registered architecture becomes an option, with the field's help text. Interpreter
options come from the installed interpreters' configs the same way. One module per group of
commands; plugins add theirs through the ``register_commands`` hook.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from routesae.cli.application import make_contexts_command, make_steer_command
from routesae.cli.comparison import make_compare_command
from routesae.cli.evaluation import make_evaluate_command
from routesae.cli.export import make_export_command
from routesae.cli.interpretation import make_interpret_command
from routesae.cli.reporting import make_plugins_command, make_report_command
from routesae.cli.training import make_cache_command, make_pipeline_command, make_train_command
from routesae.distributed import launched
from routesae.errors import RouteSAEError
from routesae.faults import contained
from routesae.plugins import PluginManager, activated, get_plugin_manager

__all__ = ["main", "make_cli"]


UNDER_TORCHRUN = ("train", "evaluate", "contexts")  # the commands that run data-parallel under torchrun
DEBUG_VARIABLE = "ROUTESAE_DEBUG"
CLICK_EXITS = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)  # click's own, not faults


class RouteSAEGroup(click.Group):
    """Runs every command with the group's plugin manager in use, and turns :class:`RouteSAEError` into a short
    message and exit code 2 instead of a traceback (printed too under ``--debug``)."""

    def __init__(self, plugins: PluginManager, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plugins = plugins

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if launched() and name not in UNDER_TORCHRUN:
            raise RouteSAEError(
                f"routesae {name} runs in one process; under torchrun only {', '.join(UNDER_TORCHRUN)} runs "
                "(data-parallel): start it with routesae, not torchrun"
            )
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            # what --help showed is what runs; an exception a plugin raises (its command, its hook) is one line too
            with activated(self.plugins), contained("while running the command", passing=CLICK_EXITS):
                return super().invoke(ctx)
        except RouteSAEError as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                traceback.print_exception(e)  # with the error it was raised from (a library's, for bad input)
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)


def _quiet_dependencies() -> None:
    """routesae draws its own progress; the per-file bars of transformers and datasets are noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def make_cli(pm: PluginManager | None = None) -> click.Group:
    """Build the CLI for the given (default: the process-wide) plugin manager, which its commands then run with."""
    pm = pm or get_plugin_manager()
    _quiet_dependencies()
    debug = click.Option(["--debug"], is_flag=True, help=f"On an error, print its traceback too (or set {DEBUG_VARIABLE}=1).")
    cli = RouteSAEGroup(
        pm, params=[debug], help="routesae: train, evaluate and interpret sparse autoencoders on language models."
    )
    cli = click.version_option(package_name="routesae")(cli)
    builders: list[Callable[[PluginManager], click.Command]] = [
        make_train_command,
        make_cache_command,
        make_evaluate_command,
        make_contexts_command,
        make_steer_command,
        make_interpret_command,
        make_report_command,
        make_pipeline_command,
        make_compare_command,
        make_plugins_command,
        make_export_command,
    ]
    with activated(pm):  # composites (RouteSAE) list their parts' settings from the manager in use
        for build in builders:
            cli.add_command(build(pm))
    pm.add_commands(cli)
    return cli


def main() -> None:
    try:
        cli = make_cli()
    except RouteSAEError as e:  # e.g. two plugins registering one name
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    cli(prog_name="routesae")
