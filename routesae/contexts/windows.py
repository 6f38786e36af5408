"""Token text, token classes and sentence-bounded windows, all from tables built once per vocabulary.

During the pass a token is only an id: its class, whether it ends a sentence and whether it is a
document boundary are looked up in vocabulary-sized tensors. Text is produced only at the end, for
the windows that are written out.

Windows (a deviation from the reference, §7.1 and §12.12): a token ends a sentence when its decoded
text, stripped, ends with ``.``, ``!`` or ``?`` — so ``."`` and ``.\\n`` count, where the reference
accepted only the exact single-character strings. Special tokens (BOS, EOS, padding: the packing
puts EOS between documents) and padding positions are *boundaries*: a window never contains one, so
it never runs into padding or into a neighbouring document, and a boundary token is never an
activating token. Windows also stay inside their block (the sequence the model read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SENTENCE_ENDS = (".", "!", "?")


def token_class(text: str) -> str:
    """The activating token's class: its text stripped and lower-cased (whitespace-only tokens keep their text)."""
    return text.strip().lower() or text


@dataclass
class Vocabulary:
    """Per-token-id tables: decoded text, class id, sentence end, boundary (special token)."""

    texts: list[str]
    class_id: Tensor  # [V] long
    class_names: list[str]
    ender: Tensor  # [V] bool
    special: Tensor  # [V] bool

    @classmethod
    def build(cls, tokenizer: Any, size: int) -> Vocabulary:
        """Tables for ids ``0..size-1`` (ids the tokenizer does not know decode to ``""``)."""
        known = min(len(tokenizer), size)
        texts = tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
        texts += [""] * (size - known)
        names: dict[str, int] = {}
        class_id = torch.tensor([names.setdefault(token_class(t), len(names)) for t in texts], dtype=torch.long)
        ender = torch.tensor([t.strip().endswith(SENTENCE_ENDS) for t in texts], dtype=torch.bool)
        special = torch.zeros(size, dtype=torch.bool)
        special[[i for i in tokenizer.all_special_ids if 0 <= i < size]] = True
        return cls(texts, class_id, list(names), ender, special)


def sentence_bounds(input_ids_BT: Tensor, attention_mask_BT: Tensor, vocab: Vocabulary) -> tuple[Tensor, Tensor]:
    """``(start, end)``, each ``[B, T]``: the inclusive sentence span around every position.

    Going left, a sentence starts after the previous sentence end or boundary; going right, it
    ends at the first sentence end at or after the position (included) or just before the next
    boundary. Spans are only meaningful at non-boundary positions.
    """
    B, T = input_ids_BT.shape
    boundary = vocab.special[input_ids_BT] | ~attention_mask_BT.bool()
    ender = vocab.ender[input_ids_BT] & ~boundary
    position = torch.arange(T).expand(B, T)
    stop_after = torch.where(ender | boundary, position, -1)
    previous_stop = torch.cummax(torch.cat([torch.full((B, 1), -1), stop_after[:, :-1]], 1), dim=1).values
    start = previous_stop + 1
    end_at = torch.where(ender, position, T - 1)
    end_before = torch.where(boundary, position - 1, T - 1)
    next_end = _reverse_cummin(end_at)
    next_boundary = _reverse_cummin(torch.cat([end_before[:, 1:], torch.full((B, 1), T - 1)], 1))
    return start, torch.minimum(next_end, next_boundary)


def _reverse_cummin(x_BT: Tensor) -> Tensor:
    return torch.cummin(x_BT.flip(1), dim=1).values.flip(1)


def crop(start: Tensor, end: Tensor, index: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Crop spans longer than ``window`` to ``[index - window//2, index + window - 1 - window//2]`` (≤ window tokens)."""
    half = window // 2
    return torch.maximum(start, index - half), torch.minimum(end, index + (window - 1 - half))


def window_tokens(tokenizer: Any, vocab: Vocabulary, windows: list[list[int]]) -> list[list[str]]:
    """The text of each token of each window, such that ``"".join(tokens)`` is the window's decoded text.

    The per-id table is right for almost every window; where joining it differs from decoding the
    whole window (a character split over byte-level tokens, a tokenizer that drops leading spaces
    of lone tokens), the window is detokenised incrementally instead.
    """
    decoded = tokenizer.batch_decode(windows, clean_up_tokenization_spaces=False) if windows else []
    result = []
    for ids, text in zip(windows, decoded):
        pieces = [vocab.texts[i] for i in ids]
        result.append(pieces if "".join(pieces) == text else _incremental(tokenizer, ids, text))
    return result


def _incremental(tokenizer: Any, ids: list[int], text: str) -> list[str]:
    """Each token's piece is what decoding one more token adds, cut from ``text`` so the pieces join to it."""
    pieces, done = [], 0
    for i in range(1, len(ids) + 1):
        upto = len(text) if i == len(ids) else len(tokenizer.decode(ids[:i], clean_up_tokenization_spaces=False))
        upto = min(max(upto, done), len(text))
        pieces.append(text[done:upto])
        done = upto
    return pieces
