"""An OpenAI-compatible chat endpoint (OpenAI itself, vLLM, llama.cpp server, Ollama, a proxy).

The key is read from ``OPENAI_API_KEY`` only; retries, prices and accounting are
:mod:`routesae.interpreters.chat_api`'s. Prices are per million tokens; see :data:`DEFAULT_PRICES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routesae.config import setting
from routesae.interpreters.base import public_url
from routesae.interpreters.chat_api import ChatAPIConfig, ChatAPIInterpreter, _retry_after, api_key

__all__ = ["DEFAULT_PRICES", "OpenAIConfig", "OpenAIInterpreter", "_retry_after"]

API_KEY_VARIABLE = "OPENAI_API_KEY"

#: USD per million (input, output) tokens of a few well-known models, as OpenAI listed them on
#: :data:`PRICES_AS_OF`. Prices change: pass ``--price-input``/``--price-output`` for real budgets.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
PRICES_AS_OF = "2025-06"


@dataclass
class OpenAIConfig(ChatAPIConfig):
    model: str = setting("gpt-4o-mini", "the chat model's name at the endpoint.")
    base_url: str | None = setting(None, "Endpoint base URL, e.g. http://localhost:8000/v1; None means OpenAI's.")

    backend = "openai"


class OpenAIInterpreter(ChatAPIInterpreter):
    name = "openai"
    Config = OpenAIConfig

    def __init__(self, cfg: OpenAIConfig | None = None) -> None:
        super().__init__(cfg)
        from openai import OpenAI

        key = api_key(API_KEY_VARIABLE, self.name, " (a local server that ignores keys still needs some value)")
        self.cfg: OpenAIConfig
        self.client = OpenAI(base_url=self.cfg.base_url, api_key=key, max_retries=0, timeout=self.cfg.timeout)
        self.endpoint = public_url(str(self.client.base_url))
        self.request_model = self.cfg.model
        self.refusal_hint = f"{API_KEY_VARIABLE}, the model name {self.cfg.model!r} and --base-url"

    def default_prices(self) -> tuple[float, float] | None:
        return DEFAULT_PRICES.get(self.cfg.model)

    def prices_source(self) -> str:
        if self.cfg.price_input is None and self.cfg.model in DEFAULT_PRICES:
            return f"built-in table of {PRICES_AS_OF}; prices change, pass --price-input/--price-output"
        return super().prices_source()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.cfg.model, "base_url": self.endpoint, **self.describe_prices()}
