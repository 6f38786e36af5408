"""``routesae compare``: the routing-controls grid (:mod:`routesae.compare`) from the command line or a run file."""

from __future__ import annotations

import tomllib
from typing import Any

import click

from routesae.cli.options import (
    command,
    config_options,
    config_values,
    in_panel,
    json_option,
    print_json,
    print_written,
    report_option,
    reporter_names,
)
from routesae.cli.training import TRAIN_FIELDS, TRAIN_PANELS
from routesae.compare import COMPARISON_FILE, FIGURES_DIR, CompareConfig, compare
from routesae.errors import RouteSAEError, reading
from routesae.plugins import PluginManager
from routesae.train_config import TrainConfig

EXAMPLE = "routesae compare --k 16,32,64 --seeds 0,1,2 --tokens 650000 --out runs/controls"
RUN_FILE_TABLES = ("train", "compare")


def read_run_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[train]`` and ``[compare]`` tables of a comparison's TOML run file (experiments/routing-controls.toml)."""
    with reading(path, "the comparison run file"), open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(RUN_FILE_TABLES))
    if unknown or not all(isinstance(data.get(t, {}), dict) for t in RUN_FILE_TABLES):
        raise RouteSAEError(f"{path}: a comparison run file has a [train] and a [compare] table, nothing else"
                            + (f" (found {', '.join(unknown)})" if unknown else ""))
    return dict(data.get("train", {})), dict(data.get("compare", {}))


def _merged(file_values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The run file's settings with the command line's on top; nested stage tables merge key by key."""
    merged = dict(file_values)
    for key, value in given.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def make_compare_command(pm: PluginManager) -> click.Command:
    def callback(config: str | None, out: str | None, overwrite: bool, as_json: bool, report: str, **values: Any) -> None:
        file_train, file_compare = read_run_file(config) if config else ({}, {})
        grid = CompareConfig.from_dict(_merged(file_compare, config_values(CompareConfig, values)))
        train_settings = {**file_train, **{k: v for k, v in values.items() if k in TRAIN_FIELDS and v is not None}}
        out = out or train_settings.pop("out", None)
        train_settings.pop("out", None)
        if not out:
            raise RouteSAEError('say where the comparison goes: --out DIR (or out = "DIR" in the run file\'s [train] table)')
        if train_settings.get("from_cache"):
            train_cfg = TrainConfig.for_cache(train_settings["from_cache"], **train_settings)
        else:
            train_cfg = TrainConfig.from_dict(train_settings)
        record = compare(out, grid, train_cfg, overwrite=overwrite, reporters=reporter_names(report))
        if as_json:
            print_json(record)
        print_written(f"{COMPARISON_FILE}, {FIGURES_DIR}/ and the grid's two runs", [out])

    train_options = {o.name: o for o in config_options(TrainConfig)}
    grid_options = config_options(CompareConfig)
    stages = ("evaluate", "contexts")  # CompareConfig's nested stage configs: their options are prefixed
    params: list[click.Parameter] = [
        *in_panel("The grid", [o for o in grid_options if not o.name.startswith(tuple(f"{s}_" for s in stages))]),
        *(option for stage in stages
          for option in in_panel(f"The {stage} stage", [o for o in grid_options if o.name.startswith(f"{stage}_")])),
        *(option for title, names in TRAIN_PANELS.items()
          for option in in_panel(f"Training: {title.lower()}", [train_options[n] for n in names])),
        *in_panel("Run directory", [
            click.Option(["--config"], type=click.Path(dir_okay=False),
                         help="TOML run file with a [train] and a [compare] table (experiments/routing-controls.toml)."),
            click.Option(["--out"], type=click.Path(file_okay=False), help="Comparison directory."),
            click.Option(["--overwrite"], is_flag=True, help="Start the comparison in --out over instead of continuing it."),
            report_option(pm),
            json_option("Print comparison.json's record on stdout at the end."),
        ]),
        *in_panel("Other training settings", [o for name, o in train_options.items()
                                              if not any(name in names for names in TRAIN_PANELS.values())]),
    ]
    return command(
        "compare",
        callback,
        params,
        "Test the routing claim under controls: from one activation cache, train RouteSAE with its router and with "
        "control routers, the MLSAE, and TopK at the top block and at every block the router favours, for each k and "
        "seed; evaluate them in one pass, extract contexts, and write comparison.json with figures. Re-running the "
        "same command continues where it stopped.",
        example=EXAMPLE,
    )
