"""Option builders shared by the commands: architecture and config fields become click options.

A config's fields become options with :func:`config_options` and come back as its settings with
:func:`config_values`; both name them the same way, so a command never lists a config's settings
by hand. A nested config (the pipeline's ``contexts``) prefixes its fields' options with its name
(``--contexts-threshold``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

import click
from rich_click import RichCommand
from rich_click.rich_panel import RichOptionPanel

from routesae.config import Config, SettingInfo, field_types, list_item_type
from routesae.errors import PluginError
from routesae.plugins import PluginManager


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def click_type(tp: Any, sweepable: bool = False) -> Any:
    """The click type of a setting's value; a list-valued one of a sweepable setting needs its brackets."""
    if get_origin(tp) is Literal:
        return click.Choice([str(c) for c in get_args(tp)])
    if tp in (int, float, str):
        return tp
    item = list_item_type(tp)
    if item is not None:
        return ListValue(click.BOOL if item is bool else click_type(item), brackets=sweepable)
    if get_origin(tp) in (typing.Union, types.UnionType):
        if str in get_args(tp):  # a number or a word the config reads (a threshold rule): text, checked there
            return str
        numbers = [m for m in get_args(tp) if m in (int, float)]
        literals = [m for m in get_args(tp) if get_origin(m) is Literal]
        if len(numbers) == 1 and len(numbers) + len(literals) == len(get_args(tp)):
            return NumberOrWord(numbers[0], [str(word) for m in literals for word in get_args(m)])
    raise PluginError(f"config fields of type {tp!r} cannot be set from the command line")


class ListValue(click.ParamType):
    """``[64,256,1024]`` -> (64, 256, 1024): a list-valued setting, in brackets where its option sweeps (so that its
    commas are not a sweep's); a stage's list (``--seeds 0,1,2``) may leave them out."""

    def __init__(self, item: Any, brackets: bool = True) -> None:
        self.item = click.types.convert_type(item)
        self.brackets = brackets
        self.name = f"[{self.item.name},...]" if brackets else f"{self.item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if not self.brackets and not text.startswith("["):
            text = f"[{text}]"
        if not (text.startswith("[") and text.endswith("]")):
            self.fail(
                f"{text!r} is not a list: write it in brackets, [a,b,c] (quoted in zsh: '[a,b,c]'); "
                "lists separated by commas are a sweep, [a,b],[c]",
                param,
                ctx,
            )
        inner = text[1:-1].strip()
        return tuple(self.item.convert(part.strip(), param, ctx) for part in inner.split(",")) if inner else ()


def split_outside_brackets(text: str) -> list[str]:
    """``"[1,2],[3]"`` -> ``["[1,2]", "[3]"]``: the commas that separate a sweep's values, not those inside a list."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


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
    """``32,64,128`` -> [32, 64, 128]: every architecture setting can be swept from the command line.

    The values of a list-valued setting are lists in brackets: ``[64,256],[128,512]`` sweeps two lists.
    """

    def __init__(self, item: Any) -> None:
        self.item = click.types.convert_type(item)
        self.name = f"{self.item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        return [self.item.convert(part.strip(), param, ctx) for part in split_outside_brackets(str(value))]


def field_default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else None


def shown(value: Any) -> str:
    """A default as the command line writes it (a list as ``[a,b]``)."""
    return f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else str(value)


def field_option(
    field: dataclasses.Field,
    tp: Any,
    extra_help: str = "",
    sweepable: bool = False,
    default_text: str | None = None,
    prefix: str = "",
) -> click.Option:
    """A click option for a config field (see :func:`setting_option`)."""
    return setting_option(SettingInfo.of(field, tp), extra_help, sweepable, default_text, prefix)


def setting_option(
    setting: SettingInfo,
    extra_help: str = "",
    sweepable: bool = False,
    default_text: str | None = None,
    prefix: str = "",
) -> click.Option:
    """A click option for a setting; its default is None so we know what the user set.

    ``prefix`` namespaces it (``interpreter_`` turns ``model`` into ``--interpreter-model``) where a
    command takes the settings of two configs that share a field name. A setting whose default is
    None says in its help what None means, so no ``[default: None]`` is shown.
    """
    name = prefix + setting.name
    default = default_text or (None if setting.default is None else shown(setting.default))
    help_text = setting.help + extra_help + ("" if default is None else f" [default: {default}]")
    if setting.type is bool:
        flag = name.replace("_", "-")
        return click.Option([f"--{flag}/--no-{flag}", name], default=None, help=help_text)
    item_type = click_type(setting.type, sweepable)
    return click.Option(
        [option_name(name), name], type=CommaList(item_type) if sweepable else item_type, default=None, help=help_text
    )


def cli_settable(tp: Any) -> bool:
    return tp in (bool, int, float, str) or get_origin(tp) is Literal or list_item_type(tp) is not None


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
    """One (sweepable) option per command-line setting across all installed architectures (:meth:`SAE.settings`).

    A setting several architectures share is one option: its help gives each architecture's own text
    where they differ, its default each one's value where those differ, and a run gives it to the
    architectures that take it (:func:`routesae.specs.expand_specs`). A plugin setting that clashes
    with a training option or with another architecture's type is left off the command line, with a
    warning (the run file can still set it), so that one plugin cannot disable the CLI.
    """
    owners: dict[str, list[str]] = {}
    entries: dict[str, list[tuple[str, SettingInfo]]] = {}
    types: dict[str, Any] = {}
    builtin_first = sorted(
        pm.names("architecture"), key=lambda n: (pm.provider("architecture", n).distribution != "routesae", n)
    )
    for arch_name in builtin_first:
        arch = pm.get("architecture", arch_name)
        for name in sorted(arch.setting_names()):
            owners.setdefault(name, []).append(arch_name)
        for setting in arch.settings():
            if not cli_settable(setting.type):
                continue  # e.g. a composite's nested settings, set through its parts' options
            if setting.name in reserved:
                _skip(pm, arch_name, setting.name, "clashes with a training option")
            elif types.setdefault(setting.name, setting.type) != setting.type:
                _skip(pm, arch_name, setting.name, f"has another type than other architectures' ({types[setting.name]})")
            else:
                entries.setdefault(setting.name, []).append((arch_name, setting))
    everyone = set(pm.names("architecture"))
    options = []
    for name, taken in sorted(entries.items()):
        first = taken[0][1]
        merged = dataclasses.replace(first, help=shared_help(taken, owners[name], everyone))
        option = setting_option(merged, sweepable=True, default_text=shared_default(taken))
        only = owners[name][0] if len(owners[name]) == 1 else None
        options += in_panel(f"{only} settings" if only else "SAE settings (several architectures)", [option])
    shared = [o for o in options if o.panel.startswith("SAE settings")]  # type: ignore[attr-defined]
    return shared + sorted((o for o in options if o not in shared), key=lambda o: o.panel)  # type: ignore[attr-defined]


def _skip(pm: PluginManager, arch_name: str, setting: str, why: str) -> None:
    provider = pm.provider("architecture", arch_name).describe()
    print(
        f"routesae: warning: the setting {setting!r} of architecture {arch_name!r} ({provider}) {why}; it is not "
        "offered on the command line (a run file can set it)",
        file=sys.stderr,
    )


def shared_help(taken: list[tuple[str, SettingInfo]], owners: list[str], everyone: set[str]) -> str:
    """One text if the architectures agree (``(a, b only)`` when not all take it), else each one's:
    ``topk: Latents kept per token; batchtopk: Mean latents per token.``"""
    by_text: dict[str, list[str]] = {}
    for arch, setting in taken:
        archs = by_text.setdefault(setting.help, [])
        if arch not in archs:
            archs.append(arch)
    if len(by_text) == 1:
        (text,) = by_text
        return text if set(owners) == everyone else f"{text} ({', '.join(sorted(owners))} only)"
    texts = "; ".join(f"{', '.join(archs)}: {text.rstrip('.')}" for text, archs in by_text.items()) + "."
    through = sorted(set(owners) - {arch for arch, _ in taken})
    return texts + (f" Also {', '.join(through)}, for a part." if through else "")


def shared_default(taken: list[tuple[str, SettingInfo]]) -> str | None:
    """One default, or each architecture's where they differ (``--l1``: vanilla 10, crosscoder 3); None if all are None
    (the help says what None means)."""
    if all(setting.default is None for _, setting in taken):
        return None
    values = {arch: shown(setting.default) for arch, setting in taken}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{arch} {value}" for arch, value in values.items())


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


def in_panel(title: str, params: Iterable[click.Parameter]) -> list[click.Parameter]:
    """``params``, shown under ``title`` in their command's help (see :func:`command`)."""
    params = list(params)
    for param in params:
        param.panel = title  # type: ignore[attr-defined]  # read by command() only
    return params


def command(name: str, callback: Any, params: list[click.Parameter], help_text: str,
            example: str | None = None) -> click.Command:
    """A command whose help starts with a usage ``example`` and groups its options into panels (rich-click): each
    option set :func:`in_panel` appears under its panel, in the order the panels first occur; the rest under Options."""
    panels: dict[str, list[str]] = {}
    for param in params:
        if title := getattr(param, "panel", None):
            panels.setdefault(title, []).append(param.name)
    text = help_text + (f"\n\n\b\nExample:\n  {example}" if example else "")
    return RichCommand(name, callback=callback, params=params, help=text,
                       panels=[RichOptionPanel(title, options=names) for title, names in panels.items()])
