"""``routesae train``, ``routesae cache`` and ``routesae pipeline``: the commands that harvest activations."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click

from routesae.cli.options import (
    CommaList,
    architecture_options,
    command,
    config_options,
    config_values,
    in_panel,
    json_option,
    option_name,
    print_json,
    print_written,
    report_option,
    reporter_names,
)
from routesae.distributed import writes_here
from routesae.errors import RouteSAEError
from routesae.plugins import PluginManager
from routesae.specs import SAESpec
from routesae.train_config import TrainConfig

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
INTERPRETER_PREFIX = "interpreter_"


# Training settings by what a user is deciding; a field not listed here shows under "Other training settings".
TRAIN_PANELS = {
    "Data": ("model", "dataset", "text_field", "context_length", "batch_size", "tokens", "epochs", "keep_bos", "seed",
             "from_cache"),
    "Optimisation": ("sae_batch_tokens", "buffer_tokens", "lr", "schedule", "warmup", "decay", "renorm_every",
                     "remove_parallel_grad", "dead_after_tokens"),
    "Run directory": ("checkpoint_every", "log_every"),
    "Speed": ("device", "compile", "autocast", "overlap_harvest"),
}
EXAMPLE = "routesae train --arch routesae --arch topk --k 32 --latent-size 4096 --tokens 200000 --out runs/demo"


def training_params(pm: PluginManager) -> list[click.Parameter]:
    """What to train, where, and how: shared by ``train`` and ``pipeline``."""
    settings = {option.name: option for option in config_options(TrainConfig)}
    panelled = {name for names in TRAIN_PANELS.values() for name in names}
    return [
        *in_panel("What to train", [
            click.Option(
                ["--arch", "arch"],
                multiple=True,
                help=f"Architecture(s) to train from one harvest; repeat for several (default: topk). "
                f"Installed: {', '.join(pm.names('architecture'))}.",
            ),
            click.Option(
                ["--config"],
                type=click.Path(dir_okay=False),
                help="TOML run file: a [train] table and one [sae.NAME] table per SAE.",
            ),
        ]),
        *architecture_options(pm, reserved=TRAIN_FIELDS),
        *(option for title, names in TRAIN_PANELS.items() for option in in_panel(title, [settings[n] for n in names])),
        *in_panel("Run directory", [
            click.Option(["--out"], type=click.Path(file_okay=False), help="Run directory (one sub-directory per SAE)."),
            report_option(pm),
        ]),
        *in_panel("Other training settings", [o for name, o in settings.items() if name not in panelled]),
    ]


def training_request(
    arch: tuple[str, ...], config: str | None, out: str | None, values: dict[str, Any]
) -> tuple[list[SAESpec], str, TrainConfig]:
    """(SAEs, run directory, training config) from ``--arch``/architecture options or a ``--config`` run file."""
    from routesae.specs import expand_specs, load_run_file

    given = {k: v for k, v in values.items() if v is not None}
    arch_settings = {k: v for k, v in given.items() if k not in TRAIN_FIELDS}
    train_settings = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    if config:
        if arch or arch_settings:
            raise RouteSAEError("give the SAEs either in --config or with --arch and its options, not both")
        file_train, specs = load_run_file(config)
        out = out or file_train.pop("out", None)
        file_train.pop("out", None)
        train_settings = {**file_train, **train_settings}
    else:
        specs = expand_specs(list(arch or ("topk",)), arch_settings)
    if not out:
        raise RouteSAEError('say where the run goes: --out DIR (or out = "DIR" in the run file\'s [train] table)')
    if train_settings.get("from_cache"):  # model and data come from the cache unless given (and then checked)
        cfg = TrainConfig.for_cache(train_settings["from_cache"], **train_settings)
    else:
        cfg = TrainConfig.from_dict(train_settings)
    return specs, out, cfg


def make_train_command(pm: PluginManager) -> click.Command:
    from routesae.train import train

    def callback(
        arch: tuple[str, ...],
        config: str | None,
        out: str | None,
        overwrite: bool,
        resume: bool,
        as_json: bool,
        report: str,
        **values: Any,
    ) -> None:
        if overwrite and resume:
            raise RouteSAEError("--overwrite and --resume contradict each other; pick one")
        specs, out, cfg = training_request(arch, config, out, values)
        summary = train(specs, out, cfg, overwrite=overwrite, resume=resume, reporters=reporter_names(report))
        if writes_here():  # under torchrun, rank 0 speaks for the run
            if as_json:
                print_json(summary)
            print_written(f"{len(summary['saes'])} SAE checkpoint(s), run.json and metrics.jsonl", [summary["run"]])

    params: list[click.Parameter] = [
        *training_params(pm),
        *in_panel("Run directory", [
            click.Option(["--overwrite"], is_flag=True, help="Replace the checkpoints of a run already in --out."),
            click.Option(["--resume"], is_flag=True, help="Continue the unfinished run in --out from its last checkpoint."),
            json_option("Print a machine-readable summary on stdout at the end."),
        ]),
    ]
    return command(
        "train",
        callback,
        params,
        "Train one or more SAEs on one model's residual stream, all from one activation harvest. "
        "Comma-separated architecture settings (--k 32,64,128) train one SAE per value.",
        example=EXAMPLE,
    )


def make_pipeline_command(pm: PluginManager) -> click.Command:
    """``routesae pipeline``: every training option, then each stage's options prefixed with its name.

    ``routesae contexts --threshold 4`` is ``routesae pipeline --contexts-threshold 4``; the
    interpreter backend's own options are prefixed ``--interpreter-``.
    """
    from routesae.cli.interpretation import interpreter_options
    from routesae.interpret import INTERPRET_SETTINGS, BudgetReached
    from routesae.pipeline import PipelineConfig, pipeline

    def callback(
        arch: tuple[str, ...],
        config: str | None,
        out: str | None,
        overwrite: bool,
        as_json: bool,
        report: str,
        **values: Any,
    ) -> None:
        stages = PipelineConfig.from_dict(config_values(PipelineConfig, values))
        backend = {
            name.removeprefix(INTERPRETER_PREFIX): values.pop(name)
            for name in list(values)
            if name.startswith(INTERPRETER_PREFIX)
        }
        specs, out, train_cfg = training_request(arch, config, out, values)
        try:
            record = pipeline(
                specs,
                out,
                train_cfg,
                stages,
                interpreter_options={k: v for k, v in backend.items() if v is not None},
                overwrite=overwrite,
                reporters=reporter_names(report),
            )
        except BudgetReached as e:
            click.echo(f"{e}", err=True)
            sys.exit(3)
        if as_json:
            print_json(record)
        report_file = record["stages"]["report"].get("result", {}).get("report")
        if report_file:
            click.echo(f"report: {report_file}", err=True)

    stages = config_options(PipelineConfig)
    params: list[click.Parameter] = [
        *training_params(pm),
        *in_panel("Run directory", [
            click.Option(["--overwrite"], is_flag=True, help="Start the run in --out over instead of continuing it."),
            json_option("Print the pipeline record (stages, timings, versions) as JSON."),
        ]),
        *(option for stage in ("evaluate", "contexts", "interpret")
          for option in in_panel(f"The {stage} stage", [o for o in stages if o.name.startswith(f"{stage}_")])),
        *in_panel("The interpreter", [
            *(o for o in stages if not o.name.startswith(("evaluate_", "contexts_", "interpret_"))),
            *interpreter_options(pm, reserved=INTERPRET_SETTINGS, prefix=INTERPRETER_PREFIX),
        ]),
    ]
    return command(
        "pipeline",
        callback,
        params,
        "Train -> evaluate -> contexts -> interpret -> report into one run directory, recording every stage in "
        "run.json. Each stage's options are its command's, prefixed with its name (--contexts-threshold). Re-running "
        "the same command continues where it stopped. Exit code 3: --interpret-max-cost reached.",
        example=EXAMPLE.replace("train", "pipeline", 1) + " --interpreter local --interpret-sample 5",
    )


def make_cache_command(pm: PluginManager) -> click.Command:
    from routesae.architectures.base import parse_layer_range
    from routesae.cache import ActivationCache, CacheConfig, cache_activations
    from routesae.specs import expand_specs

    cache_fields = {f.name for f in dataclasses.fields(CacheConfig)}

    def callback(
        out: str,
        arch: tuple[str, ...],
        layer: tuple[list[int], ...],
        layers: tuple[str, ...],
        resume: bool,
        overwrite: bool,
        as_json: bool,
        **values: Any,
    ) -> None:
        given = {k: v for k, v in values.items() if v is not None}
        arch_settings = {k: v for k, v in given.items() if k not in cache_fields}
        cfg = CacheConfig.from_dict({k: v for k, v in given.items() if k in cache_fields})
        singles = [block for group in layer for block in group]
        blocks: list[int] = []
        specs = []
        if arch:  # cache what these SAEs would read; --layer/--layers are their settings, as in train
            if singles:
                arch_settings["layer"] = singles
            if layers:
                arch_settings["layers"] = list(layers)
            specs = expand_specs(list(arch), arch_settings)
        elif arch_settings:
            options = ", ".join(option_name(k) for k in arch_settings)
            raise RouteSAEError(
                f"{options} configure an architecture: add --arch, or name the blocks with --layer/--layers"
            )
        else:
            ranges = [parse_layer_range(text) for text in layers]
            blocks = singles + [b for first, last in ranges for b in range(first, last + 1)]
        path = cache_activations(out, cfg, blocks, saes=specs, resume=resume, overwrite=overwrite)
        if as_json:
            print_json(ActivationCache(path).summary())

    arch_options = [o for o in architecture_options(pm, reserved=cache_fields) if o.name not in ("layer", "layers")]
    params: list[click.Parameter] = [
        click.Option(
            ["--out"],
            type=click.Path(file_okay=False),
            required=True,
            help="Cache directory (shards and manifest.json).",
        ),
        click.Option(
            ["--layers"],
            multiple=True,
            help="Blocks A:B (inclusive) to cache; repeatable. With --arch, that setting of it.",
        ),
        click.Option(
            ["--layer"],
            type=CommaList(int),
            multiple=True,
            help="A block to cache (0-based); repeatable or comma-separated. With --arch, that setting of it.",
        ),
        click.Option(
            ["--arch", "arch"],
            multiple=True,
            help="Cache the blocks these SAEs (with the architecture options given) would read; repeatable. "
            f"Installed: {', '.join(pm.names('architecture'))}.",
        ),
        click.Option(["--overwrite"], is_flag=True, help="Replace a cache of other settings in --out."),
        click.Option(
            ["--resume"], is_flag=True, help="Continue the unfinished cache in --out (also done without this flag)."
        ),
        json_option("Print the cache's summary (size, tokens/s) on stdout at the end."),
        *config_options(CacheConfig),
        *arch_options,
    ]
    return command(
        "cache",
        callback=callback,
        params=params,
        help_text="Harvest residual-stream activations once into sharded safetensors, for `routesae train --from-cache`. "
        "Prints the size first and refuses when the disk cannot hold it; a killed run continues where it stopped.",
        example='routesae cache --arch routesae --tokens 1000000 --out caches/smollm2-6-21',
    )
