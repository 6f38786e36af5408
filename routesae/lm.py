"""The language model host: the only module that touches TransformerLens.

Everything the rest of routesae needs from a model goes through :class:`LanguageModel`: capture
the residual stream after some blocks, and run forwards with those residuals edited (SAE
splicing, steering). It wraps a TransformerLens ``TransformerBridge`` in raw mode (never
``enable_compatibility_mode()``, which rewrites weights), so captured activations equal Hugging
Face ``hidden_states`` and SAEs stay usable outside TransformerLens.

routesae's forwards (capture, logits, splice) run the wrapped Hugging Face modules natively
(:class:`NativeForward`): the bridge's components compute values for hook points routesae never
uses (attention patterns, norm scales) and re-implement attention eagerly; delegating to the
modules, with ``sdpa`` attention, gives a plain Hugging Face forward's values bit for bit, at its
cost. The block-output hooks routesae reads and edits are TransformerLens's as before.

Tokenisation is ours, not the bridge's: the bridge re-loads its own tokenizer with BOS forced
on, so callers tokenise with :attr:`LanguageModel.tokenizer` and pass ``input_ids`` plus the
tokenizer's ``attention_mask``. Masks must never be rebuilt from token ids: for SmolLM2,
pad == EOS, and real EOS tokens would be masked.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from routesae.embedded import ModelSource, resolve_model
from routesae.errors import RouteSAEError, reading

Edit = Callable[[Tensor], Tensor]
"""Maps a block's output ``[B, T, D]`` to the tensor the rest of the forward uses instead."""

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
GAIN_OFFSET_MODELS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})  # RMSNorm scales by 1 + weight
LAYER_CONVENTION = (
    "0-based block index; block i's output = HF hidden_states[i+1] "
    "(the last block's HF hidden state is after the final norm and differs)"
)


class NativeForward:
    """While active, the Hugging Face model runs its own modules everywhere but in the blocks' output hooks.

    Booting a TransformerLens bridge puts a component in place of every module of the Hugging Face
    model (embedding, norms, linear maps, MLPs, attention, rotary embedding, unembedding), each with
    hook points of its own: the norms compute their scale and normalised value for
    ``hook_scale``/``hook_normalized`` even when nothing is hooked, the attention component
    re-implements attention eagerly, materialising ``[B, H, T, T]`` scores for ``hook_pattern``, and
    every component call pays Python of its own (offload checks, hook dispatch). routesae reads and
    edits only the blocks' outputs (``blocks.L.hook_resid_post``), so while its forwards run each such
    component's slot in its Hugging Face parent holds the module it wraps again, and attention runs on
    Hugging Face's ``sdpa``: only the block components remain, their hooks fire as before, and the values
    are a plain Hugging Face forward's, bit for bit. Leaving puts every component back, so ``lm.bridge``
    used directly keeps all its hooks. :meth:`check` compares a short forward both ways before the native
    path is used.
    """

    def __init__(self, bridge: Any) -> None:
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
        from transformer_lens.model_bridge.generalized_components.block import BlockBridge

        self.config = bridge.original_model.config
        # (Hugging Face parent, attribute, component): the parents that are components themselves are not
        # what the Hugging Face forward calls, and the blocks stay bridged for their output hooks.
        self.slots = [
            (parent, name, child)
            for parent in bridge.original_model.modules() if not isinstance(parent, GeneralizedComponent)
            for name, child in parent._modules.items()
            if isinstance(child, GeneralizedComponent) and not isinstance(child, BlockBridge)
            and child.original_component is not None
        ]
        supports_sdpa = bool(getattr(bridge.original_model, "_supports_sdpa", False))
        self.enabled = bool(self.slots) and supports_sdpa and hasattr(self.config, "_attn_implementation")
        self.lock = threading.Condition()  # guards users; exclusive() waits on it until no forward runs
        self.users = 0  # forwards inside active(), over all threads: the first swaps, the last restores
        self.previous: str | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        """The native path for the block; nests, and is shared by threads (``--overlap-harvest`` captures in one
        while another evaluates): the first to enter swaps the modules in, the last to leave puts the components back."""
        if not self.enabled:
            yield
            return
        with self.lock:
            if self.users == 0:
                self._swap_in()
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    self._swap_out()
                    self.lock.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The native path for a forward that changes the model's structure while it runs (:class:`ResumedForward`):
        waits until no other forward is inside, and keeps others out until it is done."""
        with self.lock:
            self.lock.wait_for(lambda: self.users == 0)
            self._swap_in()
            try:
                yield
            finally:
                self._swap_out()

    def _swap_in(self) -> None:
        self.previous = self.config._attn_implementation
        for parent, name, component in self.slots:  # _modules: a component forwards setattr to what it wraps
            parent._modules[name] = component.original_component
        self.config._attn_implementation = "sdpa"

    def _swap_out(self) -> None:
        self.config._attn_implementation = self.previous
        for parent, name, component in self.slots:
            parent._modules[name] = component

    def check(self, forward: Callable[[], Tensor]) -> None:
        """Keep the native path only if ``forward()`` gives, within float tolerance, what the bridge's own path gives."""
        if not self.enabled:
            return
        bridged = forward()
        with self.active():
            native = forward()
        scale = bridged.abs().max().clamp_min(1.0)
        self.enabled = bool(((native - bridged).abs().max() / scale) < 1e-3)


class ResumedForward:
    """Forwards that start at a block, from the residual stream a clean forward captured, instead of at the embedding.

    Evaluation splices each SAE at its blocks in a forward of its own per batch, and the blocks below the first
    edited one compute exactly what the clean forward of that batch computed. While a resumed forward runs, the
    Hugging Face model's list of blocks holds only the blocks from ``start`` on and the residual stream after
    block ``start - 1`` enters as ``inputs_embeds``: the same blocks, hooks, final norm and unembedding as a full
    forward, without the first ``start`` blocks. A model whose forward transforms ``inputs_embeds`` (Gemma scales
    them, GPT-2 adds position embeddings) would compute something else, so :meth:`check` compares a resumed
    forward with a full one on a probe and keeps the shortcut only where they agree. It needs the native path
    (:class:`NativeForward`), under which the rest of the model is Hugging Face's own.
    """

    def __init__(self, bridge: Any, native: NativeForward) -> None:
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
        from transformer_lens.model_bridge.generalized_components.block import BlockBridge

        self.model = bridge.original_model
        self.native = native
        self.slot = next(
            (
                (parent, name)
                for parent in self.model.modules() if not isinstance(parent, GeneralizedComponent)
                for name, child in parent._modules.items()
                if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and all(isinstance(m, BlockBridge) for m in child)
            ),
            None,
        )
        self.enabled = native.enabled and self.slot is not None

    def logits(self, start: int, resid_BTD: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` of the forward from block ``start`` on, ``resid_BTD`` being the stream after ``start - 1``."""
        parent, name = self.slot
        blocks = parent._modules[name]
        with torch.no_grad(), self.native.exclusive():
            parent._modules[name] = blocks[start:]
            try:
                return self.model(inputs_embeds=resid_BTD, attention_mask=attention_mask, use_cache=False).logits
            finally:
                parent._modules[name] = blocks

    def check(self, lm: LanguageModel, probe: Tensor) -> None:
        """Keep the shortcut only if a forward of ``probe`` (token ids ``[1, T]``) resumed half-way gives, within float
        tolerance, the full forward's logits."""
        if not self.enabled:
            return
        mask = torch.ones_like(probe)
        start = lm.n_layers // 2
        full = lm.logits(probe, mask)
        resumed = self.logits(start, lm.capture(probe, mask, [start - 1])[:, :, 0], mask)
        scale = full.abs().max().clamp_min(1.0)
        self.enabled = resumed.shape == full.shape and bool(((resumed - full).abs().max() / scale) < 1e-4)


class LanguageModel:
    """A frozen causal LM behind a TransformerLens bridge, addressed by 0-based block index."""

    def __init__(self, spec: str, source: ModelSource, bridge: Any, tokenizer: Any, architecture: str) -> None:
        self.spec = spec
        self.source = source
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.architecture = architecture
        self.native = NativeForward(bridge)
        self.n_layers: int = bridge.cfg.n_layers
        self.d_model: int = bridge.cfg.d_model
        self.vocab_size: int = bridge.cfg.d_vocab
        first = next(bridge.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        probe = torch.arange(1, 9, device=self.device).remainder(self.vocab_size)[None]
        self.native.check(lambda: self._forward_logits(probe, torch.ones_like(probe)))
        self.resumed = ResumedForward(bridge, self.native)
        self.resumed.check(self, probe)

    @classmethod
    def load(
        cls, spec: str = "smollm2", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> LanguageModel:
        """Load ``spec``: ``"smollm2"`` (embedded), a local Hugging Face directory, or a hub name.

        We load the HF model and tokenizer ourselves (so dtype, device and padding policy are
        ours) and then wrap the model; booting mutates the HF model, so it is not kept apart.
        """
        from transformer_lens.model_bridge import TransformerBridge

        source = resolve_model(spec)
        if source.path is not None:
            fix = "pass a Hugging Face model directory (config.json, weights and tokenizer files), a hub name, or 'smollm2'"
            with reading(f"the model in {source.path}", fix):
                tokenizer, hf = _from_pretrained(source, dtype)
        else:
            try:
                tokenizer, hf = _from_pretrained(source, dtype)
            except OSError as e:
                raise RouteSAEError(
                    f"could not load {spec!r} from the Hugging Face hub (unreachable, or no such model, "
                    f"and no local directory of that name): pass a local model directory or 'smollm2'"
                ) from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding keeps every real token at its unpadded position, so activations of a
        # short row do not depend on what it was batched with.
        tokenizer.padding_side = "right"

        hf = hf.to(device).eval()
        architecture = (hf.config.architectures or [type(hf).__name__])[0]
        bridge = TransformerBridge.boot_transformers(
            source.name_or_path, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype
        )
        bridge.eval()
        for p in bridge.parameters():
            p.requires_grad_(False)
        return cls(spec, source, bridge, tokenizer, architecture)

    def hook_name(self, layer: int) -> str:
        """The bridge hook that carries block ``layer``'s output (the residual stream after it)."""
        return HOOK_TEMPLATE.format(layer=layer)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of which model and which activations, for configs and reports."""
        return {
            "spec": self.spec,
            "path": str(self.source.path) if self.source.path is not None else None,
            "hub_name": self.source.hub_name,
            "embedded": self.source.embedded,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": "sdpa" if self.native.enabled else "eager",
            "resumed_splices": self.resumed.enabled,
            "hook": HOOK_TEMPLATE,
            "layer_convention": LAYER_CONVENTION,
        }

    def capture(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        layers: Sequence[int],
        keep: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """The residual stream after each of ``layers``: ``[B, T, len(layers), D]``, in that order.

        One forward that stops after the deepest requested block, so shallow captures skip the
        rest of the model and the unembedding. A layer may be requested more than once (its slot
        is repeated). With ``keep`` (boolean ``[B, T]``) only those positions are returned, as
        ``[n, len(layers), D]`` rows in batch-major order; pad positions hold garbage, so
        harvesting passes the attention mask (or a stricter mask) here. Rows go into ``out`` when
        given (of that shape, e.g. a slice of a larger buffer), else into a new tensor.

        Each block's output is copied into its slot by a hook as the forward passes it, so the
        only multi-layer tensor is the result: no cache of hooked outputs beside a stacked copy.
        Runs under ``no_grad`` rather than ``inference_mode`` so that the result can feed SAE
        training. Active :meth:`edits` apply, so this also captures downstream effects of an edit.
        """
        layers = [self._check_layer(layer) for layer in layers]
        if not layers:
            raise RouteSAEError("capture needs at least one layer")
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        # The kept rows are found on the host (where the masks live) and then sent: no read-back from the device.
        rows = None if keep is None else keep.flatten().nonzero().squeeze(1).to(self.device)
        lead = tuple(input_ids.shape) if rows is None else (rows.numel(),)
        shape = (*lead, len(layers), self.d_model)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != shape:
            raise RouteSAEError(f"capture: out has shape {tuple(out.shape)}, expected {shape}")
        slots: dict[int, list[int]] = {}
        for slot, layer in enumerate(layers):
            slots.setdefault(layer, []).append(slot)

        def write(layer: int) -> Callable[..., None]:
            def hook(resid_BTD: Tensor, hook: Any) -> None:
                taken = resid_BTD if rows is None else resid_BTD.flatten(0, 1).index_select(0, rows)
                for slot in slots[layer]:
                    out.select(-2, slot).copy_(taken)

            return hook

        stop = max(layers) + 1
        with torch.no_grad(), self.native.active():
            self.bridge.run_with_hooks(
                input_ids,
                attention_mask=attention_mask,
                fwd_hooks=[(self.hook_name(layer), write(layer)) for layer in slots],
                # stop_at_layer == n_layers would not stop anyway; it would just return logits.
                stop_at_layer=stop if stop < self.n_layers else None,
                return_type=None,
                use_cache=False,  # else Hugging Face grows a key/value cache, a concatenation per block, to throw away
            )
        return out

    @contextmanager
    def edits(self, edits: Mapping[int, Edit]) -> Iterator[LanguageModel]:
        """While active, every forward passes block ``L``'s output through ``edits[L]``.

        Used for splicing SAE reconstructions and for steering during generation. Gradients
        flow through the edit (parameters of the LM stay frozen). The hooks are removed on exit,
        also when the body raises.
        """
        hooks = [(self.hook_name(self._check_layer(layer)), _as_hook(edit)) for layer, edit in edits.items()]
        with self.bridge.hooks(fwd_hooks=hooks):
            yield self

    def splice(
        self, input_ids: Tensor, attention_mask: Tensor, edits: Mapping[int, Edit], after: Mapping[int, Tensor] | None = None
    ) -> Tensor:
        """Logits ``[B, T, V]`` of a forward with ``edits`` applied (no gradients).

        ``after`` may hold this batch's clean residual stream after some blocks (``[B, T, D]`` each, as
        :meth:`capture` gives it): when it has the block before the first edited one, the forward starts there
        (:class:`ResumedForward`) and skips the blocks whose outputs the clean forward already computed.
        """
        start = min(edits, default=None)
        if after is not None and start is not None and start - 1 in after and self.resumed.enabled:
            _, attention_mask = self._inputs(input_ids, attention_mask)
            with self.edits(edits):
                return self.resumed.logits(start, after[start - 1].to(self.device), attention_mask)
        with self.edits(edits):
            return self.logits(input_ids, attention_mask)

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` of a plain forward (no gradients)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        with self.native.active():
            return self._forward_logits(input_ids, attention_mask)

    def _forward_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad():
            return self.bridge(input_ids, attention_mask=attention_mask, return_type="logits", use_cache=False)

    def unembedding(self) -> Tensor:
        """``W_U`` ``[D, V]``, the unembedding from the (final-normed) residual stream to logits, a view of the model's
        weight. A bias, where a model has one, is left out: it is the same whatever the residual stream holds."""
        return self.bridge.unembed.original_component.weight.T

    def final_norm_gain(self) -> Tensor | None:
        """The final norm's elementwise gain ``[D]`` (RMSNorm's or LayerNorm's weight), or None for a norm without one.

        Gemma's RMSNorm multiplies by ``1 + weight``; that offset is applied here, so callers get the gain itself.
        """
        norm = self.bridge.ln_final.original_component
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, Tensor):
            return None
        offset = self.bridge.original_model.config.model_type in GAIN_OFFSET_MODELS
        return weight + 1 if offset else weight

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool):
            raise RouteSAEError(f"layer must be an integer block index, got {layer!r}")
        try:
            layer = operator.index(layer)
        except TypeError:
            raise RouteSAEError(f"layer must be an integer block index, got {layer!r}") from None
        if not 0 <= layer < self.n_layers:
            raise RouteSAEError(
                f"layer {layer} is out of range: {self.spec} has {self.n_layers} blocks, "
                f"numbered 0..{self.n_layers - 1}"
            )
        return layer

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise RouteSAEError(
                f"expected input_ids and attention_mask of the same shape [batch, tokens], got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        return input_ids.to(self.device), attention_mask.to(self.device)


def _as_hook(edit: Edit) -> Callable[..., Tensor]:
    """Adapt an edit to the bridge's hook signature (keyed by layer, so ``hook.name`` is unused)."""

    def hook(resid_BTD: Tensor, hook: Any) -> Tensor:
        return edit(resid_BTD)

    return hook


def _from_pretrained(source: ModelSource, dtype: torch.dtype) -> tuple[Any, Any]:
    """The Hugging Face tokenizer and model of ``source`` (a local directory never triggers a hub request)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = {"local_files_only": True} if source.path is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **local)
    return tokenizer, AutoModelForCausalLM.from_pretrained(source.name_or_path, dtype=dtype, **local)
