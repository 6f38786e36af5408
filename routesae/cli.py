"""The ``routesae`` command line: a thin layer over the Python API.

Commands are built after the plugins are loaded, so ``--arch`` and the architecture options
(``--k``, ``--layer``, ...) come from whatever architectures are installed: each config field
of each registered architecture becomes an option, with the field's help text.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args, get_origin

import click
from rich.console import Console
from rich.table import Table

from routesae.config import Config, field_help, field_types
from routesae.errors import PluginError, RouteSAEError
from routesae.plugins import PluginManager, get_plugin_manager


class RouteSAEGroup(click.Group):
    """Turns :class:`RouteSAEError` into a short message and exit code 2 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RouteSAEError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _click_type(tp: Any) -> Any:
    if get_origin(tp) is Literal:
        return click.Choice([str(c) for c in get_args(tp)])
    if tp in (int, float, str):
        return tp
    raise PluginError(f"config fields of type {tp!r} cannot be set from the command line")


class CommaList(click.ParamType):
    """``32,64,128`` -> [32, 64, 128]: every architecture setting can be swept from the command line."""

    def __init__(self, item: Any) -> None:
        self.item = click.types.convert_type(item)
        self.name = f"{self.item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        return [self.item.convert(part.strip(), param, ctx) for part in str(value).split(",")]


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else None


def _field_option(
    field: dataclasses.Field, tp: Any, extra_help: str = "", sweepable: bool = False, default_text: str | None = None
) -> click.Option:
    """A click option for a config field; its default is None so we know what the user set."""
    help_text = f"{field_help(field)}{extra_help} [default: {default_text or _default(field)}]"
    if tp is bool:
        flag = field.name.replace("_", "-")
        return click.Option([f"--{flag}/--no-{flag}", field.name], default=None, help=help_text)
    click_type = _click_type(tp)
    return click.Option(
        [_option_name(field.name), field.name], type=CommaList(click_type) if sweepable else click_type, default=None, help=help_text
    )


def _cli_settable(tp: Any) -> bool:
    return tp in (bool, int, float, str) or get_origin(tp) is Literal


def config_options(config_cls: type[Config]) -> list[click.Option]:
    types = field_types(config_cls)
    return [_field_option(f, types[f.name][0]) for f in dataclasses.fields(config_cls)]


def architecture_options(pm: PluginManager, reserved: Iterable[str]) -> list[click.Option]:
    """One (sweepable) option per settable config field across all installed architectures.

    A setting several architectures share takes its help text from the first that has it,
    built-ins before plugins.
    """
    owners: dict[str, set[str]] = {}
    first: dict[str, tuple[dataclasses.Field, Any]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    builtin_first = sorted(pm.names("architecture"), key=lambda n: (pm.provider("architecture", n).distribution != "routesae", n))
    for arch_name in builtin_first:
        arch = pm.get("architecture", arch_name)
        for name in arch.setting_names():
            owners.setdefault(name, set()).add(arch_name)
        for f in dataclasses.fields(arch.Config):
            tp = field_types(arch.Config)[f.name][0]
            if not _cli_settable(tp):
                continue  # e.g. a composite's nested settings, set through its parts' options
            if f.name in reserved:
                raise PluginError(f"architecture {arch_name!r} has a setting {f.name!r} that clashes with a training option")
            if f.name in first and first[f.name][1] != tp:
                raise PluginError(f"architectures disagree on the type of setting {f.name!r} ({arch_name!r} and others)")
            first.setdefault(f.name, (f, tp))
            defaults.setdefault(f.name, {})[arch_name] = _default(f)
    everyone = set(pm.names("architecture"))

    def default_text(name: str) -> str:
        """One default, or each architecture's where they differ (``--l1``: vanilla 10, crosscoder 3)."""
        values = defaults[name]
        if len(set(map(repr, values.values()))) == 1:
            return str(next(iter(values.values())))
        return ", ".join(f"{arch} {value}" for arch, value in values.items())

    return [
        _field_option(
            f,
            tp,
            "" if owners[name] == everyone else f" ({', '.join(sorted(owners[name]))} only)",
            sweepable=True,
            default_text=default_text(name),
        )
        for name, (f, tp) in sorted(first.items())
    ]


def report_option(pm: PluginManager) -> click.Option:
    return click.Option(
        ["--report"],
        default="console",
        show_default=True,
        help=f"Comma-separated reporters (the run's metrics.jsonl is always written). Installed: {', '.join(pm.names('reporter'))}.",
    )


def _reporter_names(report: str) -> list[str]:
    return [name.strip() for name in report.split(",") if name.strip()]


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def make_train_command(pm: PluginManager) -> click.Command:
    from routesae.specs import expand_specs, load_run_file
    from routesae.train import TrainConfig, train

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def callback(
        arch: tuple[str, ...], config: str | None, out: str | None, overwrite: bool, resume: bool, as_json: bool, report: str, **values: Any
    ) -> None:
        if overwrite and resume:
            raise RouteSAEError("--overwrite and --resume contradict each other; pick one")
        given = {k: v for k, v in values.items() if v is not None}
        arch_settings = {k: v for k, v in given.items() if k not in train_fields}
        train_settings = {k: v for k, v in given.items() if k in train_fields}
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
            raise RouteSAEError("say where the run goes: --out DIR (or out = \"DIR\" in the run file's [train] table)")
        if train_settings.get("from_cache"):  # model and data come from the cache unless given (and then checked)
            from routesae.cache import ActivationCache

            cfg = ActivationCache(train_settings["from_cache"]).train_config(**train_settings)
        else:
            cfg = TrainConfig.from_dict(train_settings)
        summary = train(specs, out, cfg, overwrite=overwrite, resume=resume, reporters=_reporter_names(report))
        if as_json:
            _print_json(summary)

    params: list[click.Parameter] = [
        click.Option(
            ["--arch", "arch"],
            multiple=True,
            help=f"Architecture(s) to train from one harvest; repeat for several (default: topk). "
            f"Installed: {', '.join(pm.names('architecture'))}.",
        ),
        click.Option(
            ["--config"], type=click.Path(dir_okay=False), help="TOML run file: a [train] table and one [sae.NAME] table per SAE."
        ),
        click.Option(["--out"], type=click.Path(file_okay=False), help="Run directory (one sub-directory per SAE)."),
        click.Option(["--overwrite"], is_flag=True, help="Replace the checkpoints of a run already in --out."),
        click.Option(["--resume"], is_flag=True, help="Continue the unfinished run in --out from its last checkpoint."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print a machine-readable summary on stdout at the end."),
        report_option(pm),
        *config_options(TrainConfig),
        *architecture_options(pm, reserved=train_fields),
    ]
    return click.Command(
        "train",
        callback=callback,
        params=params,
        help="Train one or more SAEs on one model's residual stream, all from one activation harvest. "
        "Comma-separated architecture settings (--k 32,64,128) train one SAE per value.",
    )


def make_evaluate_command(pm: PluginManager) -> click.Command:
    from routesae.evaluate import evaluate

    def callback(
        paths: tuple[str, ...], metric: tuple[str, ...], tokens: int | None, batch_size: int, reference_metrics: bool,
        infer_k: int | None, theta: float | None, device: str | None, as_json: bool, report: str,
    ) -> None:
        results = evaluate(
            list(paths), list(metric) or None, tokens=tokens, batch_size=batch_size, reference_metrics=reference_metrics,
            infer_k=infer_k, theta=theta, device=device, reporters=_reporter_names(report),
        )
        if as_json:
            _print_json(results)

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--metric"], multiple=True, help=f"Metric to compute; repeat for several (default: all). Installed: {', '.join(pm.names('metric'))}."
        ),
        click.Option(["--tokens"], type=int, default=None, help="Eval tokens (counted positions) to use. [default: the whole eval split]"),
        click.Option(["--batch-size"], type=int, default=8, show_default=True, help="Sequences per language-model batch."),
        click.Option(
            ["--reference-metrics"], is_flag=True,
            help="The reference's conventions: every position (BOS, padding) replaced and counted, KL summed over positions "
            "and divided by sequences, CE over all B*(T-1) positions.",
        ),
        click.Option(
            ["--infer-k"], type=int, default=None,
            help="Read every SAE with TopK over its pre-activations (signed values, as the reference) instead of its "
            "trained activation; at most the latent size. Not for gated SAEs. Excludes --theta.",
        ),
        click.Option(
            ["--theta"], type=float, default=None,
            help="Read every SAE with one global threshold, z = a * (a > theta), instead of its trained activation. "
            "Not for gated SAEs. Excludes --infer-k.",
        ),
        click.Option(["--device"], default=None, help="Device for the model and SAEs. [default: CUDA when available]"),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the results as JSON on stdout (the table goes to stderr)."),
        report_option(pm),
    ]
    return click.Command(
        "evaluate",
        callback=callback,
        params=params,
        help="Evaluate SAE or run directories on the eval split by splicing reconstructions into the model; "
        "writes eval.json next to each checkpoint.",
    )


def make_contexts_command(pm: PluginManager) -> click.Command:
    from routesae.contexts import extract_contexts

    def callback(paths: tuple[str, ...], as_json: bool, **options: Any) -> None:
        results = extract_contexts(list(paths), **options)
        if as_json:
            keys = ("sae", "hits", "interpretable_latents", "latent_size", "settings")
            _print_json({d: {"file": f"{d}/contexts.json", **{k: r[k] for k in keys}} for d, r in results.items()})

    def option(name: str, type_: Any, default: Any, help_: str) -> click.Option:
        return click.Option([name], type=type_, default=default, show_default=default is not None, help=help_)

    params: list[click.Parameter] = [
        click.Argument(["paths"], nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)),
        option("--threshold", float, 15.0, "A latent activates at a token when z > threshold. 15 suits d_model 2048 "
               "(the reference); activations scale with sqrt(d_model): 3-4 suits the SmolLM2 demo SAEs."),
        option("--window", int, 64, "Most tokens per context (a sentence around the token, cropped around it)."),
        option("--top-per-class", int, 2, "Contexts kept per (latent, activating-token class), highest first."),
        option("--max-classes", int, 32, "Drop latents that fire on more token classes than this (0: keep all)."),
        option("--min-contexts", int, 5, "Keep latents with at least this many shown contexts."),
        option("--held-out", int, 5, "Random extra contexts per latent (and non-activating windows) for detection."),
        option("--pool", int, 100, "Random windows of the split, the negatives for detection."),
        option("--tokens", int, None, "Apply-split tokens to read. [default: the whole apply split]"),
        option("--batch-size", int, 8, "Sequences per language-model batch."),
        option("--infer-k", int, None, "Read every SAE with TopK over its pre-activations instead of its trained activation. Excludes --theta."),
        option("--theta", float, None, "Read every SAE with one global threshold, z = a * (a > theta). Excludes --infer-k."),
        option("--seed", int, 0, "Seed of the held-out sample and the pool."),
        option("--device", str, None, "Device for the model and SAEs. [default: CUDA when available]"),
        click.Option(["--json", "as_json"], is_flag=True, help="Print a summary per SAE as JSON on stdout."),
    ]
    return click.Command(
        "contexts",
        callback=callback,
        params=params,
        help="Find each latent's top-activating contexts on the apply split (one pass for several SAEs of one model); "
        "writes contexts.json next to each checkpoint.",
    )


def make_cache_command(pm: PluginManager) -> click.Command:
    from routesae.architectures.base import parse_layer_range
    from routesae.cache import ActivationCache, CacheConfig, cache_activations
    from routesae.specs import expand_specs

    cache_fields = {f.name for f in dataclasses.fields(CacheConfig)}

    def callback(
        out: str, arch: tuple[str, ...], layer: tuple[list[int], ...], layers: tuple[str, ...], resume: bool, overwrite: bool,
        as_json: bool, **values: Any,
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
            options = ", ".join(_option_name(k) for k in arch_settings)
            raise RouteSAEError(f"{options} configure an architecture: add --arch, or name the blocks with --layer/--layers")
        else:
            ranges = [parse_layer_range(text) for text in layers]
            blocks = singles + [b for first, last in ranges for b in range(first, last + 1)]
        path = cache_activations(out, cfg, blocks, saes=specs, resume=resume, overwrite=overwrite)
        if as_json:
            _print_json(ActivationCache(path).summary())

    arch_options = [o for o in architecture_options(pm, reserved=cache_fields) if o.name not in ("layer", "layers")]
    params: list[click.Parameter] = [
        click.Option(["--out"], type=click.Path(file_okay=False), required=True, help="Cache directory (shards and manifest.json)."),
        click.Option(["--layers"], multiple=True, help="Blocks A:B (inclusive) to cache; repeatable. With --arch, that setting of it."),
        click.Option(
            ["--layer"], type=CommaList(int), multiple=True,
            help="A block to cache (0-based); repeatable or comma-separated. With --arch, that setting of it.",
        ),
        click.Option(
            ["--arch", "arch"], multiple=True,
            help="Cache the blocks these SAEs (with the architecture options given) would read; repeatable. "
            f"Installed: {', '.join(pm.names('architecture'))}.",
        ),
        click.Option(["--overwrite"], is_flag=True, help="Replace a cache of other settings in --out."),
        click.Option(["--resume"], is_flag=True, help="Continue the unfinished cache in --out (also done without this flag)."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the cache's summary (size, tokens/s) on stdout at the end."),
        *config_options(CacheConfig),
        *arch_options,
    ]
    return click.Command(
        "cache",
        callback=callback,
        params=params,
        help="Harvest residual-stream activations once into sharded safetensors, for `routesae train --from-cache`. "
        "Prints the size first and refuses when the disk cannot hold it; a killed run continues where it stopped.",
    )


def make_steer_command(pm: PluginManager) -> click.Command:
    from routesae.steering import POSITIONS, steer

    def callback(sae_dir: str, clamp: tuple[str, ...], as_json: bool, **options: Any) -> None:
        result = steer(sae_dir, options.pop("prompt"), list(clamp), **options)
        if as_json:
            _print_json(result.to_dict())
            return
        table = Table(title=f"{result.settings['sae']}  clamps {' '.join(result.settings['clamps']) or '(none)'}", expand=True)
        table.add_column("original", ratio=1, overflow="fold")
        table.add_column("steered", ratio=1, overflow="fold")
        table.add_row(result.original, result.steered)
        Console(width=160 if not sys.stdout.isatty() else None).print(table)

    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(
            ["--clamp"], multiple=True, metavar="LATENT=OP",
            help="Clamp a latent at every steered token; repeatable. 123=20 sets it to 20, 123=+15 adds 15, "
            "123=-15 subtracts 15, 123=*2 multiplies it by 2.",
        ),
        click.Option(["--prompt"], required=True, help="Text to continue (wrapped as a user message for instruct models)."),
        click.Option(["--max-new-tokens"], type=int, default=64, show_default=True, help="Most tokens to generate (stops at EOS)."),
        click.Option(["--temperature"], type=float, default=0.7, show_default=True, help="Sampling temperature; 0 is greedy."),
        click.Option(["--top-p"], type=float, default=1.0, show_default=True, help="Nucleus sampling: keep the smallest set of tokens with this probability."),
        click.Option(["--seed"], type=int, default=0, show_default=True, help="Seed of both continuations (the same stream for each)."),
        click.Option(
            ["--chat/--no-chat"], default=None,
            help="Wrap the prompt in the tokenizer's chat template. [default: when the tokenizer has one]",
        ),
        click.Option(["--system"], default=None, help="A system message for the chat template."),
        click.Option(
            ["--replace"], is_flag=True,
            help="Put the clamped reconstruction itself in the residual stream (the reference), adding the SAE's error; "
            "by default only the clamp's change is added.",
        ),
        click.Option(
            ["--positions"], type=click.Choice(POSITIONS), default="all", show_default=True,
            help="'all': every token but position 0 (the attention sink), prompt included; 'generation': only the "
            "positions that pick new tokens.",
        ),
        click.Option(
            ["--soft-at-argmax"], is_flag=True,
            help="Steer a soft-routed RouteSAE at each token's highest-weight block, as evaluation splices it.",
        ),
        click.Option(["--infer-k"], type=int, default=None, help="Read the SAE with TopK over its pre-activations. Excludes --theta."),
        click.Option(["--theta"], type=float, default=None, help="Read the SAE with one global threshold. Excludes --infer-k."),
        click.Option(["--device"], default=None, help="Device for the model and SAE. [default: CUDA when available]"),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the record (texts, token ids, settings) as JSON."),
    ]
    return click.Command(
        "steer",
        callback=callback,
        params=params,
        help="Continue a prompt twice from one seed, without and with latents clamped at every generated token, "
        "and show both continuations side by side.",
    )


def interpreter_options(pm: PluginManager, reserved: Iterable[str]) -> list[click.Option]:
    """One option per settable config field across the installed interpreters.

    A setting several backends share (``--model``) gets one option whose help gives each one's meaning.
    """
    fields: dict[str, dict[str, dataclasses.Field]] = {}
    types: dict[str, Any] = {}
    for name in pm.names("interpreter"):
        config_cls = getattr(pm.get("interpreter", name), "Config", None)
        if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
            continue
        for f, (tp, _) in zip(dataclasses.fields(config_cls), field_types(config_cls).values()):
            if f.name in reserved:
                raise PluginError(f"interpreter {name!r} has a setting {f.name!r} that clashes with an interpret option")
            if _cli_settable(tp) and types.setdefault(f.name, tp) == tp:
                fields.setdefault(f.name, {})[name] = f
    options = []
    for setting_name, owners in sorted(fields.items()):
        first = next(iter(owners.values()))
        if len(owners) == 1:
            owner = next(iter(owners))
            options.append(_field_option(first, types[setting_name], f" ({owner} only)"))
            continue
        joined = "; ".join(f"{owner}: {field_help(f).rstrip('.')}" for owner, f in owners.items()) + "."
        shared = dataclasses.field(default=None, metadata={"help": joined})
        shared.name = setting_name
        defaults = ", ".join(f"{owner} {_default(f)}" for owner, f in owners.items())
        options.append(_field_option(shared, types[setting_name], default_text=defaults))
    return options


def make_interpret_command(pm: PluginManager) -> click.Command:
    from pathlib import Path

    from routesae.interpret import INTERPRETATIONS_FILE, BudgetReached, interpret

    reserved = {"sae_dir", "interpreter", "sample", "seed", "prompt_template", "detection_template", "max_cost",
                "concurrency", "detection", "overwrite", "retry_unparsable", "max_tokens", "temperature", "as_json"}

    def callback(sae_dir: str, interpreter: str, as_json: bool, **values: Any) -> None:
        protocol = {k: values.pop(k) for k in reserved & set(values)}
        options = {k: v for k, v in values.items() if v is not None}
        config_cls = getattr(pm.get("interpreter", interpreter), "Config", None)
        known = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set()
        if foreign := sorted(set(options) - known):
            raise RouteSAEError(
                f"{', '.join(map(_option_name, foreign))}: not an option of the {interpreter} interpreter "
                f"(its options: {', '.join(map(_option_name, sorted(known))) or 'none'})"
            )
        console = Console(stderr=True)
        try:
            doc = interpret(sae_dir, interpreter, **protocol, **options)
        except BudgetReached as e:
            console.print(f"[bold]{e}", highlight=False)
            sys.exit(3)
        _print_interpretation(console, doc)
        if as_json:
            _print_json({"path": str(Path(sae_dir) / INTERPRETATIONS_FILE), "summary": doc["summary"], "usage": doc["usage"]})

    params: list[click.Parameter] = [
        click.Argument(["sae_dir"], type=click.Path(exists=True, file_okay=False)),
        click.Option(["--interpreter"], default="local", show_default=True,
                     help=f"Interpreter backend. Installed: {', '.join(pm.names('interpreter'))}."),
        click.Option(["--sample"], type=int, default=100, show_default=True, help="Latents to interpret (a seeded sample of the kept ones; all if fewer)."),
        click.Option(["--seed"], type=int, default=42, show_default=True, help="Seed of the latent sample and of the detection shuffles."),
        click.Option(["--prompt-template"], type=click.Path(dir_okay=False), default=None,
                     help="Explanation prompt file ($contexts required, $latent optional) instead of the built-in one."),
        click.Option(["--detection-template"], type=click.Path(dir_okay=False), default=None,
                     help="Detection prompt file ($explanation, $contexts required; $count, $latent optional)."),
        click.Option(["--max-cost"], type=float, default=None,
                     help="USD this command may spend; no request that could exceed it is started (needs known prices)."),
        click.Option(["--concurrency"], type=int, default=None, help="Requests at once. [default: the interpreter's]"),
        click.Option(["--detection/--no-detection"], default=True, show_default=True,
                     help="Also score each explanation by asking which held-out and pool contexts activate the feature."),
        click.Option(["--max-tokens"], type=int, default=128, show_default=True, help="Longest answer, in tokens."),
        click.Option(["--temperature"], type=float, default=0.1, show_default=True, help="Sampling temperature of the answers."),
        click.Option(["--retry-unparsable"], is_flag=True, help="Ask again where an earlier answer (explanation or detection) could not be read."),
        click.Option(["--overwrite"], is_flag=True, help="Discard an existing interpretations.json instead of continuing it."),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the summary and usage as JSON on stdout."),
        *interpreter_options(pm, reserved),
    ]
    return click.Command(
        "interpret",
        callback=callback,
        params=params,
        help="Explain and score a sample of an SAE's latents from its contexts.json with an interpreter backend; "
        "writes interpretations.json after every latent and continues an interrupted run. The OpenAI key is read from "
        "OPENAI_API_KEY only. Exit code 3: --max-cost reached (re-run to continue).",
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
    console.print(f"unparsable {s['unparsable']} · errors {s['errors']} · detection accuracy {accuracy} "
                  f"({s['detection_scored']} features) · {usage['requests']} requests, {cost}", highlight=False)


def make_report_command(pm: PluginManager) -> click.Command:
    from routesae.report import DEFAULT_MAX_CARDS, write_report

    def callback(path: str, out: str | None, max_cards: int) -> None:
        click.echo(f"report written to {write_report(path, out, max_cards=max_cards)}")

    params: list[click.Parameter] = [
        click.Argument(["path"], type=click.Path(exists=True, file_okay=False)),
        click.Option(["--out"], type=click.Path(dir_okay=False), default=None, help="HTML file to write. [default: PATH/report.html]"),
        click.Option(
            ["--max-cards"], type=click.IntRange(min=0), default=DEFAULT_MAX_CARDS, show_default=True,
            help="Cards per SAE for latents that have contexts but no interpretation (interpreted ones are always shown).",
        ),
    ]
    return click.Command(
        "report",
        callback=callback,
        params=params,
        help="Write a self-contained HTML report of a run or SAE directory: metrics, routing histogram, contexts and "
        "interpretations of each SAE.",
    )


def make_plugins_command(pm: PluginManager) -> click.Command:
    def callback(as_json: bool) -> None:
        infos = pm.plugin_infos()
        if as_json:
            _print_json([i.to_dict() for i in infos])
            return
        table = Table(title="routesae plugins")
        for column in ("plugin", "distribution", "version", "registered", "status"):
            table.add_column(column)
        for i in infos:
            registered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in i.registered.items())
            table.add_row(i.name, i.distribution, i.version, registered or "-", f"[red]{i.error}" if i.error else "ok")
        Console(width=200 if not sys.stdout.isatty() else None).print(table)

    return click.Command(
        "plugins",
        callback=callback,
        params=[click.Option(["--json", "as_json"], is_flag=True, help="Machine-readable output.")],
        help="List installed plugins, what each registered, and load errors.",
    )


def _quiet_dependencies() -> None:
    """routesae draws its own progress; the per-file bars of transformers and datasets are noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def make_cli(pm: PluginManager | None = None) -> click.Group:
    """Build the CLI for the given (default: the process-wide) plugin manager."""
    pm = pm or get_plugin_manager()
    _quiet_dependencies()
    cli = RouteSAEGroup(help="routesae: train, evaluate and interpret sparse autoencoders on language models.")
    cli = click.version_option(package_name="routesae")(cli)
    builders: list[Callable[[PluginManager], click.Command]] = [
        make_train_command, make_evaluate_command, make_plugins_command, make_contexts_command, make_cache_command,
        make_steer_command, make_interpret_command, make_report_command,
    ]
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
