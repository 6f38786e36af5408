"""Option builders shared by the commands: architecture and config fields become click options.

A config's fields become options with :func:`config_options` and come back as its settings with
:func:`config_values`; both name them the same way, so a command never lists a config's settings
by hand. A nested config (the pipeline's ``contexts``) prefixes its fields' options with its name
(``--contexts-threshold``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

import click

from routesae.config import Config, field_help, field_types
from routesae.errors import PluginError
from routesae.plugins import PluginManager


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def click_type(tp: Any) -> Any:
    if get_origin(tp) is Literal:
        return click.Choice([str(c) for c in get_args(tp)])
    if tp in (int, float, str):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        numbers = [m for m in get_args(tp) if m in (int, float)]
        literals = [m for m in get_args(tp) if get_origin(m) is Literal]
        if len(numbers) == 1 and len(numbers) + len(literals) == len(get_args(tp)):
            return NumberOrWord(numbers[0], [str(word) for m in literals for word in get_args(m)])
    raise PluginError(f"config fields of type {tp!r} cannot be set from the command line")


class NumberOrWord(click.ParamType):
    """A number, or one of a few words: ``--tokens 8192`` or ``--tokens all``."""

    def __init__(self, number: type, words: list[str]) -> None:
        self.number, self.words = number, words
        self.name = f"{number.__name__}|{'|'.join(words)}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.words:
            return value
        try:
            return self.number(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor one of {', '.join(self.words)}", param, ctx)


class CommaList(click.ParamType):
    """``32,64,128`` -> [32, 64, 128]: every architecture setting can be swept from the command line."""

    def __init__(self, item: Any) -> None:
        self.item = click.types.convert_type(item)
        self.name = f"{self.item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        return [self.item.convert(part.strip(), param, ctx) for part in str(value).split(",")]


def field_default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else None


def field_option(
    field: dataclasses.Field,
    tp: Any,
    extra_help: str = "",
    sweepable: bool = False,
    default_text: str | None = None,
    prefix: str = "",
) -> click.Option:
    """A click option for a config field; its default is None so we know what the user set.

    ``prefix`` namespaces it (``interpreter_`` turns ``model`` into ``--interpreter-model``) where a
    command takes the settings of two configs that share a field name. A field whose default is
    None says in its help what None means, so no ``[default: None]`` is shown.
    """
    name = prefix + field.name
    default = default_text or field_default(field)
    help_text = field_help(field) + extra_help + ("" if default is None else f" [default: {default}]")
    if tp is bool:
        flag = name.replace("_", "-")
        return click.Option([f"--{flag}/--no-{flag}", name], default=None, help=help_text)
    item_type = click_type(tp)
    return click.Option(
        [option_name(name), name], type=CommaList(item_type) if sweepable else item_type, default=None, help=help_text
    )


def cli_settable(tp: Any) -> bool:
    return tp in (bool, int, float, str) or get_origin(tp) is Literal


def _nested(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def config_options(config_cls: type[Config], prefix: str = "") -> list[click.Option]:
    """One option per field of ``config_cls``, in field order; a nested config's fields are prefixed with its name."""
    options = []
    for f, (tp, _) in zip(dataclasses.fields(config_cls), field_types(config_cls).values()):
        if _nested(tp):
            options += config_options(tp, f"{prefix}{f.name}_")
        else:
            options.append(field_option(f, tp, prefix=prefix))
    return options


def config_values(config_cls: type[Config], values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The settings given for ``config_cls``'s options (:func:`config_options`), taken out of a command's ``values``.

    Options left out (None) are not settings, so the config's defaults apply; a nested config's
    settings come back nested, ready for ``config_cls.from_dict``.
    """
    given: dict[str, Any] = {}
    for f, (tp, _) in zip(dataclasses.fields(config_cls), field_types(config_cls).values()):
        value = config_values(tp, values, f"{prefix}{f.name}_") if _nested(tp) else values.pop(prefix + f.name)
        if value is not None and value != {}:
            given[f.name] = value
    return given


def architecture_options(pm: PluginManager, reserved: Iterable[str]) -> list[click.Option]:
    """One (sweepable) option per settable config field across all installed architectures.

    A setting several architectures share takes its help text from the first that has it,
    built-ins before plugins.
    """
    owners: dict[str, set[str]] = {}
    first: dict[str, tuple[dataclasses.Field, Any]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    builtin_first = sorted(
        pm.names("architecture"), key=lambda n: (pm.provider("architecture", n).distribution != "routesae", n)
    )
    for arch_name in builtin_first:
        arch = pm.get("architecture", arch_name)
        for name in arch.setting_names():
            owners.setdefault(name, set()).add(arch_name)
        for f in dataclasses.fields(arch.Config):
            tp = field_types(arch.Config)[f.name][0]
            if not cli_settable(tp):
                continue  # e.g. a composite's nested settings, set through its parts' options
            if f.name in reserved:
                raise PluginError(
                    f"architecture {arch_name!r} has a setting {f.name!r} that clashes with a training option"
                )
            if f.name in first and first[f.name][1] != tp:
                raise PluginError(
                    f"architectures disagree on the type of setting {f.name!r} ({arch_name!r} and others)"
                )
            first.setdefault(f.name, (f, tp))
            defaults.setdefault(f.name, {})[arch_name] = field_default(f)
    everyone = set(pm.names("architecture"))

    def default_text(name: str) -> str:
        """One default, or each architecture's where they differ (``--l1``: vanilla 10, crosscoder 3)."""
        values = defaults[name]
        if len(set(map(repr, values.values()))) == 1:
            return str(next(iter(values.values())))
        return ", ".join(f"{arch} {value}" for arch, value in values.items())

    return [
        field_option(
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


def reporter_names(report: str) -> list[str]:
    return [name.strip() for name in report.split(",") if name.strip()]


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, allow_nan=False))


def print_written(what: str, where: list[Any]) -> None:
    """The line every writing command ends on (stderr): which file it wrote, and where."""
    places = ", ".join(map(str, where[:3])) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    click.echo(f"wrote {what} in {places}", err=True)


def device_option() -> click.Option:
    return click.Option(
        ["--device"], default=None, help="Device for the model and SAEs. [default: CUDA when available]"
    )


def json_option(help_text: str) -> click.Option:
    """``--json``: machine-readable output on stdout (tables and progress stay on stderr)."""
    return click.Option(["--json", "as_json"], is_flag=True, help=help_text)
