"""The architecture contract: what the kernel (trainer, evaluator, steering) needs from an SAE.

An architecture is an ``nn.Module`` subclass of :class:`SAE` with a ``name`` (its registry key)
and a ``Config`` dataclass. The kernel hands it raw residual-stream activations
``acts_NLD`` (N tokens, the L layers it reads, D model width) and gets back an
:class:`SAEOutput`; everything else (normalisation, routing, sparsity) is the architecture's
business. Single-layer architectures subclass :class:`SingleLayerSAE`, which owns the usual
encoder/decoder parameters, the per-token standardisation of the reference and the forward pass:
an architecture defines its pre-activations, activation, decode and loss terms, not ``forward``.
The trainer passes what it knows (the step, the dead latents) to :meth:`SAE.loss` as a
:class:`TrainingState`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from routesae.architectures.codes import SparseCodes
from routesae.config import Config, SettingInfo, config_settings, setting
from routesae.errors import ConfigError, PluginError, RouteSAEError

STANDARDIZE_EPS = 1e-6  # the reference's epsilon in (h - mu) / (sigma + eps)
STATISTICS_ROWS = 256  # (token, layer) vectors per chunk of the standardisation statistics: a small centred copy
LAYER_NORM_EPS = 1e-5  # SAELens's layer_norm: (h - mu) / (sigma + 1e-5) in, x * sigma + mu out

#: Per normalisation mode, (eps added to σ on the way in, eps added to σ on the way out).
NORMALIZE_EPS: dict[str, tuple[float, float]] = {
    "token": (STANDARDIZE_EPS, STANDARDIZE_EPS),
    "layer_norm": (LAYER_NORM_EPS, 0.0),
}


@dataclass
class SAEConfig(Config):
    """Settings every architecture has."""

    latent_size: int = setting(4096, "Number of latents in the dictionary.")
    normalize: Literal["token", "layer_norm", "none"] = setting(
        "token",
        "Input normalisation: 'token' standardises each token's activation per layer, (h-mean)/(std+1e-6), "
        "as the reference does; 'layer_norm' is SAELens's convention, (h-mean)/(std+1e-5) in and x*std+mean "
        "out, which `routesae export --format saelens` writes exactly; 'none' feeds the raw residual stream.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_size <= 0:
            raise ConfigError(f"latent_size must be positive, got {self.latent_size}")

    def resolved_layers(self) -> tuple[int, ...]:
        """The 0-based blocks whose outputs this SAE reads (after :meth:`resolve`)."""
        raise NotImplementedError

    def resolve(self, n_layers: int) -> SAEConfig:
        """Fill model-dependent defaults (e.g. the layer) and check them against the model."""
        raise NotImplementedError

    def name_parts(self) -> list[str]:
        """Short tags that make a default SAE name readable, e.g. ``["L21", "k32", "F4096"]``."""
        layers = self.resolved_layers()
        span = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        return [f"L{span}", f"F{self.latent_size}"]


def default_single_layer(n_layers: int) -> int:
    """Block ⌊3n/4⌋−1: the top of the reference's routed range (block 11 of 16, 21 of 30)."""
    return max(0, (3 * n_layers) // 4 - 1)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} is outside the model: it has {n_layers} blocks, numbered 0 to {n_layers - 1} "
            "(block i's output is Hugging Face hidden_states[i+1])"
        )


@dataclass
class SingleLayerConfig(SAEConfig):
    layer: int | None = setting(
        None,
        "Block whose output the SAE reads, 0-based (block i = HF hidden_states[i+1]; the reference's 1-based "
        "--layer 12 is our 11). Default: block floor(3n/4)-1.",
    )

    def resolved_layers(self) -> tuple[int, ...]:
        if self.layer is None:
            raise ConfigError("layer is not set; call resolve(n_layers) first")
        return (self.layer,)

    def resolve(self, n_layers: int) -> SingleLayerConfig:
        layer = default_single_layer(n_layers) if self.layer is None else self.layer
        check_layer(layer, n_layers)
        return self.replace(layer=layer)


def default_layer_range(n_layers: int) -> tuple[int, int]:
    """The reference's routed blocks, ⌊n/4⌋−1 … ⌊3n/4⌋−1 (3..11 of 16 blocks, 6..21 of 30), inclusive."""
    return max(0, n_layers // 4 - 1), default_single_layer(n_layers)


def parse_layer_range(text: str) -> tuple[int, int]:
    """``"6:21"`` -> (6, 21), inclusive at both ends."""
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"layers must look like A:B (first and last block, inclusive), got {text!r}") from None
    if first > last:
        raise ConfigError(f"layers {text!r}: the first block must not come after the last")
    return first, last


@dataclass
class MultiLayerConfig(SAEConfig):
    """Settings of an SAE that reads a contiguous range of blocks (RouteSAE, Crosscoder)."""

    layers: str | None = setting(
        None,
        "Blocks to read as A:B, 0-based and inclusive. Default: the reference's range floor(n/4)-1 : floor(3n/4)-1.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            parse_layer_range(self.layers)

    def resolved_layers(self) -> tuple[int, ...]:
        if self.layers is None:
            raise ConfigError("layers are not set; call resolve(n_layers) first")
        first, last = parse_layer_range(self.layers)
        return tuple(range(first, last + 1))

    def resolve(self, n_layers: int) -> MultiLayerConfig:
        first, last = default_layer_range(n_layers) if self.layers is None else parse_layer_range(self.layers)
        check_layer(first, n_layers)
        check_layer(last, n_layers)
        return self.replace(layers=f"{first}:{last}")


@dataclass
class Standardization:
    """Per-token, per-layer (mean, std) used to map SAE space back to the residual stream.

    ``eps_in``/``eps_out`` are added to σ on the way in and out (:data:`NORMALIZE_EPS`): the
    reference uses 1e-6 both ways; SAELens's ``layer_norm`` 1e-5 in and nothing out.
    """

    mean: Tensor  # [N, L, 1]
    std: Tensor  # [N, L, 1]
    eps_in: float = STANDARDIZE_EPS
    eps_out: float = STANDARDIZE_EPS

    def undo(self, x_NLD: Tensor) -> Tensor:
        return x_NLD * (self.std + self.eps_out) + self.mean


def token_statistics(acts_NLD: Tensor) -> Standardization:
    """Per-token, per-layer mean and Bessel-corrected std over the model width, as the reference standardises.

    Two passes, the norm of h − μ, as ``Tensor.std`` computes it and as exactly, but over
    ``STATISTICS_ROWS`` (token, layer) vectors at a time: ``Tensor.std``'s CPU kernel over the last
    dimension is 5x slower, and the centred copy of a whole 16-layer batch would neither stay in cache
    nor be small (docs/speed.md). One pass over Σh² − D·μ² would be faster still but loses precision
    where the mean dwarfs the spread.
    """
    width = acts_NLD.shape[-1]
    mean = acts_NLD.mean(-1, keepdim=True)
    vectors_R1D, means_R11 = acts_NLD.reshape(-1, 1, width), mean.reshape(-1, 1, 1)  # [R, 1, D]: the fast kernel's shape
    norms = [torch.linalg.vector_norm(rows - row_means, dim=-1, keepdim=True)
             for rows, row_means in zip(vectors_R1D.split(STATISTICS_ROWS), means_R11.split(STATISTICS_ROWS))]
    std = torch.cat(norms).view_as(mean) / math.sqrt(width - 1) if norms else mean.clone()
    return Standardization(mean, std)


def standardize(acts_NLD: Tensor, mode: str) -> tuple[Tensor, Standardization | None]:
    """Per-token standardisation over the model width, as in the reference (Bessel-corrected std).

    ``"layer_norm"`` follows SAELens's steps exactly (the std of the centred activations, ε = 1e-5),
    so an exported SAE computes in SAELens what it computes here.
    """
    if mode == "none":
        return acts_NLD, None
    eps_in, eps_out = NORMALIZE_EPS[mode]
    if mode == "layer_norm":  # SAELens's steps (Tensor.std of the centred activations), not token_statistics
        mean = acts_NLD.mean(-1, keepdim=True)
        centred = acts_NLD - mean
        std = centred.std(-1, keepdim=True)
        return centred / (std + eps_in), Standardization(mean, std, eps_in, eps_out)
    norm = token_statistics(acts_NLD)
    return (acts_NLD - norm.mean) / (norm.std + eps_in), norm


class StandardizedLayers:
    """``standardize(acts_NLD)`` without the standardised copy: x_l = (h_l − μ_l) / (σ_l + ε), computed on demand.

    Routing reads a token's layers only through weighted sums over layers (aggregations, soft
    routing) and one layer per token (hard routing, splicing). Both follow from the raw
    activations and the per-(token, layer) statistics, so a routed SAE never holds a second
    ``[N, L, D]`` tensor beside its input: for 2,048 tokens of 16 SmolLM2 layers that copy, and
    the subtraction's temporary before it, are 75 MB each. :meth:`materialize` is there for
    routers that need arbitrary operations.
    """

    def __init__(self, acts_NLD: Tensor, mode: str, blocks: Sequence[int] | None = None) -> None:
        """``blocks``: the model blocks the L layers are (what a router that names a block reads); default 0..L-1."""
        self.raw_NLD = acts_NLD
        self.blocks = tuple(blocks) if blocks is not None else tuple(range(acts_NLD.shape[1]))
        self.norm = None
        if mode != "none":
            stats = token_statistics(acts_NLD)
            self.norm = Standardization(stats.mean, stats.std, *NORMALIZE_EPS[mode])

    @property
    def n_layers(self) -> int:
        return self.raw_NLD.shape[1]

    def weighted_sum(self, weights_NL: Tensor) -> Tensor:
        """Σ_l w_l x_l ``[N, D]``, differentiable in the weights, in the activations' precision (also under autocast)."""
        weights_NL = weights_NL.to(self.raw_NLD.dtype)
        with torch.autocast(self.raw_NLD.device.type, enabled=False):
            if self.norm is None:
                return torch.einsum("nl,nld->nd", weights_NL, self.raw_NLD)
            scale_NL = weights_NL / (self.norm.std[..., 0] + self.norm.eps_in)
            shift_N1 = (scale_NL * self.norm.mean[..., 0]).sum(-1, keepdim=True)
            return torch.einsum("nl,nld->nd", scale_NL, self.raw_NLD) - shift_N1

    def select(self, index_N: Tensor) -> Tensor:
        """x at layer ``index_N[n]`` for each token n, ``[N, D]``: bit-identical to the materialised tensor's rows."""
        rows = torch.arange(self.raw_NLD.shape[0], device=self.raw_NLD.device)
        picked_ND = self.raw_NLD[rows, index_N]
        if self.norm is None:
            return picked_ND
        return (picked_ND - self.norm.mean[rows, index_N]) / (self.norm.std[rows, index_N] + self.norm.eps_in)

    def materialize(self) -> Tensor:
        """All of x, ``[N, L, D]`` (what :func:`standardize` returns)."""
        if self.norm is None:
            return self.raw_NLD
        return (self.raw_NLD - self.norm.mean) / (self.norm.std + self.norm.eps_in)


@dataclass
class SAEOutput:
    """What one forward pass produced; ``target`` and ``x_hat`` live in the SAE's input space.

    ``pre`` are the pre-activations ``[N, F]`` the latents were made from, so that a loss term
    on them (AuxK, JumpReLU's L0, Gated's gate terms) needs no forward of its own: W_enc(x − b_dec)
    + b_enc for TopK, Vanilla, JumpReLU and BatchTopK, Gated's shared h = W_gate(x − b_dec), the
    Crosscoder's joint pre-activation, RouteSAE's inner's. It is None where an architecture has
    none to give: TopK's sparse encoder path (:class:`~routesae.architectures.topk.TopKEncode`,
    TopK without AuxK where it pays) keeps only the top k per token, because holding the dense
    pre-activations as well made its training steps slower and larger.
    """

    latents: Tensor  # [N, F] (dense; zeros where inactive); [N·L, F] for an SAE with L vectors per token (MLSAE)
    x_hat: Tensor  # same shape as target
    target: Tensor  # what x_hat reconstructs (the normalised input; the routed input for RouteSAE)
    pre: Tensor | None = None  # [N, F], see above
    norm: Standardization | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    # The latents as K (values, indices) per token where the architecture keeps a fixed number per token (TopK and
    # what derives from it; RouteSAE passes its inner's on): loss terms decode subsets of them sparsely. None otherwise,
    # and whenever an inference override or a latent edit is set (then the latents are what counts).
    codes: SparseCodes | None = None


class Encoded(NamedTuple):
    """A single-layer SAE's encoding of its standardised input (:meth:`SingleLayerSAE.encode_output`)."""

    pre: Tensor | None  #: ``SAEOutput.pre``
    latents: Tensor  #: ``SAEOutput.latents``
    x_hat: Tensor  #: ``SAEOutput.x_hat``
    codes: SparseCodes | None = None  #: ``SAEOutput.codes``
    extras: dict[str, Tensor] | None = None  #: ``SAEOutput.extras``: what the loss reads besides (a fast path's by-products)


@dataclass(frozen=True)
class TrainingState:
    """What the trainer knows that a loss may use (like SAELens' TrainStepInput)."""

    step: int = 0
    # bool [F]: latents that have not fired for TrainConfig.dead_after_tokens training tokens; None outside training
    dead_F: Tensor | None = None


NO_TRAINING_STATE = TrainingState()


@dataclass(frozen=True)
class Inference:
    """An inference-time sparsity override (docs/reference.md §3.8): it replaces the trained activation.

    ``k``: z = TopK_k(a), the k largest pre-activations **with their signed values** (as the
    reference, whatever the trained activation: ReLU, JumpReLU, TopK with ``relu``).
    ``theta``: z = a · 1[a > θ], one global threshold for every latent. Neither: no override.
    Both at once is an error, as in the reference. It lets one trained SAE be read at other
    sparsities (an L0 sweep without retraining) in ``evaluate`` and, through the same
    :meth:`SAE.inference`, anything else that encodes.

    Per architecture, ``a`` is W_enc(x − b_dec) + b_enc for TopK, Vanilla, JumpReLU and
    BatchTopK (the override replaces TopK / ReLU / JumpReLU / the batch rule or its threshold),
    the joint pre-activation Σ_l W_enc[:, l] x_l + b_enc for the Crosscoder, and the inner SAE's
    for RouteSAE (routing is untouched). Gated refuses them: its latents follow from its
    pre-activation through two paths (gate and magnitude), so no one value both selects and sets them.
    """

    k: int | None = None
    theta: float | None = None

    def __post_init__(self) -> None:
        if self.k is not None and self.theta is not None:
            raise ConfigError("--infer-k and --theta exclude each other: give at most one")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise ConfigError(f"infer_k must be a positive integer, got {self.k!r}")
        if self.theta is not None and not math.isfinite(self.theta):
            raise ConfigError(f"theta must be a finite number, got {self.theta!r}")

    @property
    def active(self) -> bool:
        return self.k is not None or self.theta is not None

    def apply(self, pre_NF: Tensor) -> Tensor:
        """The override's latents from pre-activations ``[N, F]`` (only call when :attr:`active`)."""
        if self.theta is not None:
            return torch.where(pre_NF > self.theta, pre_NF, 0.0)
        values, indices = pre_NF.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_NF).scatter(-1, indices, values)


NO_INFERENCE = Inference()

LatentEdit = Callable[[Tensor], Tensor]
"""Maps latents ``[N, F]`` to the latents to decode instead (steering's clamps)."""


def normalized_mse(x_hat: Tensor, target: Tensor) -> Tensor:
    """Mean over vectors of ||x_hat - x||² / ||x||² (the reference's NMSE, per vector then averaged)."""
    err = (x_hat - target).pow(2).mean(-1)
    return (err / target.pow(2).mean(-1).clamp_min(torch.finfo(target.dtype).tiny)).mean()


class SAE(nn.Module):
    """Base class of every architecture. See the module docstring for the contract.

    Inference overrides: inside ``with sae.inference(Inference(k=64)):`` every encoding path
    (``forward``, ``encode``) sparsifies through :meth:`sparsify`, which uses
    the override instead of the trained :meth:`activation`. It applies whenever set, in train or
    eval mode; the trainer never sets it, so training is unaffected. An architecture whose
    pre-activations an override cannot replace sets ``supports_inference = False``.

    Latent edits: inside ``with sae.edit_latents(fn):`` every path that produces latents
    (``forward``, ``encode``, and so ``reconstruction``) passes them through ``fn`` before
    decoding, so ``out.latents`` are the edited latents and ``x_hat`` decodes them. The kernel
    steers any architecture through this alone, without knowing its internals. :meth:`sparsify`
    applies it; an architecture that makes latents some other way calls :meth:`apply_latent_edit`
    itself, and one with a sparse decode decodes densely while an edit is set (an edit may switch
    on latents the sparse selection did not keep).

    Loss: :meth:`loss` is NMSE plus the architecture's :meth:`loss_terms`, logged with its
    :meth:`diagnostics` and L0; an architecture defines those two rather than ``loss``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[SAEConfig]] = SAEConfig
    supports_inference: ClassVar[bool] = True
    checkpoint: dict[str, Any] | None = None  # the config.json it was loaded from (model, hooks, data, training)

    def __init__(self, cfg: SAEConfig, d_model: int) -> None:
        super().__init__()
        if not isinstance(cfg, self.Config):
            raise ConfigError(f"{self.name} needs a {self.Config.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self.d_model = d_model
        self.inference_override = NO_INFERENCE
        self.latent_edit: LatentEdit | None = None

    @contextmanager
    def inference(self, override: Inference) -> Iterator[None]:
        """Encode with ``override`` instead of the trained activation inside the ``with`` block.

        Raises :class:`ConfigError` if this architecture does not support overrides or if
        ``k`` exceeds the latent size (the reference clamps with a warning; an error keeps a
        typo from silently measuring a dense SAE).
        """
        if override.active and not self.supports_inference:
            raise ConfigError(f"{self.name} does not support --infer-k or --theta (the reference ignores them for it)")
        if override.k is not None and override.k > self.cfg.latent_size:
            raise ConfigError(f"infer_k={override.k} exceeds {self.name}'s latent size {self.cfg.latent_size}")
        previous, self.inference_override = self.inference_override, override
        try:
            yield
        finally:
            self.inference_override = previous

    @contextmanager
    def edit_latents(self, edit: LatentEdit) -> Iterator[None]:
        """Pass every latent this SAE produces through ``edit`` inside the ``with`` block (see the class docstring).

        The edit replaces any edit already set (restored on exit); it never applies in training,
        because the trainer never sets one.
        """
        previous, self.latent_edit = self.latent_edit, edit
        try:
            yield
        finally:
            self.latent_edit = previous

    def apply_latent_edit(self, latents_NF: Tensor) -> Tensor:
        """``latents_NF`` through the edit set by :meth:`edit_latents`, or unchanged when none is."""
        return latents_NF if self.latent_edit is None else self.latent_edit(latents_NF)

    def routed_blocks(self, out: SAEOutput) -> Tensor | None:
        """Per token of ``out``, the block its latents were read at (``[N]`` long), or None when they span several.

        A single-layer SAE reads its one block; RouteSAE the block its router chose per token; a
        Crosscoder's latents belong to no single block. Contexts record it beside each activation.
        """
        if len(self.layers) != 1:
            return None
        return torch.full((out.latents.shape[0],), self.layers[0], dtype=torch.long, device=out.latents.device)

    @property
    def vectors_per_token(self) -> int:
        """Rows of ``SAEOutput.latents``, ``x_hat`` and ``target`` per token: 1, or the MLSAE's one per block it reads."""
        return 1

    def splice_views(self) -> dict[int, SAE] | None:
        """Per block, an SAE that splices this one at that block alone, for an SAE evaluated one block at a time (the
        MLSAE reads every block of its range but is spliced into one at a time); None: it is spliced as a whole."""
        return None

    def steering_caveat(self) -> str | None:
        """Why a clamp on this SAE's latents has no single block to act on, or None when it has.

        Steering refuses an SAE that returns a reason unless the user accepts the approximation
        (RouteSAE with soft routing: its latents encode a mix of blocks).
        """
        return None

    def activation(self, pre_NF: Tensor) -> Tensor:
        """The architecture's trained sparsifying nonlinearity (ReLU, TopK, JumpReLU, ...)."""
        raise NotImplementedError

    def sparsify(self, pre_NF: Tensor) -> Tensor:
        """Latents from pre-activations: the inference override when one is set, else :meth:`activation`; then the edit."""
        override = self.inference_override
        return self.apply_latent_edit(override.apply(pre_NF) if override.active else self.activation(pre_NF))

    @classmethod
    def check_contract(cls) -> None:
        """Called at registration so a broken plugin fails at load time, not mid-training."""
        if not cls.name:
            raise PluginError(f"{cls.__qualname__} has no name")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, SAEConfig)):
            raise PluginError(f"{cls.name}: Config must subclass routesae.SAEConfig")
        if issubclass(cls, SingleLayerSAE):  # the template's forward sparsifies through activation
            required = ("activation",) if cls.forward is SingleLayerSAE.forward else ()
        else:
            required = ("forward", "reconstruction", "encode_standardized", "decode_standardized")
        missing = [m for m in required if getattr(cls, m) is getattr(SAE, m)]
        if missing:
            raise PluginError(f"{cls.__name__} does not define {', '.join(missing)}, which it must")

    @classmethod
    def setting_names(cls) -> set[str]:
        """Settings (CLI options, config keys) this architecture accepts; composites add their parts'."""
        return {f.name for f in dataclasses.fields(cls.Config)}

    @classmethod
    def accepts(cls, settings: dict[str, Any]) -> set[str]:
        """The settings this architecture takes when it is given ``settings``; a composite's depend on its parts
        (RouteSAE takes ``l1`` with ``inner="vanilla"``, not with TopK). Default: :meth:`setting_names`."""
        return cls.setting_names()

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        """Each setting with its type, default and help, as the command line offers them; composites add their parts'."""
        return config_settings(cls.Config)

    def plugins_used(self) -> list[tuple[str, str]]:
        """The registered plugins this SAE is built from, as (kind, name): checkpoints record who provides each."""
        return [("architecture", self.name)]

    @classmethod
    def build_config(cls, settings: dict[str, Any]) -> SAEConfig:
        """The config for ``settings`` (a subset of :meth:`setting_names`); composites route keys to parts."""
        return cls.Config.from_dict(settings)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.cfg.resolved_layers()

    def decoder_directions(self) -> list[nn.Parameter]:
        """Parameters ``[F, D]`` whose rows are latents' output directions (kept at unit norm)."""
        return []

    def latent_directions(self) -> Tensor | None:
        """``[F, D]``: each latent's output direction in the residual stream, for the logit lens; None when it has none.

        Directions live in the SAE's (per-token standardised) input space, so in the residual stream they hold up to
        each token's scale: a direction, not a vector. Default: the first of :meth:`decoder_directions` — its rows as
        they are when it is ``[F, D]`` (single-layer SAEs, RouteSAE's inner SAE), the last block it reads when it is
        ``[F, L, D]`` (a crosscoder: the block nearest the unembedding); None for any other shape.
        """
        directions = self.decoder_directions()
        if not directions:
            return None
        W = directions[0]
        F, D = self.cfg.latent_size, self.d_model
        if W.shape == (F, D):
            return W
        if W.ndim == 3 and W.shape[0] == F and W.shape[2] == D:
            return W[:, -1]
        return None

    def statistics(self) -> dict[str, Any]:
        """JSON-able training statistics for the checkpoint and reporters.

        A ``{label: number}`` dict is a histogram (RouteSAE's ``routing_counts``, keyed by block),
        which reporters draw as a bar chart.
        """
        return {}

    def forward(self, acts_NLD: Tensor) -> SAEOutput:
        raise NotImplementedError

    def loss(self, out: SAEOutput, state: TrainingState = NO_TRAINING_STATE) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss, NMSE + each of :meth:`loss_terms`, and the terms to log.

        Logged: ``nmse``, each loss term as it enters the loss (so ``loss`` is their sum), the
        :meth:`diagnostics`, then ``l0``.
        """
        nmse = normalized_mse(out.x_hat, out.target)
        terms = self.loss_terms(out, state)
        total = nmse
        for term in terms.values():
            total = total + term
        logged = {"nmse": nmse.detach(), **{name: term.detach() for name, term in terms.items()}}
        return total, {**logged, **self.diagnostics(out, state), "l0": l0(out.latents)}

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """Scalars the loss adds to the NMSE (sparsity penalties, auxiliary losses), by logged name. Default: none."""
        return {}

    def diagnostics(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """Scalars logged beside the loss but not part of it (a dead fraction, a threshold). Default: none."""
        return {}

    def reconstruction(self, out: SAEOutput) -> dict[int, tuple[Tensor, Tensor]]:
        """{block: (x_hat_ND in the residual stream, mask_N of tokens to replace)} for splicing."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Hook for per-step bookkeeping (thresholds, statistics). Default: nothing."""

    def training_sums(self) -> list[Tensor]:
        """Buffers that add up over training tokens (RouteSAE's routing counts). Default: none.

        Under ``torchrun`` each rank adds its own tokens; the trainer sums the ranks' shares before
        the buffers are saved or reported, so they hold what one process would have counted.
        """
        return []

    @classmethod
    def upgrade(cls, config: dict[str, Any], state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(config, state dict) of a checkpoint written by an earlier routesae, in this version's form.

        ``config`` is the architecture's settings (``config.json``'s ``"config"``), ``state_dict``
        the saved weights; :func:`~routesae.checkpoint.load_sae` passes both through here before
        building the SAE, so an architecture that drops or renames a setting or a buffer keeps its
        old checkpoints loadable. Default: both unchanged.
        """
        return config, state_dict

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each latent's decoder direction to unit norm."""
        for W_FD in self.decoder_directions():
            W_FD.div_(W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the gradient component along each (unit) decoder direction, which renormalisation would undo."""
        for W_FD in self.decoder_directions():
            if W_FD.grad is not None:
                W_FD.grad -= (W_FD.grad * W_FD).sum(-1, keepdim=True) * W_FD

    def encode_standardized(self, x: Tensor) -> Tensor:
        """Latents of ``x`` in the SAE's input space — standardised (and, for RouteSAE, routed) as ``SAEOutput.target``."""
        raise NotImplementedError

    def decode_standardized(self, latents: Tensor) -> Tensor:
        """Reconstruction in the SAE's input space (shaped like ``SAEOutput.x_hat``, standardised)."""
        raise NotImplementedError

    def encode(self, acts: Tensor) -> Tensor:
        """Latents of raw residual-stream activations, exactly as :meth:`forward` makes them.

        ``acts`` is what the hooks give: ``[N, D]`` for an SAE on one block (or ``[N, 1, D]``), ``[N, L, D]`` for one
        reading several. This is what a SAELens user passes to ``sae.encode``; the standardised-space version is
        :meth:`encode_standardized`.
        """
        return self.forward(self._as_NLD(acts)).latents

    def decode(self, latents: Tensor, acts: Tensor) -> Tensor:
        """``latents`` decoded into residual-stream units: ``[N, D]`` (a RouteSAE's at each token's routed block) or
        ``[N, L, D]`` (a crosscoder's).

        Per-token standardisation is undone with the mean and std of ``acts``, the raw activations the latents
        were read from, and a router routes as it did on them; a decode without them can only give the
        standardised reconstruction, :meth:`decode_standardized`.
        """
        acts_NLD = self._as_NLD(acts)
        with self.edit_latents(lambda _: latents):  # every path that makes latents makes these (RouteSAE's reconstruction too)
            out = self.forward(acts_NLD)
            reconstruction = self.reconstruction(out)
        if self.routed_blocks(out) is not None:  # one block per token: the same rows under each block's mask
            x_hat_ND = torch.zeros_like(acts_NLD[:, 0])
            for x_hat, mask in reconstruction.values():
                x_hat_ND = torch.where(mask[:, None], x_hat, x_hat_ND)
            return x_hat_ND
        return torch.stack([x_hat for x_hat, _ in reconstruction.values()], dim=1)

    def _as_NLD(self, acts: Tensor) -> Tensor:
        if acts.ndim == 2 and len(self.layers) == 1:
            return acts[:, None]
        if acts.ndim != 3 or acts.shape[1] != len(self.layers) or acts.shape[2] != self.d_model:
            raise RouteSAEError(
                f"{self.name} reads {len(self.layers)} block(s) {list(self.layers)} of width {self.d_model}: give "
                f"activations [N, {len(self.layers)}, {self.d_model}]"
                + (f" or [N, {self.d_model}]" if len(self.layers) == 1 else "") + f", not {list(acts.shape)}"
            )
        return acts


def l0(latents_NF: Tensor) -> Tensor:
    """Mean active latents per token (one counting kernel: comparing, then summing per row, took 7x as long)."""
    rows = latents_NF.numel() // latents_NF.shape[-1]
    return (torch.count_nonzero(latents_NF) / rows).detach()


class SingleLayerSAE(SAE):
    """An SAE on one block: W_enc/W_dec [F, D], b_enc [F], b_dec [D], and the forward pass every such SAE runs.

    Initialised as in the reference: encoder with PyTorch's Linear default, decoder a copy of it
    (tied init), unit-norm decoder rows, zero biases.

    ``forward`` and ``loss`` are a template: standardise x, pre-activations, latents, x̂, then
    NMSE plus the loss terms. A subclass defines :meth:`activation` and, where it differs from the
    default, :meth:`preactivations`, :meth:`decode`, :meth:`~SAE.loss_terms` and
    :meth:`~SAE.diagnostics`. A faster path overrides :meth:`activate_decode` (a sparse decode)
    or :meth:`encode_decode` (an encoder that never builds the dense pre-activations); one that keeps
    a fixed number of latents per token overrides :meth:`encode_output`, which gives them as
    :class:`SparseCodes` too, and whatever else the loss will want (``extras``) from the same work.
    TopK does, so an architecture derived from it inherits all of them.
    """

    Config: ClassVar[type[SAEConfig]] = SingleLayerConfig

    def __init__(self, cfg: SingleLayerConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        F, D = cfg.latent_size, d_model
        bound = 1 / math.sqrt(D)
        self.W_enc = nn.Parameter(torch.empty(F, D).uniform_(-bound, bound))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(D))
        self.normalize_decoder()

    def preactivations(self, x_ND: Tensor) -> Tensor:
        """``[N, F]``, what :meth:`activation` sparsifies (and ``SAEOutput.pre``): W_enc(x − b_dec) + b_enc."""
        return (x_ND - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode_standardized(self, x_ND: Tensor) -> Tensor:
        return self.sparsify(self.preactivations(x_ND))

    def decode_standardized(self, latents_NF: Tensor) -> Tensor:
        return latents_NF @ self.W_dec + self.b_dec

    def encode_decode(self, x_ND: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """(pre-activations, latents, x_hat) of ``x_ND``; a fast path may give no pre-activations (None)."""
        pre_NF = self.preactivations(x_ND)
        return (pre_NF, *self.sparsify_decode(pre_NF))

    def encode_output(self, x_ND: Tensor) -> Encoded:
        """What :meth:`forward` returns but the target and the standardisation: :meth:`encode_decode`'s, and where an
        architecture keeps a fixed number of latents per token (TopK overrides this) the codes and extras too."""
        return Encoded(*self.encode_decode(x_ND))

    def sparsify_decode(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(latents, x_hat) from pre-activations: with an override or an edit set, :meth:`sparsify` densely
        decoded, else :meth:`activate_decode` (which may decode sparsely)."""
        if self.inference_override.active or self.latent_edit is not None:
            z = self.sparsify(pre_NF)
            return z, self.decode_standardized(z)
        return self.activate_decode(pre_NF)

    def activate_decode(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(latents, x_hat) through the trained activation; an architecture with a faster sparse decode overrides this."""
        z = self.activation(pre_NF)
        return z, self.decode_standardized(z)

    def forward(self, acts_NLD: Tensor) -> SAEOutput:
        x_NLD, norm = standardize(acts_NLD, self.cfg.normalize)
        x_ND = x_NLD[:, 0]
        pre_NF, z_NF, x_hat_ND, codes, extras = self.encode_output(x_ND)
        return SAEOutput(latents=z_NF, x_hat=x_hat_ND, target=x_ND, pre=pre_NF, norm=norm, extras=extras or {}, codes=codes)

    def reconstruction(self, out: SAEOutput) -> dict[int, tuple[Tensor, Tensor]]:
        x_hat = out.x_hat[:, None]
        if out.norm is not None:
            x_hat = out.norm.undo(x_hat)
        mask = torch.ones(x_hat.shape[0], dtype=torch.bool, device=x_hat.device)
        return {self.layers[0]: (x_hat[:, 0], mask)}

    def decoder_directions(self) -> list[nn.Parameter]:
        return [self.W_dec]
