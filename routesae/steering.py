"""Steering: clamp SAE latents while the language model generates, and compare with the unclamped text.

For every architecture alike (plugins included), through :meth:`SAE.edit_latents` only. At each
generation step the whole sequence so far goes through:

1. a clean capture of the blocks the SAE reads (routing decisions come from it, as in evaluation);
2. the SAE on those activations, plain and with the clamps as a latent edit, giving per block
   ``plain`` and ``edited`` reconstructions;
3. a forward in which each block's output becomes ``resid + (edited − plain)`` at the steered
   positions the SAE reconstructs there (RouteSAE: each token's routed block only), whose last
   logits give the next token.

So the SAE's error term stays in the residual stream: with no clamps nothing changes at all, and
only the clamp's effect reaches the model. ``replace=True`` instead puts the edited
reconstruction itself in the stream (the reference's behaviour), which also adds the SAE's
reconstruction error.

Every generated token is steered, not only the prompt's forward (the reference's hooks fired on
the prefill only, §12.11). Multi-layer SAEs need all their blocks before they can edit the first,
hence the clean capture per step. An SAE that reads one block skips it: nothing upstream of its
block is edited, so the hook in step 3 sees the clean residual and computes the change itself
(one forward per step instead of about 1.7; a test checks that both ways agree). The original
continuation costs one forward per token.

No KV cache: the whole sequence is recomputed each step, O(T²) over T tokens. The TransformerLens
bridge (4.3, with transformers 5) leaves Hugging Face's cache empty (``get_seq_length() == 0``
after a cached forward), so an incremental forward attends to the new token alone and gives wrong
logits; the bridge's own ``generate(use_past_kv_cache=True)`` diverges from the uncached one.

Positions. ``"all"`` (default) steers every position but 0, the attention sink (its residual is
~100× the others' and no SAE here trained on it), so prompt and continuation both carry the clamp.
``"generation"`` steers only the positions whose logits pick new tokens: the last prompt position
and every generated one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from routesae.architectures.base import SAE, Inference, LatentEdit
from routesae.checkpoint import load_sae
from routesae.config import setting
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import read_json, write_json
from routesae.latent_scales import DEFAULT_TOKENS as DEFAULT_SCALE_TOKENS
from routesae.latent_scales import LatentScale, measure_latent_scales
from routesae.lm import Edit, LanguageModel
from routesae.loading import model_for
from routesae.locks import writing_files
from routesae.rundir import STEERING_FILE
from routesae.stage_config import StageConfig, infer_k_setting, theta_setting
from routesae.version import __version__

Op = Literal["set", "add", "mul"]
Positions = Literal["all", "generation"]
POSITIONS: tuple[str, ...] = get_args(Positions)
# LATENT = [op] VALUE; after "*" the value may carry its own sign ("*-2" flips a latent), after "+"/"-" it may not
_CLAMP = re.compile(r"^\s*(\d+)\s*=\s*(?:([+\-]?)\s*([^\s+\-*].*?)|(\*)\s*(-?[^\s+\-*].*?))\s*$")
_SYMBOL: dict[Op, str] = {"set": "", "add": "+", "mul": "*"}


@dataclass(frozen=True)
class Clamp:
    """One latent edit: ``set`` latent to value, ``add`` value (negative: subtract) or ``mul`` by value.

    Written ``LATENT=OP``: ``123=20`` sets latent 123 to 20 (the paper's "increased to 20"),
    ``123=+15`` adds 15, ``123=-15`` subtracts 15, ``123=*2`` doubles it (``123=*0`` ablates).
    """

    latent: int
    op: Op
    value: float

    def __post_init__(self) -> None:
        if self.op not in _SYMBOL:
            raise RouteSAEError(f"clamp op must be one of {', '.join(_SYMBOL)}, got {self.op!r}")
        if isinstance(self.latent, bool) or not isinstance(self.latent, int) or self.latent < 0:
            raise RouteSAEError(f"a clamp's latent must be an integer >= 0, got {self.latent!r}")
        if not math.isfinite(self.value):
            raise RouteSAEError(f"clamp on latent {self.latent}: the value must be a finite number, got {self.value}")
        if self.op == "set" and self.value < 0:  # LATENT=-V means subtract, so a negative set could not be written
            raise RouteSAEError(
                f"clamp on latent {self.latent}: set takes a value >= 0; to push a latent below zero, subtract "
                f"({self.latent}=-{-self.value:g}) or multiply by a negative number"
            )

    @classmethod
    def parse(cls, text: str) -> Clamp:
        match = _CLAMP.match(text)
        value = _number(match.group(3) or match.group(5)) if match else None
        if match is None or value is None:
            raise RouteSAEError(
                f"cannot read the clamp {text!r}: write LATENT=VALUE (set), LATENT=+VALUE (add), LATENT=-VALUE "
                "(subtract) or LATENT=*VALUE (multiply, also by a negative number: LATENT=*-2), e.g. 123=20"
            )
        latent, sign = int(match.group(1)), match.group(2)
        if match.group(4):
            return cls(latent, "mul", value)
        return cls(latent, "add", -value if sign == "-" else value) if sign else cls(latent, "set", value)

    def __str__(self) -> str:
        if self.op == "add":
            return f"{self.latent}={'-' if self.value < 0 else '+'}{abs(self.value):g}"
        return f"{self.latent}={_SYMBOL[self.op]}{self.value:g}"

    def apply(self, latents_NF: Tensor) -> None:
        """Edit column ``latent`` of ``latents_NF`` in place."""
        column = latents_NF[:, self.latent]
        if self.op == "set":
            column.fill_(self.value)
        elif self.op == "add":
            column.add_(self.value)
        else:
            column.mul_(self.value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


_RELATIVE = re.compile(r"^x(\d+(?:\.\d*)?|\.\d+)(max|typical)$")
Stat = Literal["max", "typical"]
STEERING_FORMAT = "routesae-steering"


@dataclass(frozen=True)
class Relative:
    """A clamp value measured against how the latent fires (:class:`~routesae.latent_scales.LatentScale`)."""

    factor: float
    stat: Stat

    def __str__(self) -> str:
        return f"x{self.factor:g}{self.stat}"


@dataclass(frozen=True)
class ClampSpec:
    """A clamp as written, before its values are known: values relative to the latent's own scale
    (``1234=x2max``: twice its largest activation; ``1234=+x1typical``) and sweeps (``1234=5,10,20``: one steered
    continuation per value). :meth:`clamps` turns it into plain :class:`Clamp` objects, one per value.
    """

    latent: int
    op: Op
    values: tuple[float | Relative, ...]

    @classmethod
    def parse(cls, text: str | Clamp) -> ClampSpec:
        if isinstance(text, Clamp):
            return cls(text.latent, text.op, (text.value,))
        match = re.match(r"^\s*(\d+)\s*=\s*([+\-*]?)(.*)$", text)
        if match is None or "," not in text and not _RELATIVE.match(match.group(3).strip()):
            clamp = Clamp.parse(text)  # one plain value (or unreadable: its message says how to write one)
            return cls(clamp.latent, clamp.op, (clamp.value,))
        latent, sign = int(match.group(1)), match.group(2)
        values: list[float | Relative] = []
        op: Op = "set"
        for item in (part.strip() for part in match.group(3).split(",")):
            if relative := _RELATIVE.match(item):
                if sign == "*":
                    raise RouteSAEError(f"clamp {text!r}: a relative value sets (N=x2max) or adds (N=+x1typical), "
                                        "it does not multiply; write N=*2 to double a latent")
                op = "add" if sign else "set"
                values.append(Relative(float(relative.group(1)) * (-1 if sign == "-" else 1), relative.group(2)))
            else:
                clamp = Clamp.parse(f"{latent}={sign}{item}")
                op = clamp.op
                values.append(clamp.value)
        return cls(latent, op, tuple(values))

    @property
    def relative(self) -> bool:
        return any(isinstance(v, Relative) for v in self.values)

    def clamps(self, scale: LatentScale | None = None) -> list[Clamp]:
        """One clamp per value, relative values resolved against ``scale`` (the latent's measured firing)."""
        resolved = []
        for value in self.values:
            if isinstance(value, Relative):
                if scale is None:
                    raise RouteSAEError(f"latent {self.latent}={value}: a relative value needs the latent's scale")
                base = scale.max if value.stat == "max" else scale.typical
                if base <= 0:
                    raise RouteSAEError(f"{scale.describe()}: there is no positive {value.stat} to scale a clamp by; "
                                        "give a plain value")
                value = value.factor * base
            resolved.append(Clamp(self.latent, self.op, value))
        return resolved


def sweep_clamps(specs: Sequence[ClampSpec], scales: dict[int, LatentScale]) -> list[tuple[Clamp, ...]]:
    """The clamp sets to steer with: one per value of the (at most one) swept clamp, the others fixed."""
    swept = [spec for spec in specs if len(spec.values) > 1]
    if len(swept) > 1:
        raise RouteSAEError(f"sweep one clamp at a time: latents {', '.join(str(s.latent) for s in swept)} each list "
                            "several values")
    resolved = [spec.clamps(scales.get(spec.latent)) for spec in specs]
    width = max((len(r) for r in resolved), default=1)
    return [tuple(r[i] if len(r) > 1 else r[0] for r in resolved) for i in range(width)]


def parse_clamps(clamps: Sequence[str | Clamp], latent_size: int) -> tuple[Clamp, ...]:
    """Clamps from strings or :class:`Clamp` objects, checked against the SAE's dictionary size."""
    parsed = tuple(c if isinstance(c, Clamp) else Clamp.parse(c) for c in clamps)
    seen: set[int] = set()
    for clamp in parsed:
        if clamp.latent >= latent_size:
            raise RouteSAEError(
                f"clamp {clamp}: latent {clamp.latent} is out of range; this SAE has {latent_size} latents, "
                f"numbered 0 to {latent_size - 1}"
            )
        if clamp.latent in seen:
            raise RouteSAEError(f"latent {clamp.latent} is clamped twice; give each latent at most one clamp")
        seen.add(clamp.latent)
    return parsed


def clamp_edit(clamps: Sequence[Clamp]) -> LatentEdit:
    """The latent edit applying ``clamps`` (a copy: the SAE's own latents are not touched)."""

    def edit(latents_NF: Tensor) -> Tensor:
        latents_NF = latents_NF.clone()
        for clamp in clamps:
            clamp.apply(latents_NF)
        return latents_NF

    return edit


def _identity(latents_NF: Tensor) -> Tensor:
    return latents_NF


@dataclass
class BlockChange:
    """What steering does to one block in one forward: ``[B, T, D]`` reconstructions and ``[B, T]`` positions."""

    plain_BTD: Tensor
    edited_BTD: Tensor
    where_BT: Tensor

    def edit(self, replace: bool) -> Edit:
        where_BT1 = self.where_BT[..., None]
        if replace:
            return lambda resid_BTD: torch.where(where_BT1, self.edited_BTD.to(resid_BTD.dtype), resid_BTD)
        delta_BTD = torch.where(where_BT1, self.edited_BTD - self.plain_BTD, 0.0)
        return lambda resid_BTD: resid_BTD + delta_BTD.to(resid_BTD.dtype)

    def delta_norm_BT(self) -> Tensor:
        """‖edited − plain‖ where applied, else 0: how far the clamp moves this block's residual."""
        return torch.where(self.where_BT, (self.edited_BTD - self.plain_BTD).norm(dim=-1), 0.0)


def block_changes(sae: SAE, acts_BTLD: Tensor, steer_BT: Tensor, clamps: Sequence[Clamp]) -> dict[int, BlockChange]:
    """Per block the SAE writes to: its plain and clamped reconstructions of clean ``acts_BTLD``, and where to apply them.

    ``acts_BTLD`` holds the SAE's blocks (``sae.layers``, in order). Both reconstructions go
    through an edit (the identity for ``plain``), so both take the same decode path and no clamps
    give exactly zero change. Raises if the architecture ignored the edit.
    """
    B, T = steer_BT.shape
    acts_NLD = acts_BTLD.reshape(B * T, *acts_BTLD.shape[2:])
    edit = clamp_edit(clamps)
    with torch.no_grad():
        with sae.edit_latents(_identity):
            plain_out = sae(acts_NLD)
            plain = sae.reconstruction(plain_out)
        with sae.edit_latents(edit):
            edited_out = sae(acts_NLD)
            edited = sae.reconstruction(edited_out)
    if not torch.equal(edited_out.latents, edit(plain_out.latents)):
        raise RouteSAEError(
            f"architecture {sae.name!r} does not apply latent edits (SAE.edit_latents), so its latents cannot be "
            "clamped; its forward must produce latents through sparsify() or apply_latent_edit()"
        )
    changes = {}
    for block, (plain_ND, mask_N) in plain.items():
        edited_ND = edited[block][0]
        changes[block] = BlockChange(
            plain_ND.view(B, T, -1), edited_ND.view(B, T, -1), mask_N.view(B, T) & steer_BT.to(mask_N.device)
        )
    return changes


def steered_positions(length: int, prompt_length: int, positions: Positions, device: torch.device) -> Tensor:
    """``[1, length]`` bool: which positions of a single unpadded sequence are steered (see the module docstring)."""
    if positions not in POSITIONS:
        raise RouteSAEError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    first = 1 if positions == "all" else max(1, prompt_length - 1)
    return (torch.arange(length, device=device) >= first)[None]


def steered_logits(
    lm: LanguageModel,
    sae: SAE,
    input_ids_BT: Tensor,
    steer_BT: Tensor,
    clamps: Sequence[Clamp],
    replace: bool = False,
    single_pass: bool = True,
) -> tuple[Tensor, dict[int, BlockChange]]:
    """(logits ``[B, T, V]`` of the steered forward, the block changes) for unpadded ``input_ids_BT``.

    The one step of generation, exposed so that the clamp's effect on the next-token
    distribution can be inspected directly. An SAE that reads one block needs no separate clean
    capture (``single_pass``, the default): nothing upstream of its block is edited, so the
    residual arriving there in the steered forward is the clean one, and the hook computes the
    change from it. That saves most of a forward per step; multi-layer SAEs always capture first.
    """
    mask_BT = torch.ones_like(input_ids_BT)
    if single_pass and len(sae.layers) == 1:
        changes: dict[int, BlockChange] = {}

        def edit(resid_BTD: Tensor) -> Tensor:
            changes.update(block_changes(sae, resid_BTD[:, :, None], steer_BT, clamps))
            return changes[sae.layers[0]].edit(replace)(resid_BTD)

        return lm.splice(input_ids_BT, mask_BT, {sae.layers[0]: edit}), changes
    acts_BTLD = lm.capture(input_ids_BT, mask_BT, sae.layers)
    changes = block_changes(sae, acts_BTLD, steer_BT, clamps)
    edits = {block: change.edit(replace) for block, change in changes.items()}
    return lm.splice(input_ids_BT, mask_BT, edits), changes


class Sampler:
    """Picks next tokens: greedy at temperature 0, else temperature and nucleus (top-p) sampling.

    Each continuation gets a fresh sampler from the same seed, so the original and the steered
    text draw the same random stream and differ only through the clamp.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device) -> None:
        self.greedy = temperature == 0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids_1T: Tensor, logits_V: Tensor) -> int:
        if self.greedy:
            return int(logits_V.argmax())
        scores = self.warpers(input_ids_1T, logits_V[None].float())
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


@dataclass
class SteeringResult:
    """One prompt, continued without and with the clamps.

    ``prompt`` is the text as fed (chat template applied); ``delta_norms`` has, per steered
    generation step, the summed ‖edited − plain‖ over blocks at the position that picked the
    token (0 where that position is not steered or the SAE does not write there).
    """

    prompt: str
    original: str
    steered: str
    prompt_ids: list[int]
    original_ids: list[int]
    steered_ids: list[int]
    settings: dict[str, Any]
    delta_norms: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"routesae_version": __version__, **dataclasses.asdict(self)}


def render_prompt(tokenizer: Any, prompt: str, chat: bool | None, system: str | None) -> tuple[str, list[int], bool]:
    """(text as fed, its token ids, whether the chat template was used).

    ``chat=None`` uses the template when the tokenizer has one (instruct models). A templated
    prompt is tokenised without special tokens, since the template writes its own.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat is None else chat
    if use_chat and not has_template:
        raise RouteSAEError("this model's tokenizer has no chat template; drop --chat (or chat=True) to feed the text as is")
    if system is not None and not use_chat:
        raise RouteSAEError("a system message needs the chat template; drop --system or use --chat with an instruct model")
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = prompt
        ids = tokenizer(text)["input_ids"]
    if not ids:
        raise RouteSAEError("the prompt is empty: give some text to continue")
    return text, list(ids), use_chat


@dataclass
class SteerConfig(StageConfig):
    """How to generate and where to steer: ``routesae steer``'s options and ``steer``'s settings."""

    max_new_tokens: int = setting(64, "Most tokens to generate (stops at EOS).")
    temperature: float = setting(0.7, "Sampling temperature; 0 is greedy.")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of tokens with this probability.")
    seed: int = setting(0, "Seed of both continuations (the same stream for each).")
    chat: bool | None = setting(
        None, "Wrap the prompt in the tokenizer's chat template. Default: when the tokenizer has one."
    )
    system: str | None = setting(None, "A system message for the chat template.")
    replace: bool = setting(  # as a field it hides Config.replace here: use dataclasses.replace on a SteerConfig
        False,
        "Put the clamped reconstruction itself in the residual stream (the reference), adding the SAE's error; "
        "by default only the clamp's change is added.",
    )
    positions: Positions = setting(
        "all",
        "'all': every token but position 0 (the attention sink), prompt included; 'generation': only the positions "
        "that pick new tokens.",
    )
    soft_at_argmax: bool = setting(
        False, "Steer a soft-routed RouteSAE at each token's highest-weight block, as evaluation splices it."
    )
    scale_tokens: int = setting(
        DEFAULT_SCALE_TOKENS,
        "Held-out tokens on which to measure how each clamped latent fires (shown with the texts, and what relative "
        "values such as x2max are taken from); 0 measures only when a relative value needs it.",
    )
    infer_k: int | None = infer_k_setting("the SAE")
    theta: float | None = theta_setting("the SAE")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_tokens < 0:
            raise ConfigError(f"scale_tokens must be >= 0, got {self.scale_tokens}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must satisfy 0 < top_p <= 1, got {self.top_p}")
        Inference(k=self.infer_k, theta=self.theta)


def _continue(
    lm: LanguageModel, sae: SAE | None, prompt_ids: list[int], clamps: Sequence[Clamp], cfg: SteerConfig
) -> tuple[list[int], list[float]]:
    """Generate from ``prompt_ids``; with ``sae`` every step is steered. Returns (new ids, delta norms)."""
    sample = Sampler(cfg.temperature, cfg.top_p, cfg.seed, lm.device)
    ids = torch.tensor([prompt_ids], device=lm.device)
    new: list[int] = []
    norms: list[float] = []
    for _ in range(cfg.max_new_tokens):
        if sae is None:
            logits_V = lm.logits(ids, torch.ones_like(ids))[0, -1]
        else:
            steer_BT = steered_positions(ids.shape[1], len(prompt_ids), cfg.positions, lm.device)
            logits, changes = steered_logits(lm, sae, ids, steer_BT, clamps, cfg.replace)
            logits_V = logits[0, -1]
            norms.append(float(sum(change.delta_norm_BT()[0, -1] for change in changes.values())))
        token = sample(ids, logits_V)
        new.append(token)
        if token == lm.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=lm.device)], dim=1)
    return new, norms


def generate_continuation(lm: LanguageModel, prompt_ids: list[int], cfg: SteerConfig) -> list[int]:
    """New token ids continuing ``prompt_ids`` with ``lm.logits`` as it is (inside ``routesae.spliced``: spliced)."""
    return _continue(lm, None, prompt_ids, (), cfg)[0]


def _open(sae: SAE | Path | str) -> tuple[SAE, Path | None, dict[str, Any] | None]:
    """(the SAE in eval mode, its checkpoint directory and config, or None twice when given loaded)."""
    if isinstance(sae, SAE):
        return sae.eval(), None, None
    directory = Path(sae)
    loaded, config = load_sae(directory)
    return loaded, directory, config


def _model_for(
    sae: SAE, directory: Path | None, config: dict[str, Any] | None, lm: LanguageModel | None, device: str | torch.device | None
) -> LanguageModel:
    """The checkpoint's model (``lm`` if given, checked against it); a loaded SAE needs ``lm``."""
    if directory is not None and config is not None:
        return model_for([directory], [config], lm, device)
    if lm is None:
        raise RouteSAEError("steering a loaded SAE needs its language model: pass lm=LanguageModel.load(...)")
    if sae.d_model != lm.d_model:
        raise RouteSAEError(f"the SAE reads d_model {sae.d_model} but {lm.spec!r} has d_model {lm.d_model}")
    return lm


def steer(
    sae: SAE | Path | str, prompt: str, clamps: Sequence[str | Clamp], cfg: SteerConfig | None = None, **options: Any
) -> SteeringResult:
    """Continue ``prompt`` twice from the same seed, without and with ``clamps`` on ``sae``'s latents.

    ``sae`` is a checkpoint directory (its model is loaded unless ``lm`` is given) or a loaded
    SAE (then ``lm`` is required). ``clamps``: strings like ``"123=20"`` or ``"123=x2max"`` (twice
    the latent's largest activation on held-out text), or :class:`Clamp` objects. ``cfg`` says how
    (:class:`SteerConfig`; keyword ``settings`` such as ``max_new_tokens=32`` build or override it):
    ``chat=None`` applies the tokenizer's chat template when it has one; ``replace`` puts the
    clamped reconstruction itself in the residual stream instead of adding the clamp's change (see
    the module docstring, also for ``positions``); ``soft_at_argmax`` accepts steering a
    soft-routed RouteSAE at each token's highest-weight block; ``infer_k`` / ``theta`` read the SAE
    with an inference-time sparsity override. ``options``: ``lm``, ``device`` and settings, as
    :func:`steer_sweep` takes them. A clamp listing several values is a sweep: :func:`steer_sweep`.

    >>> steer("runs/demo/topk-L21-k32-F4096", "Tell me about Paris.", ["1234=20"]).steered
    """
    (result, *others) = steer_sweep(sae, prompt, clamps, cfg, **options)
    if others:
        raise RouteSAEError("a clamp lists several values (a sweep): use steer_sweep, which returns one result per value")
    return result


def steer_sweep(
    sae: SAE | Path | str,
    prompt: str,
    clamps: Sequence[str | Clamp],
    cfg: SteerConfig | None = None,
    *,
    lm: LanguageModel | None = None,
    device: str | torch.device | None = None,
    **settings: Any,
) -> list[SteeringResult]:
    """:func:`steer` for each value of a swept clamp (``"123=5,10,20"``), the original continuation computed once.

    Each result's ``settings`` holds the clamps it used and, under ``scales``, how each clamped
    latent fires on ``scale_tokens`` held-out tokens (when they were measured).

    >>> [r.steered for r in steer_sweep("runs/demo/topk-L21-k32-F4096", "Tell me about Paris.", ["1234=x1max,x2max"])]
    """
    cfg = SteerConfig.build(cfg, settings)
    override = Inference(k=cfg.infer_k, theta=cfg.theta)
    sae, directory, config = _open(sae)  # everything about the SAE is checked before the model loads
    specs = parse_clamp_specs(clamps, sae.cfg.latent_size)
    caveat = sae.steering_caveat()
    if caveat is not None and not cfg.soft_at_argmax:
        raise RouteSAEError(
            f"{caveat}. Pass --soft-at-argmax (soft_at_argmax=True) to steer each token at its highest-weight block, "
            "as evaluation splices it"
        )
    with sae.inference(override):
        lm = _model_for(sae, directory, config, lm, device)
        sae.to(lm.device)
        scales = _scales(sae, lm, config or sae.checkpoint, specs, cfg.scale_tokens)
        variants = sweep_clamps(specs, scales)
        text, prompt_ids, used_chat = render_prompt(lm.tokenizer, prompt, cfg.chat, cfg.system)
        start = time.perf_counter()
        original_ids, _ = _continue(lm, None, prompt_ids, (), cfg)
        original_seconds = time.perf_counter() - start
        results = []
        for variant in variants:
            start = time.perf_counter()
            steered_ids, norms = _continue(lm, sae, prompt_ids, variant, cfg)
            results.append((variant, steered_ids, norms, time.perf_counter() - start))
    decode = lm.tokenizer.decode
    shared = {
        "sae": str(directory) if directory is not None else sae.name,
        "architecture": sae.name,
        "layers": list(sae.layers),
        "model": lm.spec,
        "asked": [str(c).strip() for c in clamps],
        **cfg.request(),
        "chat": used_chat,
        "scales": {str(latent): dataclasses.asdict(scale) for latent, scale in scales.items()},
    }
    return [
        SteeringResult(
            prompt=text,
            original=decode(original_ids, skip_special_tokens=True),
            steered=decode(steered_ids, skip_special_tokens=True),
            prompt_ids=prompt_ids,
            original_ids=original_ids,
            steered_ids=steered_ids,
            settings={**shared, "clamps": [str(c) for c in variant]},
            delta_norms=norms,
            seconds={"original": original_seconds, "steered": seconds},
        )
        for variant, steered_ids, norms, seconds in results
    ]


def parse_clamp_specs(clamps: Sequence[str | Clamp], latent_size: int) -> list[ClampSpec]:
    """Clamps as written (sweeps and relative values allowed), checked against the SAE's dictionary size."""
    specs = [ClampSpec.parse(c) for c in clamps]
    for spec in specs:
        parse_clamps([Clamp(spec.latent, "mul", 1.0)], latent_size)  # the latent's range, with parse_clamps' message
    seen = [spec.latent for spec in specs]
    if twice := sorted({latent for latent in seen if seen.count(latent) > 1}):
        raise RouteSAEError(f"latent {twice[0]} is clamped twice; give each latent at most one clamp")
    return specs


def _scales(sae: SAE, lm: LanguageModel, checkpoint: dict[str, Any] | None, specs: Sequence[ClampSpec],
            tokens: int) -> dict[int, LatentScale]:
    """How the clamped latents fire: measured when ``tokens`` > 0 and the SAE's data is known, or a value needs it."""
    needed = any(spec.relative for spec in specs)
    if not specs or not (needed or tokens and checkpoint and "data" in checkpoint):
        return {}
    return measure_latent_scales(sae, lm, checkpoint, [spec.latent for spec in specs], tokens or DEFAULT_SCALE_TOKENS)


def record_steering(sae_dir: Path | str, results: Sequence[SteeringResult]) -> Path:
    """Add ``results`` to ``steering.json`` beside the SAE (a list of records; the report shows them)."""
    path = Path(sae_dir) / STEERING_FILE
    with writing_files([path.parent], "steer", [STEERING_FILE]):
        earlier = read_json(path)["results"] if path.is_file() else []
        write_json(path, {"format": STEERING_FORMAT, "results": [*earlier, *(r.to_dict() for r in results)]})
    return path
