"""Config dataclasses that round-trip through JSON and validate themselves.

Every field carries a one-line ``help`` (via :func:`setting`) that is also the CLI help, so a
setting is documented exactly once. Unknown keys are rejected rather than dropped, because a
silently ignored typo in a saved config is a wrong experiment.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from routesae.errors import ConfigError

C = TypeVar("C", bound="Config")


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text.

    A list-valued setting is annotated ``tuple[X, ...]`` (``X`` one of int, float, str, bool) with a
    tuple default: JSON and TOML give it as an array, the command line as ``[a,b,c]``.
    """
    return field(default=default, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


SCALARS = (bool, int, float, str)


def list_item_type(tp: Any) -> Any | None:
    """``X`` for a list-valued setting's annotation ``tuple[X, ...]``, else None."""
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and (args[0] in SCALARS or get_origin(args[0]) is Literal):
            return args[0]
    return None


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the command line and the docs show it: name, type (``int | None`` as int), default, help."""

    name: str
    type: Any
    default: Any
    help: str

    @classmethod
    def of(cls, f: dataclasses.Field, tp: Any, name: str | None = None, help: str | None = None) -> SettingInfo:
        """The setting of a config field, optionally renamed or with other help (a composite's view of a part's field)."""
        default = f.default if f.default is not dataclasses.MISSING else None
        return cls(name or f.name, tp, default, field_help(f) if help is None else help)


def config_settings(config_cls: type, prefix: str = "", lead: str = "") -> list[SettingInfo]:
    """Every field of ``config_cls`` as a :class:`SettingInfo`, named ``prefix + field`` with ``lead`` before its help."""
    types_ = field_types(config_cls)
    return [
        SettingInfo.of(f, types_[f.name][0], prefix + f.name, lead + field_help(f)) for f in dataclasses.fields(config_cls)
    ]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); anything else -> (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """Resolved annotation of each field as (base type, accepts None)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _strip_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def _check_value(owner: str, name: str, value: Any, tp: Any, optional: bool) -> Any:
    """Validate (and gently coerce int->float) one value against its annotation."""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{owner}: {name} must be set")
    if get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | Literal["all"]: any member's value
        errors = []
        for member in get_args(tp):
            try:
                return _check_value(owner, name, value, member, optional)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{owner}: {' or '.join(errors)}")
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{owner}: {name}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{owner}: {name} must be {tp.__name__}, got {value!r}")
    item = list_item_type(tp)
    if item is not None:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{owner}: {name} must be a list, got {value!r}")
        return tuple(_check_value(owner, f"{name}[{i}]", v, item, False) for i, v in enumerate(value))
    if get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass
class Config:
    """Base for every config: type checks, Literal checks, strict JSON round-trip."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, (tp, optional) in field_types(type(self)).items():
            value = getattr(self, name)
            if isinstance(tp, type) and issubclass(tp, Config) and not isinstance(value, tp):  # a nested stage's settings
                if not isinstance(value, dict):
                    raise ConfigError(f"{owner}: {name} must be a {tp.__name__} or a dict, got {value!r}")
                value = tp.from_dict(value)  # given as JSON or a TOML table
            setattr(self, name, _check_value(owner, name, value, tp, optional))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values; a nested config's as a nested dict (``{"contexts": {"threshold": 4.0}}``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except TypeError as e:  # missing required field
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value
