"""What the hosted chat-completions backends share (``openai``, ``azure``): retries, prices and accounting.

A backend here only says how to build its ``openai`` client, which model or deployment a request
names and what to check when the endpoint refuses; this module sends the request. The client's own
retries are off (``max_retries=0``) so that ours decide: exponential back-off with jitter on 429,
5xx, timeouts and connection errors, honouring ``Retry-After``, and a clear
:class:`InterpreterUnavailable` once they are used up (docs/reference.md §12.23: the reference
retried without back-off). Keys come from an environment variable only: a flag would put them in
``ps``, shell history and job logs (the reference's ``--api_key``, §12.20); they are never logged or
written. Prices are per million tokens.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from routesae.config import setting
from routesae.errors import ConfigError
from routesae.interpreters.base import (
    Completion,
    Interpreter,
    InterpreterConfig,
    InterpreterError,
    InterpreterUnavailable,
    Message,
)

_RETRY_STATUS = {408, 409, 429}  # and every 5xx
_FATAL_STATUS = {401, 403, 404}  # bad key, no access, unknown model: no request can succeed
_MAX_RETRY_AFTER_S = 600.0


@dataclass
class ChatAPIConfig(InterpreterConfig):
    """Retry and price settings of a hosted chat-completions backend; subclasses add where the endpoint is."""

    timeout: float = setting(60.0, "Seconds to wait for one answer before retrying.")
    max_retries: int = setting(5, "Retries of one request after a 429, 5xx, timeout or connection error.")
    backoff: float = setting(1.0, "First retry delay in seconds; doubles each retry, with jitter.")
    max_backoff: float = setting(60.0, "Longest delay between retries, in seconds (a Retry-After header wins).")
    price_input: float | None = setting(None, "USD per million prompt tokens; None: the built-in table's, if it knows the model.")
    price_output: float | None = setting(None, "USD per million completion tokens; None: the built-in table's.")

    backend: ClassVar[str] = ""  # the interpreter's name, for messages

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("timeout", "backoff", "max_backoff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.backend} interpreter: {name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"{self.backend} interpreter: max_retries must be >= 0, got {self.max_retries}")
        for name in ("price_input", "price_output"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{self.backend} interpreter: {name} must be >= 0, got {value}")
        if (self.price_input is None) != (self.price_output is None):
            raise ConfigError("give both --price-input and --price-output (USD per million tokens), or neither")


def api_key(variable: str, backend: str, hint: str) -> str:
    """The key in the environment variable ``variable``, or a :class:`ConfigError` that says how to set it."""
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(
            f"the {backend} interpreter reads its API key from the {variable} environment variable, which is not set: "
            f"`export {variable}=...`{hint}; the key is never taken from a flag, logged or written"
        )
    return key


class ChatAPIInterpreter(Interpreter):
    """A backend that answers through an ``openai`` client's ``chat.completions``; subclasses set ``client``.

    ``client`` is built with ``max_retries=0``; ``endpoint`` is its URL as messages show it
    (:func:`~routesae.interpreters.base.public_url`), ``request_model`` what a request's ``model``
    field names, and ``refusal_hint`` what to check after a 401, 403 or 404.
    """

    Config: ClassVar[type[ChatAPIConfig]] = ChatAPIConfig
    concurrency = 4
    max_concurrency = None

    cfg: ChatAPIConfig
    client: Any
    endpoint: str
    request_model: str
    refusal_hint: str

    def __init__(self, cfg: ChatAPIConfig | None = None) -> None:
        super().__init__(cfg)
        self.jitter = random.Random()

    # -- prices ----------------------------------------------------------------------------------
    def default_prices(self) -> tuple[float, float] | None:
        """USD per million (input, output) tokens when none are given; ``None``: unknown."""
        return None

    def prices(self) -> tuple[float, float] | None:
        if self.cfg.price_input is not None and self.cfg.price_output is not None:
            return self.cfg.price_input, self.cfg.price_output
        return self.default_prices()

    def prices_source(self) -> str:
        return "given" if self.cfg.price_input is not None else "unknown"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        prices = self.prices()
        if prices is None:
            return None
        return (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6

    def describe_prices(self) -> dict[str, Any]:
        """The retry and price part of :meth:`describe`."""
        prices = self.prices()
        return {
            "timeout": self.cfg.timeout,
            "max_retries": self.cfg.max_retries,
            "price_input": prices[0] if prices else None,
            "price_output": prices[1] if prices else None,
            "prices": self.prices_source(),
        }

    # -- requests --------------------------------------------------------------------------------
    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Completion:
        import openai

        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.request_model, messages=messages, max_tokens=max_tokens, temperature=temperature
                )
            except openai.APIStatusError as e:
                status = e.status_code
                if status in _FATAL_STATUS:
                    raise InterpreterUnavailable(
                        f"{self.endpoint} refused the request with HTTP {status} ({_short(e)}); check {self.refusal_hint}"
                    ) from None
                if status not in _RETRY_STATUS and status < 500:
                    raise InterpreterError(f"HTTP {status}: {_short(e)}") from None
                last = f"HTTP {status}: {_short(e)}"
                delay = _retry_after(e.response.headers)
            except openai.APITimeoutError:
                last, delay = f"no answer within {self.cfg.timeout:g} s", None
            except openai.APIConnectionError as e:
                last, delay = f"connection failed ({_short(e)})", None
            else:
                return self._completion(response, messages, max_tokens)
            if attempt < self.cfg.max_retries:
                time.sleep(delay if delay is not None else self._backoff(attempt))
        raise InterpreterUnavailable(
            f"{self.endpoint} gave no answer after {self.cfg.max_retries + 1} attempts (last: {last}); "
            "check that the endpoint is up, or raise --max-retries/--timeout"
        )

    def _backoff(self, attempt: int) -> float:
        """Exponential back-off with "equal jitter": half the delay fixed, half random."""
        delay = min(self.cfg.max_backoff, self.cfg.backoff * 2**attempt)
        return delay / 2 + self.jitter.uniform(0, delay / 2)

    def _completion(self, response: Any, messages: list[Message], max_tokens: int) -> Completion:
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice is not None else None) or ""
        usage = response.usage
        if usage is not None:
            prompt_tokens, completion_tokens = usage.prompt_tokens or 0, usage.completion_tokens or 0
        else:  # some servers omit usage: count the upper bounds the budget reserved
            prompt_tokens, completion_tokens = self.estimate_prompt_tokens(messages), max_tokens
        return Completion(text, prompt_tokens, completion_tokens, self.cost(prompt_tokens, completion_tokens))

    def close(self) -> None:
        self.client.close()


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``retry-after`` in seconds or as a date)."""
    try:
        if "retry-after-ms" in headers:
            return min(_MAX_RETRY_AFTER_S, max(0.0, float(headers["retry-after-ms"]) / 1000))
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time()
        return min(_MAX_RETRY_AFTER_S, max(0.0, seconds))
    except (TypeError, ValueError):
        return None


def _short(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
