"""The interpreter contract: a backend that turns chat messages into text and says what it cost.

The interpretation protocol (:mod:`routesae.interpret`) owns prompts, parsing, budget, resume and
concurrency; a backend only answers one request at a time. A plugin registers a subclass of
:class:`Interpreter` with a ``name`` and a ``Config`` dataclass (its settings become CLI options,
like an architecture's). A backend raises :class:`InterpreterError` when one request failed (the
latent is recorded as an error and the run goes on) and :class:`InterpreterUnavailable` when no
request can succeed (endpoint unreachable after retries, bad credentials): the run then stops and
keeps what it finished.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

from routesae.config import Config
from routesae.errors import PluginError, RouteSAEError


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Completion:
    """One answer and its accounting; ``cost_usd`` is None when the price is unknown."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


class InterpreterError(RouteSAEError):
    """This request failed; others may succeed."""


class InterpreterUnavailable(InterpreterError):
    """No request can succeed now: stop starting new ones."""


@dataclass
class InterpreterConfig(Config):
    """Settings every backend has (none yet); subclasses add theirs with :func:`routesae.config.setting`."""


class Interpreter:
    """Base class of interpreter backends.

    ``concurrency`` is how many requests the protocol runs at once by default and
    ``max_concurrency`` the most it may run (``None``: no limit), so a backend holding one local
    model can refuse parallel generation while an HTTP backend fans out.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[InterpreterConfig]] = InterpreterConfig
    concurrency: ClassVar[int] = 1
    max_concurrency: ClassVar[int | None] = 1

    def __init__(self, cfg: InterpreterConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    @classmethod
    def check_contract(cls) -> None:
        """Called at registration, so that a backend whose settings the CLI cannot offer fails when its plugin loads."""
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, InterpreterConfig)):
            raise PluginError(f"{cls.__qualname__}.Config must subclass routesae.InterpreterConfig")

    @classmethod
    def from_options(cls, **options: Any) -> Interpreter:
        """Build from keyword settings, rejecting unknown ones with the list of known ones."""
        return cls(cls.Config.from_dict(options))

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Completion:
        raise NotImplementedError

    def estimate_prompt_tokens(self, messages: list[Message]) -> int:
        """An upper bound on the prompt's tokens, for the budget check before a request.

        The default counts UTF-8 bytes plus a few tokens per message: a byte-level BPE token is
        at least one byte, so this never underestimates (it overestimates English about 4x).
        """
        return sum(len(m["content"].encode()) + 8 for m in messages) + 8

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """US dollars for a request of this size; ``None`` when unknown (the budget then needs prices)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """The non-secret settings recorded in ``interpretations.json``."""
        return {"name": self.name, **recorded_options(self.cfg.to_dict())}

    def close(self) -> None:
        """Release connections or models."""


def public_url(url: str) -> str:
    """``url`` without what may carry a secret (``user:password@``, query, fragment): what files and messages show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """Backend options as files record them: every URL through :func:`public_url`."""
    return {k: public_url(v) if isinstance(v, str) and "://" in v else v for k, v in options.items()}
