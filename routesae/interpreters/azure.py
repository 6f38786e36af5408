"""Azure OpenAI: a chat deployment of an Azure OpenAI resource, through ``openai.AzureOpenAI``.

The reference interprets through Azure (its ``--api_base``, ``--api_version``, ``--engine``); here
they are ``--azure-endpoint``, ``--api-version`` and ``--deployment``, and requests go to
``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={version}`` with the key in
the ``api-key`` header. The key is read from ``AZURE_OPENAI_API_KEY`` only. Retries, the cost cap and
accounting are those of the ``openai`` backend (:mod:`routesae.interpreters.chat_api`). Deployment
names are the user's own, so no built-in price applies: give ``--price-input``/``--price-output``
for costs and ``--max-cost``. ``interpretations.json`` records the deployment as the interpreter's
``model``: an Azure request names its deployment where an OpenAI request names its model.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

from routesae.config import setting
from routesae.errors import ConfigError
from routesae.interpreters.base import public_url
from routesae.interpreters.chat_api import ChatAPIConfig, ChatAPIInterpreter, api_key

API_KEY_VARIABLE = "AZURE_OPENAI_API_KEY"
REQUIRED = ("azure_endpoint", "api_version", "deployment")


@dataclass
class AzureConfig(ChatAPIConfig):
    azure_endpoint: str | None = setting(
        None, "Azure OpenAI resource endpoint, e.g. https://NAME.openai.azure.com (the reference's --api_base)."
    )
    api_version: str | None = setting(None, "Azure OpenAI API version, e.g. 2024-10-21 (the reference's --api_version).")
    deployment: str | None = setting(None, "Azure OpenAI deployment that answers (the reference's --engine).")
    price_input: float | None = setting(None, "USD per million prompt tokens at the deployment; None: unknown.")
    price_output: float | None = setting(None, "USD per million completion tokens at the deployment; None: unknown.")

    backend = "azure"

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [name for name in REQUIRED if not getattr(self, name)]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ConfigError(
                f"the azure interpreter needs {flags} (on `routesae pipeline`: "
                f"{', '.join('--interpreter-' + name.replace('_', '-') for name in missing)}), e.g. --azure-endpoint "
                "https://NAME.openai.azure.com --api-version 2024-10-21 --deployment DEPLOYMENT"
            )
        parts = urllib.parse.urlsplit(self.azure_endpoint or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--azure-endpoint must be an http(s) URL such as https://NAME.openai.azure.com, "
                f"got {public_url(self.azure_endpoint or '')!r}"
            )
        if "/openai" in parts.path or parts.query:
            raise ConfigError(
                f"--azure-endpoint is the resource's address alone ({parts.scheme}://{parts.hostname}), not a request URL "
                f"(got {public_url(self.azure_endpoint or '')!r}); the deployment and API version are --deployment and "
                "--api-version"
            )


class AzureInterpreter(ChatAPIInterpreter):
    name = "azure"
    Config = AzureConfig

    def __init__(self, cfg: AzureConfig | None = None) -> None:
        super().__init__(cfg)
        from openai import AzureOpenAI

        key = api_key(API_KEY_VARIABLE, self.name, " (a key of the Azure OpenAI resource)")
        self.cfg: AzureConfig
        self.client = AzureOpenAI(
            azure_endpoint=self.cfg.azure_endpoint,
            azure_deployment=self.cfg.deployment,
            api_version=self.cfg.api_version,
            api_key=key,
            max_retries=0,
            timeout=self.cfg.timeout,
        )
        self.endpoint = public_url(str(self.client.base_url))
        self.request_model = str(self.cfg.deployment)
        self.refusal_hint = (
            f"{API_KEY_VARIABLE}, --deployment {self.cfg.deployment!r}, --api-version {self.cfg.api_version!r} "
            "and --azure-endpoint"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.cfg.deployment,
            "azure_endpoint": public_url(str(self.cfg.azure_endpoint)),
            "api_version": self.cfg.api_version,
            **self.describe_prices(),
        }
