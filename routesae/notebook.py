"""One-liners for interactive work: a string's latents, and a model with SAEs spliced into it.

What a notebook user reaches for first (SAELens' ``sae.encode`` on hook activations,
``HookedSAETransformer.run_with_saes``) takes several routesae calls otherwise: load the model the
SAE was trained on, tokenise as in training, capture its blocks, run the SAE on raw residuals,
and for splicing, capture clean activations first (a RouteSAE routes from all its blocks) and
then replace each block the SAE writes. Everything here goes through the same functions the
evaluator uses, so what a notebook shows is what ``routesae evaluate`` measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from routesae.architectures.base import SAE
from routesae.checkpoint import load
from routesae.errors import RouteSAEError
from routesae.evaluate import counted_positions, splice_edits
from routesae.lm import LanguageModel
from routesae.steering import SteerConfig, generate_continuation, render_prompt


@dataclass
class TokenLatents:
    """Each token of a text with the latents active on it, strongest first (and, for a RouteSAE, its routed block).

    Position 0 is an attention sink that no SAE here was trained on (its residual is ~100x the
    others'): its latents are shown but mean little.
    """

    tokens: list[str]
    token_ids: list[int]
    latents: list[list[int]]
    values: list[list[float]]
    blocks: list[int | None]

    def __len__(self) -> int:
        return len(self.tokens)

    def __str__(self) -> str:
        rows = []
        for i, token in enumerate(self.tokens):
            active = ", ".join(f"{latent}:{value:.2f}" for latent, value in zip(self.latents[i][:8], self.values[i][:8]))
            block = f" @{self.blocks[i]}" if self.blocks[i] is not None else ""
            rows.append(f"{i:>4} {token!r:<16}{block} {active}{' ...' if len(self.latents[i]) > 8 else ''}")
        return "\n".join(rows)


def _open(sae: SAE | Path | str, model: LanguageModel | str | None) -> tuple[SAE, LanguageModel]:
    """The SAE (loaded from its directory if given one) and the model it reads (loaded from its checkpoint if not given)."""
    sae = sae if isinstance(sae, SAE) else load(sae)
    if isinstance(model, LanguageModel):
        lm = model
    elif model is not None or sae.checkpoint is not None:
        lm = LanguageModel.load(model if model is not None else sae.checkpoint["model"]["spec"])
    else:
        raise RouteSAEError("an SAE built in memory needs its model: pass model=LanguageModel.load(...) or a model name")
    if sae.d_model != lm.d_model:
        raise RouteSAEError(f"the SAE reads d_model {sae.d_model} but {lm.spec!r} has d_model {lm.d_model}")
    return sae.to(lm.device).eval(), lm


def latents(sae: SAE | Path | str, text: str, *, model: LanguageModel | str | None = None) -> TokenLatents:
    """The latents of ``sae`` on every token of ``text``, from raw residuals as in training and evaluation.

    ``sae`` is an SAE or its checkpoint directory; ``model`` the language model (an instance, or a
    name to load), by default the one the checkpoint names.

    >>> print(routesae.latents("runs/demo/topk-L21-k32-F4096", "The Eiffel Tower is in Paris."))
    """
    sae, lm = _open(sae, model)
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise RouteSAEError("the text is empty: give some text to read the latents of")
    with torch.no_grad():
        out = sae(lm.capture(ids, torch.ones_like(ids), list(sae.layers))[0])
    values_NF = out.latents
    routed = sae.routed_blocks(out)
    active = [row.nonzero().squeeze(1) for row in values_NF]
    order = [idx[values_NF[n, idx].abs().argsort(descending=True)] for n, idx in enumerate(active)]
    return TokenLatents(
        tokens=[lm.tokenizer.decode([i]) for i in ids[0].tolist()],
        token_ids=ids[0].tolist(),
        latents=[idx.tolist() for idx in order],
        values=[values_NF[n, idx].tolist() for n, idx in enumerate(order)],
        blocks=routed.tolist() if routed is not None else [None] * ids.shape[1],
    )


@contextmanager
def spliced(lm: LanguageModel, *saes: SAE | Path | str) -> Iterator[LanguageModel]:
    """Inside the block, ``lm.logits`` (and :func:`generate`) runs with each SAE's reconstruction in place of the
    residual stream wherever it writes (every real token but position 0, as evaluation splices).

    >>> with routesae.spliced(lm, "runs/demo/topk-L21-k32-F4096"):
    ...     print(routesae.generate(lm, "The capital of France is"))
    """
    opened = [_open(sae, lm)[0] for sae in saes]
    written = [block for sae in opened for block in sae.layers]  # a routed SAE may write any block of its range
    if len(written) != len(set(written)):
        raise RouteSAEError("two of these SAEs write the same block; splice SAEs of different blocks together")
    plain = type(lm).logits.__get__(lm)
    layers = sorted({block for sae in opened for block in sae.layers})

    def logits(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        B, T = input_ids.shape
        counted_BT = counted_positions(mask, reference=False)
        acts_BTLD = lm.capture(input_ids, mask, layers)
        edits = {}
        with torch.no_grad():
            for sae in opened:
                slots = [layers.index(block) for block in sae.layers]
                reconstruction = sae.reconstruction(sae(acts_BTLD[:, :, slots].reshape(B * T, len(slots), -1)))
                edits.update(splice_edits(reconstruction, counted_BT, "spliced", clean={}))
        with lm.edits(edits):
            return plain(input_ids, mask)

    lm.logits = logits  # type: ignore[method-assign]  # shadows the method for this block only
    try:
        yield lm
    finally:
        del lm.logits


def generate(lm: LanguageModel, prompt: str, cfg: SteerConfig | None = None, **settings: object) -> str:
    """Continue ``prompt`` with ``lm`` (inside :func:`spliced`: with the SAEs spliced in); ``settings`` as
    :class:`~routesae.steering.SteerConfig` (``max_new_tokens``, ``temperature``, ``seed``, ``chat``, ...)."""
    cfg = SteerConfig.build(cfg, settings)
    _, prompt_ids, _ = render_prompt(lm.tokenizer, prompt, cfg.chat, cfg.system)
    return lm.tokenizer.decode(generate_continuation(lm, prompt_ids, cfg), skip_special_tokens=True)
