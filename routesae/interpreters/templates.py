"""Prompt templates: the built-in files in :mod:`routesae.prompts` or a user's file, validated up front.

Templates use :class:`string.Template` (``$contexts``) rather than ``str.format`` because prompts
are full of braces and brackets that would otherwise need escaping. A template is checked before
any request: an unknown placeholder (a typo) or a missing required one is an error naming them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from routesae.contexts import render_context
from routesae.errors import ConfigError

Kind = Literal["explain", "detect"]

#: kind -> (required placeholders, optional placeholders)
PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "explain": (frozenset({"contexts"}), frozenset({"latent"})),
    "detect": (frozenset({"explanation", "contexts"}), frozenset({"count", "latent"})),
}
OPTION = {"explain": "--prompt-template", "detect": "--detection-template"}


@dataclass(frozen=True)
class PromptTemplate:
    kind: str
    name: str  # "builtin" or the file path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}

    def render(self, **values: Any) -> str:
        return string.Template(self.text).substitute({k: str(v) for k, v in values.items()})


def placeholders(text: str) -> set[str]:
    """The placeholder names in ``text``; a stray ``$`` is an error (``$$`` is a literal dollar)."""
    names: set[str] = set()
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            line = text.count("\n", 0, m.start()) + 1
            raise ConfigError(f"line {line}: a '$' that starts no placeholder; write '$$' for a literal dollar sign")
        name = m.group("named") or m.group("braced")
        if name:
            names.add(name)
    return names


def load_template(kind: Kind, path: str | Path | None = None) -> PromptTemplate:
    """The built-in template of ``kind``, or the file at ``path`` after checking its placeholders."""
    if path is None:
        text = importlib.resources.files("routesae.prompts").joinpath(f"{kind}.txt").read_text(encoding="utf-8")
        return PromptTemplate(kind, "builtin", text)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{OPTION[kind]} {file}: cannot read it ({e.strerror or e})") from None
    required, optional = PLACEHOLDERS[kind]
    try:
        names = placeholders(text)
    except ConfigError as e:
        raise ConfigError(f"{OPTION[kind]} {file}: {e}") from None
    problems = []
    if unknown := sorted(names - required - optional):
        problems.append(f"unknown placeholder(s) {', '.join('$' + n for n in unknown)}")
    if missing := sorted(required - names):
        problems.append(f"missing required placeholder(s) {', '.join('$' + n for n in missing)}")
    if problems:
        known = ", ".join("$" + n for n in sorted(required)) + " (required), " + ", ".join("$" + n for n in sorted(optional))
        raise ConfigError(f"{OPTION[kind]} {file}: {'; '.join(problems)}; the placeholders are {known}")
    return PromptTemplate(kind, str(file), text)


def _activation(value: float) -> str:
    """Enough digits to compare activations, no float noise (27.53125 -> 27.5, 0.8123 -> 0.81)."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def render_classes(latent: dict[str, Any]) -> str:
    """A latent's contexts grouped by token class, strongest class first, strongest context first."""
    classes = sorted(
        latent["classes"].items(), key=lambda item: (-max(c["activation"] for c in item[1]), item[0])
    )
    blocks = []
    for token_class, contexts in classes:
        ranked = sorted(contexts, key=lambda c: -c["activation"])
        lines = [f"Token {json.dumps(token_class, ensure_ascii=False)}:"]
        lines += [f"- activation {_activation(c['activation'])}: {_one_line(render_context(c))}" for c in ranked]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_numbered(contexts: list[dict[str, Any]]) -> str:
    """Excerpts for detection, numbered from 1, without markers (the model must find the feature)."""
    return "\n".join(f"{i}. {_one_line(render_context(c, open='', close=''))}" for i, c in enumerate(contexts, 1))
