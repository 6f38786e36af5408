"""A local transformers chat model as the interpreter: free, offline and reproducible.

The default is the embedded SmolLM2-135M-Instruct (a 135M model is a weak judge; it makes the
whole pipeline runnable without a network or a key, and any local Hugging Face chat model
directory can be given instead). It does not go through TransformerLens: no hooks are needed,
only ``generate``. Decoding is greedy by default, so the same prompt gives the same answer.

A model this small rarely follows an answer format on its own: it echoes the format's
placeholders, invents other labels or loops. So the answer is *prefilled*: the assistant turn
starts with the first label of the prompt's answer format (``Feature category:``,
``Activating:``), the model only continues it, and the returned text is that label plus the
continuation, so the parser sees the whole answer. Generation stops when the model starts the
answer over (it writes the label again); the restart is not part of the answer, since the parser
would otherwise read the last, often truncated, copy. The label comes from the prompt
(:func:`answer_prefix`), so a user's template gets the same treatment when it states its format
the same way; a conversation that already ends with an assistant message is continued as it is.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from routesae.config import setting
from routesae.embedded import EMBEDDED_NAME, resolve_model
from routesae.errors import ConfigError, RouteSAEError
from routesae.interpreters.base import Completion, Interpreter, InterpreterConfig, InterpreterError, Message

# The last line that mentions the answer's format and ends with ':' ("Answer in exactly this format:"),
# then the label that starts the next line ("Feature category:" of "Feature category: <...>").
_FORMAT_LABEL = re.compile(r"(?im)^[^\n]*\bformat\b[^\n]*:[ \t]*\n[ \t]*([A-Za-z][\w \t-]{0,39}:)")


def answer_prefix(prompt: str) -> str | None:
    """The label the answer must start with, read from the prompt's answer format; ``None`` if it states none.

    The format is the line after the last line that mentions ``format`` and ends with ``:``, as in
    the built-in templates (``Answer in exactly this format, with nothing else:`` followed by
    ``Feature category: <...>``); the label is that line up to its first ``:``.
    """
    found = _FORMAT_LABEL.findall(prompt)
    return found[-1].strip() if found else None


@dataclass
class LocalConfig(InterpreterConfig):
    model: str = setting(EMBEDDED_NAME, "'smollm2' (embedded) or a local Hugging Face chat model directory.")
    device: str = setting("cpu", "Torch device for the local model.")
    greedy: bool = setting(True, "Decode greedily (reproducible); --no-greedy samples at --temperature.")
    prefill: bool = setting(
        True,
        "Start the answer with the first label of the prompt's answer format (e.g. 'Feature category:') so a small "
        "model continues in that format, and stop when it starts the answer over.",
    )
    repetition_penalty: float = setting(
        1.0,
        "Divide the odds of tokens the answer already used by this (>1 curbs loops; 1 disables it; the prompt's "
        "tokens are not counted).",
    )
    no_repeat_ngram_size: int = setting(
        0,
        "Forbid repeating any run of this many tokens, the prompt's included (0 disables it; small values also "
        "forbid copying the format's labels).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"local interpreter: repetition_penalty must be positive (1 disables it), got {self.repetition_penalty}"
            )
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(
                f"local interpreter: no_repeat_ngram_size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}"
            )


class LocalInterpreter(Interpreter):
    name = "local"
    Config = LocalConfig
    concurrency = 1
    max_concurrency = 1  # one model, one generate at a time; threads would only contend for the CPU

    def __init__(self, cfg: LocalConfig | None = None) -> None:
        super().__init__(cfg)
        self.cfg: LocalConfig
        # The embedded model is resolved (converted on first use, which takes a while) only when a request needs it.
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

    def _prefilled(self, messages: list[Message]) -> tuple[list[Message], str, str | None]:
        """The conversation ending in the assistant's started answer, that start ('' if none) and the stop string.

        Only a label read from the answer format is a stop string: an answer that states it again starts over.
        """
        if messages and messages[-1]["role"] == "assistant":
            return messages, messages[-1]["content"], None
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        label = answer_prefix(prompt) if self.cfg.prefill else None
        if label is None:
            return messages, "", None
        return [*messages, {"role": "assistant", "content": label}], label, label

    def _prompt_ids(self, messages: list[Message]) -> Any:
        tokenizer, _ = self._model()
        started = messages[-1]["role"] == "assistant"
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=not started, continue_final_message=started, return_tensors="pt",
            return_dict=True,
        )
        return encoded["input_ids"]

    def estimate_prompt_tokens(self, messages: list[Message]) -> int:
        return int(self._prompt_ids(self._prefilled(messages)[0]).shape[1])

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Completion:
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor

        tokenizer, model = self._model()
        messages, prefix, stop = self._prefilled(messages)
        input_ids = self._prompt_ids(messages).to(self.cfg.device)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] + max_tokens > limit:
            raise InterpreterError(
                f"the prompt has {input_ids.shape[1]} tokens and {max_tokens} more may be generated, but the model "
                f"reads at most {limit}; lower --max-tokens or use a model with a longer context"
            )
        options: dict[str, Any] = {"do_sample": not self.cfg.greedy}
        if not self.cfg.greedy:
            options["temperature"] = temperature
        if self.cfg.repetition_penalty != 1.0:  # generate's own penalty would count the prompt, format labels included
            prompt_length = int(input_ids.shape[1])
            options["logits_processor"] = [RepetitionPenaltyLogitsProcessor(self.cfg.repetition_penalty, prompt_length)]
        if self.cfg.no_repeat_ngram_size:
            options["no_repeat_ngram_size"] = self.cfg.no_repeat_ngram_size
        if stop:
            options.update(stop_strings=[stop], tokenizer=tokenizer)
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                top_p=None,
                top_k=None,
                **options,
            )
        new = output[0, input_ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        if stop and text.endswith(stop):
            text = text[: -len(stop)].rstrip()  # the model started the answer over: that is not the answer
        return Completion(prefix + text, int(input_ids.shape[1]), int(new.shape[0]), 0.0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.cfg.to_dict(), **({"model_path": str(self.path)} if self.path else {})}
