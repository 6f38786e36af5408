"""SAELens's on-disk format, ``cfg.json`` + ``sae_weights.safetensors``, as sae-lens 6 writes and reads it.

What a SAELens SAE computes (sae-lens 6.54, ``sae_lens/saes/*.py``; the golden directories in
``tests/data/saelens`` were written by it)::

    x' = norm_in(x);  pre = (x' − b_dec) W_enc + b_enc;  z = act(pre);  x̂ = norm_out(z W_dec + b_dec)

with W_enc ``[d_in, d_sae]`` and W_dec ``[d_sae, d_in]`` (routesae keeps both ``[F, D]``: W_enc is
transposed), ``apply_b_dec_to_input`` true, and norm_in/norm_out the identity (``"none"``) or
``"layer_norm"``: (x − μ)/(σ + 1e-5) in and x̂·σ + μ out, σ the Bessel-corrected std of the centred
x. routesae's ``normalize="layer_norm"`` is that convention step for step; its default
``"token"`` adds 1e-6 to σ both ways, which no SAELens setting expresses and which cannot be folded
into weights (σ is per token), so such SAEs are refused rather than written approximately.

The activations, by SAELens architecture: ``standard`` ReLU; ``topk`` ReLU of the k largest
pre-activations; ``jumprelu`` ReLU(pre)·1[pre > θ]; ``gated`` 1[x'W_enc + b_gate > 0] ·
ReLU(x'(W_enc ⊙ exp(r_mag)) + b_mag), with no b_enc. Each routesae architecture that SAELens can
hold exactly has a :class:`SAELensExporter` (:mod:`routesae.interop.saelens_exporters`), which maps
it both ways.

What SAELens has no field for goes into ``cfg.json``'s free-form ``metadata`` under ``"routesae"``
(the routesae config.json: training settings, model, data; SAELens keeps metadata it does not
know through a load and a save), and tensors that SAELens holds only inexactly into
``routesae_exact.safetensors`` beside (JumpReLU's log θ: SAELens stores θ = exp(log θ), and log
does not give log θ back bit for bit). With both, routesae → SAELens → routesae is exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from routesae.architectures.base import SAE
from routesae.errors import PluginError, RouteSAEError
from routesae.files import write_json, write_safetensors
from routesae.interop.base import Exporter

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
EXACT_FILE = "routesae_exact.safetensors"  # routesae tensors SAELens holds only inexactly (see the module docstring)
METADATA_KEY = "routesae"  # cfg.json's metadata entry holding what SAELens has no field for
SAELENS_FORMAT_VERSION = "6.54.12"  # the sae-lens version whose format this writes (and made the golden directories)

HOOK_POST = "blocks.{layer}.hook_resid_post"
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(post|pre)")

#: routesae's normalisation -> SAELens's normalize_activations, where SAELens computes the same thing.
NORMALIZATIONS = {"none": "none", "layer_norm": "layer_norm"}
TOKEN_NORMALIZE_REFUSAL = (
    "routesae's normalize='token' standardises with (h - mean)/(std + 1e-6) and maps back with std + 1e-6, while "
    "SAELens's layer_norm uses std + 1e-5 on the way in and std alone on the way out; the difference depends on "
    "each token's std, so it cannot be folded into the weights, and no SAELens setting computes it. Train with "
    "--normalize layer_norm (SAELens's convention) or --normalize none to export"
)

#: config.json keys that do not travel: they name this checkpoint's own files or where it was read from.
LOCAL_KEYS = ("checkpoint_id", "format_version", "source")


def hook_layer(hook_name: Any) -> int:
    """The 0-based block whose output a SAELens hook reads (``blocks.N.hook_resid_pre`` is block N−1's output)."""
    match = _HOOK.fullmatch(hook_name) if isinstance(hook_name, str) else None
    if match is None or (match.group(2) == "pre" and int(match.group(1)) == 0):
        raise RouteSAEError(
            f"hook_name {hook_name!r}: routesae reads the residual stream after a block, blocks.N.hook_resid_post "
            "(or blocks.N.hook_resid_pre for N >= 1, the same activations as block N-1's output)"
        )
    block = int(match.group(1))
    return block if match.group(2) == "post" else block - 1


class SAELensExporter(Exporter):
    """Maps one routesae architecture to one SAELens architecture and back.

    A subclass names the two architectures and lists the tensors they share; it overrides
    :meth:`check` (refusals), :meth:`fields` and :meth:`settings` (SAELens config fields <->
    routesae settings beyond the shared ones), and :meth:`to_saelens`/:meth:`from_saelens` where a
    tensor changes form. ``primary`` says which routesae architecture a SAELens directory of that
    architecture becomes when it was not written by routesae (BatchTopK's exporter writes
    ``jumprelu`` too, but a foreign ``jumprelu`` is a JumpReLU SAE).
    """

    format: ClassVar[str] = "saelens"
    saelens_architecture: ClassVar[str] = ""
    primary: ClassVar[bool] = True
    #: the SAELens tensors with a routesae tensor of the same name (W_enc is transposed, the rest is the same)
    shared: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")
    #: the SAELens tensors this architecture has, in the order sae-lens writes them
    tensors: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")
    #: the biases an input shift enters (W_enc x = W_enc (x − b_dec) + W_enc b_dec), for apply_b_dec_to_input=false
    input_biases: ClassVar[tuple[str, ...]] = ("b_enc",)

    def check_contract(self) -> None:
        super().check_contract()
        if not self.saelens_architecture:
            raise PluginError(f"{type(self).__qualname__} must set saelens_architecture")

    @classmethod
    def unsupported(cls, sae: SAE) -> str | None:
        if len(sae.layers) == 1:
            return None
        blocks = f"blocks {sae.layers[0]}..{sae.layers[-1]}" if len(sae.layers) > 1 else f"block {sae.layers[0]}"
        return (
            f"SAELens cannot host a routed or multi-layer SAE as a whole: a SAELens SAE reads one hook and "
            f"reconstructs it, while this {sae.name} SAE reads {blocks} and decides per token where its "
            "reconstruction goes"
        )

    # -- export ---------------------------------------------------------------------------------
    def export(self, sae: SAE, config: dict[str, Any], out: Path) -> None:
        cfg = self.saelens_config(sae, config)
        tensors = self.to_saelens(sae)
        exact = self.exact_tensors(sae)
        write_safetensors(out / SAELENS_WEIGHTS, tensors)
        if exact:
            note = "routesae tensors that SAELens holds only inexactly; SAELens ignores this file"
            write_safetensors(out / EXACT_FILE, exact, {"note": note})
        write_json(out / SAELENS_CONFIG, cfg)  # last: a directory with a cfg.json has its weights

    def check(self, sae: SAE) -> None:
        """Refuse, with the reason, what SAELens's architecture cannot compute exactly. Default: nothing."""

    def fields(self, sae: SAE) -> dict[str, Any]:
        """The SAELens config fields of this architecture beyond the shared ones (TopK's ``k``). Default: none."""
        return {}

    def to_saelens(self, sae: SAE) -> dict[str, Tensor]:
        """SAELens's state dict for ``sae``: the shared tensors, W_enc transposed."""
        state = sae.state_dict()
        return {name: (state[name].T if name == "W_enc" else state[name]).detach().contiguous() for name in self.shared}

    def exact_tensors(self, sae: SAE) -> dict[str, Tensor]:
        """routesae tensors that the SAELens ones give back only inexactly (for ``routesae_exact.safetensors``)."""
        return {}

    def saelens_config(self, sae: SAE, config: dict[str, Any]) -> dict[str, Any]:
        """``cfg.json`` for ``sae``, after every check (all reasons at once): the checks run before anything is written."""
        problems = [] if sae.cfg.normalize in NORMALIZATIONS else [TOKEN_NORMALIZE_REFUSAL]
        try:
            self.check(sae)
        except RouteSAEError as e:
            problems.append(str(e))
        if problems:
            raise RouteSAEError(f"{config.get('name', sae.name)} cannot be written as a SAELens SAE: " + "; and ".join(problems))
        dtypes = {t.dtype for t in sae.state_dict().values() if t.is_floating_point()}
        if dtypes != {torch.float32}:
            raise RouteSAEError(f"SAELens export writes float32 SAEs; this one holds {sorted(map(str, dtypes))}")
        layer = sae.layers[0]
        return {
            "d_in": sae.d_model,
            "d_sae": sae.cfg.latent_size,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": NORMALIZATIONS[sae.cfg.normalize],
            "reshape_activations": "none",
            "metadata": saelens_metadata(layer, config),
            "architecture": self.saelens_architecture,
            **self.fields(sae),
        }

    # -- import ---------------------------------------------------------------------------------
    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """routesae settings from this architecture's SAELens fields; refuse fields it cannot follow. Default: none."""
        return {}

    def from_saelens(self, tensors: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, Tensor]:
        """routesae's state dict from SAELens's tensors (and ``routesae_exact.safetensors``'s, possibly empty)."""
        return {name: (tensors[name].T if name == "W_enc" else tensors[name]).contiguous() for name in self.shared}

    def fold_input_bias(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """SAELens tensors of an SAE with ``apply_b_dec_to_input`` false, rewritten for one that subtracts b_dec first.

        x W_enc + b = (x − b_dec) W_enc + (b + b_dec W_enc), so b_dec W_enc joins each input bias
        (computed in float64, rounded once): equal within float rounding, not bit for bit.
        """
        shift_F = tensors["b_dec"].double() @ tensors["W_enc"].double()
        folded = dict(tensors)
        for name in self.input_biases:
            folded[name] = (tensors[name].double() + shift_F).to(tensors[name].dtype)
        return folded


def saelens_metadata(layer: int, config: dict[str, Any]) -> dict[str, Any]:
    """``cfg.json``'s metadata: SAELens's keys for what it records (model, hook, context size, BOS, dataset) and
    routesae's own config under :data:`METADATA_KEY`; a directory read from SAELens keeps its own metadata."""
    model, data = config.get("model") or {}, config.get("data") or {}
    source = config.get("source") or {}
    keep_bos = data.get("keep_bos")
    known = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": model.get("spec"),
        "hook_name": HOOK_POST.format(layer=layer),
        "hook_head_index": None,
        "context_size": data.get("context_length"),
        "prepend_bos": data.get("has_bos"),
        # routesae drops position 0 (the attention sink) unless --keep-bos: SAELens's slice of kept positions
        "seqpos_slice": None if keep_bos is None else ([None] if keep_bos else [1, None]),
        "dataset_path": data.get("source"),
    }
    metadata = {key: value for key, value in known.items() if value is not None or key == "hook_head_index"}
    original = dict((source.get("cfg") or {}).get("metadata") or {}) if source.get("format") == "saelens" else {}
    original.pop(METADATA_KEY, None)
    metadata = {**metadata, **original}
    metadata[METADATA_KEY] = {key: value for key, value in config.items() if key not in LOCAL_KEYS}
    return metadata
