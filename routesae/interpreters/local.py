"""A local transformers chat model as the interpreter: free, offline and reproducible.

The default is the embedded SmolLM2-135M-Instruct (a 135M model is a weak judge; it makes the
whole pipeline runnable without a network or a key, and any local Hugging Face chat model
directory can be given instead). It does not go through TransformerLens: no hooks are needed,
only ``generate``. Decoding is greedy by default, so the same prompt gives the same answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from routesae.config import setting
from routesae.embedded import EMBEDDED_NAME, resolve_model
from routesae.errors import RouteSAEError
from routesae.interpreters.base import Completion, Interpreter, InterpreterConfig, InterpreterError, Message


@dataclass
class LocalConfig(InterpreterConfig):
    model: str = setting(EMBEDDED_NAME, "'smollm2' (embedded) or a local Hugging Face chat model directory.")
    device: str = setting("cpu", "Torch device for the local model.")
    greedy: bool = setting(True, "Decode greedily (reproducible); --no-greedy samples at --temperature.")


class LocalInterpreter(Interpreter):
    name = "local"
    Config = LocalConfig
    concurrency = 1
    max_concurrency = 1  # one model, one generate at a time; threads would only contend for the CPU

    def __init__(self, cfg: LocalConfig | None = None) -> None:
        super().__init__(cfg)
        self.cfg: LocalConfig
        # The embedded model is resolved (converted on first use, ~15 s) only when a request needs it.
        self.path = None if self.cfg.model == EMBEDDED_NAME else resolve_model(self.cfg.model).path
        if self.path is None and self.cfg.model != EMBEDDED_NAME:
            raise RouteSAEError(
                f"the local interpreter runs offline: {self.cfg.model!r} is not a local model directory; "
                f"pass a directory or {EMBEDDED_NAME!r}"
            )
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def _model(self) -> tuple[Any, Any]:
        """Load on first request, so validating a run never waits for the model."""
        with self._lock:
            if self._loaded is None:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = self.path or resolve_model(EMBEDDED_NAME).path
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
                except OSError as e:
                    raise RouteSAEError(f"could not load the interpreter model in {path}: {e}") from e
                if not tokenizer.chat_template:
                    raise RouteSAEError(
                        f"{path} has no chat template, so it cannot be prompted as a chat model; "
                        "use an instruct/chat model directory"
                    )
                self._loaded = (tokenizer, model.to(self.cfg.device).eval())
            return self._loaded

    def _prompt_ids(self, messages: list[Message]) -> Any:
        tokenizer, _ = self._model()
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return encoded["input_ids"]

    def estimate_prompt_tokens(self, messages: list[Message]) -> int:
        return int(self._prompt_ids(messages).shape[1])

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Completion:
        import torch

        tokenizer, model = self._model()
        input_ids = self._prompt_ids(messages).to(self.cfg.device)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] + max_tokens > limit:
            raise InterpreterError(
                f"the prompt has {input_ids.shape[1]} tokens and {max_tokens} more may be generated, but the model "
                f"reads at most {limit}; lower --max-tokens or use a model with a longer context"
            )
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature} if not self.cfg.greedy else {"do_sample": False}
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                top_p=None,
                top_k=None,
                **sampling,
            )
        new = output[0, input_ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text, int(input_ids.shape[1]), int(new.shape[0]), 0.0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.cfg.to_dict(), **({"model_path": str(self.path)} if self.path else {})}
