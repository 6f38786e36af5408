"""Reading the interpreter's free-text answers.

Models decorate answers (``**Feature category:** Low-Level``, bullets, headings), reorder the
fields, write ``Score: 4/5``, add a preamble or a closing remark, or echo the answer template
before filling it in. The reference's single strict regex failed on all of these and silently
dropped the feature (docs/reference.md §8, §12.18); here a field is recognised wherever it starts a line or a
``|``/``;``-separated segment, an echoed template line (several categories, ``[5/4/3/2/1]``) is
skipped, a field given twice counts as its last readable value, and anything still unreadable is reported as such by the caller, never guessed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CATEGORIES = ("low-level", "high-level", "undiscernible")

_DECORATION = re.compile(r"\*\*|__|`|^\s*#+\s*|^\s*>\s*|^\s*(?:[-*•+]|\d+[.)])\s+", re.MULTILINE)
_LABEL_START = re.compile(
    r"(?i)\b(?:(?:feature\s+)?category|(?:monosemanticity\s+|interpretability\s+)?score|explanation|activating)\s*(?:\([^)\n]*\))?\s*[:=]"
)
_LABEL = re.compile(
    r"(?is)^\s*(?:(?:feature|monosemanticity|interpretability|activation\s+consistency)\s+)?"
    r"(category|score|explanation|activating)\b\s*(?:\([^)\n]*\))?\s*[:=\-–—]?\s*(.*)$"
)
_CATEGORY_WORDS = {
    "low-level": re.compile(r"(?i)\blow[\s_-]*level\b"),
    "high-level": re.compile(r"(?i)\bhigh[\s_-]*level\b"),
    "undiscernible": re.compile(r"(?i)\b(?:un|in)[\s-]?discern[ai]ble\b"),
}
_SCORE = re.compile(r"(?i)^[\[(<]?\s*([1-5])(?:\.0+)?\s*(?:(?:/|out\s+of)\s*5)?\s*[\])>]?(?!\d|\.\d|\s*/)")
_NUMBER = re.compile(r"\b\d+\b")
_ONLY_NUMBERS = re.compile(r"(?i)^[\s\d,;.&/]*(?:(?:and|or)[\s\d,;.&/]*)*$")


@dataclass(frozen=True)
class Explanation:
    category: str
    score: int
    explanation: str


def _segments(answer: str) -> list[tuple[str | None, str]]:
    """The answer as (label or None, text) pieces, in order, decoration removed."""
    pieces: list[tuple[str | None, str]] = []
    for line in _DECORATION.sub("", answer).splitlines():
        for part in re.split(r"\s*[|;]\s*(?=\w)", line):
            starts = [m.start() for m in _LABEL_START.finditer(part)] or [0]
            bounds = [0, *[s for s in starts if s > 0], len(part)]
            for a, b in itertools.pairwise(bounds):
                text = part[a:b].strip().rstrip(",").strip()
                m = _LABEL.match(text)
                pieces.append((m.group(1).lower(), m.group(2).strip()) if m else (None, text))
    return pieces


def _fields(answer: str) -> dict[str, list[str]]:
    """Each label's candidate values, in order.

    An empty value takes the next unlabelled line; an explanation also takes the unlabelled
    lines that follow it, up to a blank line.
    """
    found: dict[str, list[str]] = {}
    pieces = _segments(answer)
    for i, (label, value) in enumerate(pieces):
        if label is None:
            continue
        follow: list[str] = []
        for next_label, text in pieces[i + 1 :]:
            if next_label is not None or (not text and any(follow + [value])):
                break  # the next field, or a blank line after some text (a closing remark follows)
            follow.append(text)
        if label == "explanation":
            value = "\n".join([value, *follow]).strip()
        elif not value:
            value = next((t for t in follow if t), "")
        found.setdefault(label, []).append(value)
    return found


def _category(value: str) -> str | None:
    hits = [name for name, pattern in _CATEGORY_WORDS.items() if pattern.search(value)]
    return hits[0] if len(hits) == 1 else None


def _score(value: str) -> int | None:
    m = _SCORE.match(value.strip())
    return int(m.group(1)) if m else None


def _explanation(value: str) -> str | None:
    """The text, unless it is empty or an echoed placeholder such as ``[Your brief explanation]``."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text or re.fullmatch(r"\[[^\]]*\]|<[^>]*>", text):
        return None
    return " ".join(text.split())


def _last(values: list[str], read: Callable[[str], T | None]) -> T | None:
    """The last readable value: a model that thinks aloud or echoes the format states its answer last."""
    return next((v for v in map(read, reversed(values)) if v is not None), None)


def parse_explanation(answer: str) -> Explanation | None:
    """Category, score and explanation, or ``None`` when any of them cannot be read."""
    fields = _fields(answer)
    category = _last(fields.get("category", []), _category)
    score = _last(fields.get("score", []), _score)
    text = _last(fields.get("explanation", []), _explanation)
    if category is None or score is None or text is None:
        return None
    return Explanation(category, score, text)


def parse_detection(answer: str, count: int) -> set[int] | None:
    """The 1-based excerpt numbers the answer calls activating, or ``None`` if unreadable.

    The ``Activating:`` line is preferred; without one, an answer made only of numbers is
    accepted. Either way the value must be numbers (asides in parentheses aside) or ``none``: a
    value that goes on in prose is a copied excerpt, not a choice. A number outside ``1..count``
    means the model lost track, so it is unreadable.
    """
    values = _fields(answer).get("activating")
    if values:
        value = values[0]
    else:
        value = _DECORATION.sub("", answer).strip()
        if not (value and _ONLY_NUMBERS.match(value)) and value.lower().strip(" .") != "none":
            return None
    value = re.sub(r"(?i)^\s*(?:excerpts?|numbers?)\b\s*:?", "", re.sub(r"\([^)]*\)", "", value)).strip()
    if not _ONLY_NUMBERS.match(value) and value.lower().strip(" .") != "none":
        return None  # prose after the label: e.g. a small model copying an excerpt ("1. The city of ...")
    numbers = {int(n) for n in _NUMBER.findall(value)}
    if not numbers:
        return set() if re.search(r"(?i)\bnone\b", value) else None
    if not all(1 <= n <= count for n in numbers):
        return None
    return numbers
