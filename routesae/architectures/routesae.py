"""RouteSAE (Shi et al. 2025): one shared single-layer SAE fed, per token, by a learned router over layers.

Composed from plugins, not special-cased: an aggregation (``sum`` | ``mean``) pools the L
standardised layers into the router's input, a bias-free linear map d→L and a softmax over
layers give routing probabilities p, a router (``hard`` | ``soft``) builds the routed vector,
and any registered single-layer architecture (``inner``; TopK by default) encodes it::

    x_l = standardize(h_l)                       per token and layer (docs/reference.md §2.3)
    v = Σ_l x_l  (sum)   or   (1/L) Σ_l x_l  (mean)
    p = softmax(W_r v),  W_r ∈ R^{L×d}
    hard: i* = argmax p,  x_route = p_{i*} · x_{i*}       soft: x_route = Σ_l p_l x_l
    (z, x̂) = inner(x_route),   loss = inner's loss with target x_route

Splicing (``reconstruction``) follows the reference's evaluation (docs/reference.md §3.6, §6.2): each token is
replaced once, at its argmax block, by the inner's reconstruction of that block's *unscaled*
standardised activation x_{i*}, de-standardised with that block's (μ, σ). Soft routing uses
the same rule (see :meth:`RouteSAE.reconstruction` for why). The spliced reconstruction is
therefore not the trained one: training encodes p_{i*}·x_{i*} (docs/reference.md §12.5).

Settings. RouteSAE's own settings are its config fields; every other setting (``k``, ``relu``,
``l1``, ...) belongs to the inner architecture and lives in ``inner_settings``, validated by the
inner's own config and stored with its defaults filled in. The router's and the aggregation's
settings (their ``Config`` fields) are offered as ``route_NAME`` and ``aggregate_NAME`` (``--route-k``)
and live in ``router_settings`` and ``aggregate_settings``, likewise validated and filled in. ``latent_size`` is RouteSAE's and is
mirrored into the inner config, so the dictionary size has one source of truth, the one the
kernel reads (``cfg.latent_size``). The inner's ``normalize`` is fixed to ``"none"``: RouteSAE
standardises each layer before routing, and the inner sees the routed vector as is.

The inner runs through its own ``forward`` and ``loss`` (with the trainer's ``TrainingState``), so
its pre-activations (AuxK's), extras, loss terms and ``after_step`` (BatchTopK's threshold) work as
they do when it stands alone.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from routesae.architectures.base import (
    NO_TRAINING_STATE,
    SAE,
    Inference,
    LatentEdit,
    MultiLayerConfig,
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
    StandardizedLayers,
    TrainingState,
)
from routesae.config import Config, SettingInfo, config_settings, setting
from routesae.errors import ConfigError
from routesae.plugins import get_plugin_manager
from routesae.routers.base import Routing

#: inner settings that RouteSAE owns or fixes: never given to the inner directly.
DERIVED_INNER_SETTINGS = frozenset({"layer", "latent_size", "normalize"})


class Part(NamedTuple):
    """A configurable plugin in front of the inner SAE: the field naming it, the one holding its settings, and the
    prefix its settings take among RouteSAE's (``route_k`` is the router's ``k``)."""

    choice: str
    settings: str
    prefix: str


PARTS = {
    "router": Part("router", "router_settings", "route_"),
    "aggregation": Part("aggregate", "aggregate_settings", "aggregate_"),
}
PART_FIELDS = frozenset({"inner_settings", *(part.settings for part in PARTS.values())})


def single_layer_architectures() -> dict[str, type[SingleLayerSAE]]:
    """Registered architectures that can be RouteSAE's inner SAE: those on one block (an MLSAE shares TopK's code but
    reads a range)."""
    pm = get_plugin_manager()
    archs = {name: pm.get("architecture", name) for name in pm.names("architecture")}
    return {name: cls for name, cls in archs.items()
            if issubclass(cls, SingleLayerSAE) and issubclass(cls.Config, SingleLayerConfig)}


def inner_architecture(name: str) -> type[SingleLayerSAE]:
    archs = single_layer_architectures()
    if name not in archs:
        raise ConfigError(
            f"inner={name!r} is not a registered single-layer architecture; choose one of: {', '.join(sorted(archs)) or 'none'}"
        )
    return archs[name]


def inner_setting_names(inner_cls: type[SingleLayerSAE]) -> set[str]:
    return inner_cls.setting_names() - DERIVED_INNER_SETTINGS


def _check_plugin(kind: str, name: str) -> None:
    pm = get_plugin_manager()
    if name not in pm.names(kind):
        installed = ", ".join(pm.names(kind)) or "none"
        raise ConfigError(f"{kind}={name!r} is not registered; installed {kind}s: {installed}{pm.load_failures()}")


def part_setting_names(kind: str, name: str) -> set[str]:
    """The settings a registered router or aggregation takes, as RouteSAE offers them (``route_k``); none if unknown."""
    pm = get_plugin_manager()
    if name not in pm.names(kind):
        return set()
    return {PARTS[kind].prefix + f.name for f in dataclasses.fields(pm.get(kind, name).Config)}


def _part_settings(kind: str, name: str, settings: Any) -> dict[str, Any]:
    """A router's or aggregation's settings, checked by its ``Config`` and stored with its defaults filled in."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{PARTS[kind].settings} must be a mapping, got {settings!r}")
    try:
        return get_plugin_manager().get(kind, name).Config.from_dict(settings).to_dict()
    except ConfigError as e:
        raise ConfigError(f"{kind} {name!r}: {e}") from None


def _tag(name: str, defaults: dict[str, Any], settings: dict[str, Any]) -> str:
    """A part's name in an SAE's default name, with the settings that differ from its defaults: ``top-layers-k3``."""
    changed = [f"{key}{_text(value)}" for key, value in settings.items() if defaults.get(key) != value]
    return "-".join([name, *changed])


def _text(value: Any) -> str:
    return "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@dataclass
class RouteSAEConfig(MultiLayerConfig):
    router: str = setting(
        "hard",
        "Router plugin: 'hard' sends each token's most probable layer, scaled by its probability (the paper); "
        "'soft' sends the probability-weighted sum of layers.",
    )
    aggregate: str = setting(
        "sum", "How the router input pools a token's layers: 'sum' (the paper) or 'mean' (logits divided by L)."
    )
    inner: str = setting("topk", "The single-layer architecture that encodes the routed vector (any registered one).")
    inner_settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Settings of the inner architecture (k, relu, l1, ...); filled with its defaults."},
    )
    router_settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Settings of the router (route_NAME among RouteSAE's settings); filled with its defaults."},
    )
    aggregate_settings: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Settings of the aggregation (aggregate_NAME); filled with its defaults."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_plugin("router", self.router)
        _check_plugin("aggregation", self.aggregate)
        self.router_settings = _part_settings("router", self.router, self.router_settings)
        self.aggregate_settings = _part_settings("aggregation", self.aggregate, self.aggregate_settings)
        if not isinstance(self.inner_settings, dict):
            raise ConfigError(f"inner_settings must be a mapping, got {self.inner_settings!r}")
        inner_cls = inner_architecture(self.inner)
        derived = sorted(DERIVED_INNER_SETTINGS & set(self.inner_settings))
        if derived:
            raise ConfigError(
                f"inner_settings may not set {', '.join(derived)}: RouteSAE sets latent_size and normalize itself "
                "and reads a range of layers (layers=A:B)"
            )
        allowed = inner_setting_names(inner_cls)
        unknown = sorted(set(self.inner_settings) - allowed)
        if unknown:
            raise ConfigError(
                f"inner architecture {self.inner!r} does not take {', '.join(unknown)}; "
                f"its settings are: {', '.join(sorted(allowed)) or 'none'}"
            )
        full = self.inner_config().to_dict()  # validates through the inner's own config
        self.inner_settings = {k: v for k, v in full.items() if k not in DERIVED_INNER_SETTINGS}

    def inner_config(self, layer: int | None = None) -> SingleLayerConfig:
        """The inner architecture's config (``layer`` only matters for its name tags)."""
        inner_cls = inner_architecture(self.inner)
        mirrored = {"latent_size": self.latent_size, "normalize": "none", "layer": layer}
        return inner_cls.Config.from_dict({**self.inner_settings, **mirrored})

    def to_dict(self) -> dict[str, Any]:
        """The settings, without the settings of a router or aggregation that has none: a run or checkpoint of the
        built-in parts records what it recorded before parts had settings, so the two compare equal."""
        settings = super().to_dict()
        for part in PARTS.values():
            if not settings[part.settings]:
                del settings[part.settings]
        return settings

    def part_config(self, kind: str) -> Config:
        """The router's (``kind="router"``) or the aggregation's settings as its ``Config``."""
        part = PARTS[kind]
        return get_plugin_manager().get(kind, getattr(self, part.choice)).Config.from_dict(getattr(self, part.settings))

    def name_parts(self) -> list[str]:
        span, *_ = super().name_parts()
        inner_parts = self.inner_config(layer=0).name_parts()
        inner_parts.remove("L0")  # the inner's layer tag; our span replaces it
        inner_tag = [] if self.inner == "topk" else [self.inner]
        parts = [
            _tag(getattr(self, part.choice), type(self.part_config(kind))().to_dict(), getattr(self, part.settings))
            for kind, part in PARTS.items()
        ]
        return [span, *parts, *inner_tag, *inner_parts]


class RouteSAE(SAE):
    name = "routesae"
    Config: ClassVar[type[SAEConfig]] = RouteSAEConfig
    cfg: RouteSAEConfig
    routing_counts: Tensor  # [L] float64: tokens (hard) or probability mass (soft) routed to each layer in training

    def __init__(self, cfg: RouteSAEConfig, d_model: int) -> None:
        super().__init__(cfg, d_model)
        pm = get_plugin_manager()
        self.routing_rule = pm.get("router", cfg.router).configured(cfg.part_config("router"))
        self.aggregation = pm.get("aggregation", cfg.aggregate).configured(cfg.part_config("aggregation"))
        n_routed = len(cfg.resolved_layers())
        self.router = nn.Linear(d_model, n_routed, bias=False)  # PyTorch default init, as the reference
        self.sae = inner_architecture(cfg.inner)(cfg.inner_config(), d_model)
        # Sized by the routed range itself (the reference's n//2+1 breaks when n ≡ 3 mod 4, §12.13).
        self.register_buffer("routing_counts", torch.zeros(n_routed, dtype=torch.float64))

    # -- settings --------------------------------------------------------------------------------
    @classmethod
    def own_setting_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls.Config)} - PART_FIELDS

    @classmethod
    def setting_names(cls) -> set[str]:
        """Own settings, every single-layer architecture's (for the inner) and every router's and aggregation's."""
        pm = get_plugin_manager()
        inner = set().union(*(inner_setting_names(a) for a in single_layer_architectures().values()))
        parts = {name for kind in PARTS for n in pm.names(kind) for name in part_setting_names(kind, n)}
        return cls.own_setting_names() | inner | parts

    @classmethod
    def accepts(cls, settings: dict[str, Any]) -> set[str]:
        """Own settings and those of the inner, router and aggregation that ``settings`` choose (or the defaults)."""
        chosen = cls._chosen(settings)
        archs = single_layer_architectures()
        inner = inner_setting_names(archs[chosen["inner"]]) if chosen["inner"] in archs else set()
        parts = set().union(*(part_setting_names(kind, chosen[part.choice]) for kind, part in PARTS.items()))
        return cls.own_setting_names() | inner | parts

    @classmethod
    def _chosen(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """The inner, router and aggregation that ``settings`` name, or the defaults."""
        return {key: settings.get(key, cls.Config.__dataclass_fields__[key].default) for key in ("inner", "router", "aggregate")}

    @classmethod
    def settings(cls) -> list[SettingInfo]:
        """Own settings (the choices' help lists what is installed) and each router's and aggregation's, prefixed.

        The inner's settings are its architecture's own options, shown under that architecture.
        """
        pm = get_plugin_manager()
        installed = {
            "router": pm.names("router"),
            "aggregate": pm.names("aggregation"),
            "inner": sorted(single_layer_architectures()),
        }
        own = [
            dataclasses.replace(s, help=f"{s.help} Installed: {', '.join(installed[s.name])}.") if s.name in installed else s
            for s in config_settings(cls.Config)
            if s.name not in PART_FIELDS
        ]
        parts = [
            setting_info
            for kind, part in PARTS.items()
            for name in pm.names(kind)
            for setting_info in config_settings(pm.get(kind, name).Config, part.prefix, f"With --{part.choice} {name}: ")
        ]
        return own + parts

    @classmethod
    def build_config(cls, settings: dict[str, Any]) -> RouteSAEConfig:
        """Own fields configure RouteSAE; ``route_*``/``aggregate_*`` go to the router and aggregation, the rest to the
        inner architecture, each checked by its own config."""
        own_names = {f.name for f in dataclasses.fields(cls.Config)}
        own = {k: v for k, v in settings.items() if k in own_names}
        parts = {name: dict(own.pop(name, None) or {}) for name in sorted(PART_FIELDS)}
        chosen = cls._chosen(own)
        inner_name = chosen["inner"]
        allowed = inner_setting_names(inner_architecture(inner_name))
        routed = {kind: part_setting_names(kind, chosen[part.choice]) for kind, part in PARTS.items()}
        for key, value in settings.items():
            if key in own_names:
                continue
            kind = next((kind for kind, names in routed.items() if key in names), None)
            if kind is not None:
                into, sub = parts[PARTS[kind].settings], key.removeprefix(PARTS[kind].prefix)
            elif key in allowed:
                into, sub = parts["inner_settings"], key
            else:
                raise ConfigError(cls._refusal(key, chosen, allowed, routed))
            if sub in into and into[sub] != value:
                raise ConfigError(f"{key} is given twice with different values ({into[sub]!r} and {value!r})")
            into[sub] = value
        return cls.Config.from_dict({**own, **parts})

    @classmethod
    def _refusal(cls, key: str, chosen: dict[str, Any], allowed: set[str], routed: dict[str, set[str]]) -> str:
        """Why ``key`` is not a setting of a RouteSAE with these parts, and what its settings are."""
        inner_name = chosen["inner"]
        for kind, part in PARTS.items():
            if key.startswith(part.prefix):
                name = chosen[part.choice]
                return (
                    f"routesae with {kind} {name!r} does not take the setting {key!r}; its settings are: "
                    f"{', '.join(sorted(routed[kind])) or 'none'} (another {kind} may take it)"
                )
        hint = " (RouteSAE reads a range: use layers=A:B)" if key == "layer" else ""
        return (
            f"routesae with inner={inner_name!r} does not take the setting {key!r}{hint}; "
            f"{inner_name}'s settings are: {', '.join(sorted(allowed)) or 'none'}; "
            f"routesae's own: {', '.join(sorted(cls.own_setting_names()))}"
        )

    @classmethod
    def upgrade(cls, config: dict[str, Any], state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The inner architecture's upgrade, applied to its settings and to its (``sae.``-prefixed) weights.

        Checkpoints from before routers and aggregations had settings record none, as a part without settings
        still does (:meth:`RouteSAEConfig.to_dict`).
        """
        inner_cls = inner_architecture(config.get("inner", cls.Config.__dataclass_fields__["inner"].default))
        inner_weights = {k.removeprefix("sae."): v for k, v in state_dict.items() if k.startswith("sae.")}
        inner_settings, inner_weights = inner_cls.upgrade(config.get("inner_settings", {}), inner_weights)
        own_weights = {k: v for k, v in state_dict.items() if not k.startswith("sae.")}
        own_weights.update({f"sae.{k}": v for k, v in inner_weights.items()})
        return {**config, "inner_settings": inner_settings}, own_weights

    def plugins_used(self) -> list[tuple[str, str]]:
        """RouteSAE, its router, its aggregation and whatever its inner SAE is built from."""
        used = [("architecture", self.name), ("router", self.cfg.router), ("aggregation", self.cfg.aggregate)]
        return list(dict.fromkeys([*used, *self.sae.plugins_used()]))

    # -- forward ---------------------------------------------------------------------------------
    def route(self, acts_NLD: Tensor) -> tuple[StandardizedLayers, Tensor, Routing]:
        """(the standardised layers, router probabilities p_NL, the Routing), without a standardised [N, L, D] copy."""
        if acts_NLD.ndim != 3 or acts_NLD.shape[1] != self.routing_counts.shape[0]:
            raise ValueError(
                f"routesae reads {self.routing_counts.shape[0]} layers {list(self.layers)}; got input of shape {tuple(acts_NLD.shape)}"
            )
        layers = StandardizedLayers(acts_NLD, self.cfg.normalize, self.layers)
        probs_NL = self.router(self.aggregation(layers)).softmax(-1)
        return layers, probs_NL, self.routing_rule.route(layers, probs_NL)

    def forward(self, acts_NLD: Tensor) -> SAEOutput:
        layers, probs_NL, routing = self.route(acts_NLD)
        # The inner's own forward (its normalize is "none"), so whatever it records for its loss or
        # bookkeeping (batch thresholds, ...) happens as if it stood alone.
        inner = self.sae(routing.x_route_ND[:, None])
        ours = {
            "router_probs": probs_NL,
            "layer_weights": routing.layer_weights_NL,
            "chosen": routing.chosen_N,
            "x_chosen": layers.select(routing.chosen_N),
        }
        clash = sorted(set(ours) & set(inner.extras))
        if clash:
            raise RuntimeError(f"inner architecture {self.cfg.inner!r} uses output extras named like RouteSAE's: {clash}")
        if self.training:
            with torch.no_grad():
                self.routing_counts += routing.layer_weights_NL.detach().sum(0, dtype=torch.float64)
        return SAEOutput(
            latents=inner.latents,
            x_hat=inner.x_hat,
            target=inner.target,
            pre=inner.pre,
            norm=layers.norm,
            extras={**inner.extras, **ours},
            codes=inner.codes,
        )

    def loss(self, out: SAEOutput, state: TrainingState = NO_TRAINING_STATE) -> tuple[Tensor, dict[str, Tensor]]:
        """The inner's loss on x_route → x̂ (its sparsity terms included), plus router diagnostics."""
        inner = SAEOutput(
            latents=out.latents, x_hat=out.x_hat, target=out.target, pre=out.pre, extras=out.extras, codes=out.codes
        )
        total, terms = self.sae.loss(inner, state)
        probs_NL = out.extras["router_probs"].detach()
        entropy = -(probs_NL * probs_NL.clamp_min(torch.finfo(probs_NL.dtype).tiny).log()).sum(-1).mean()
        return total, {**terms, "router_entropy": entropy, "router_p_max": probs_NL.max(-1).values.mean()}

    def reconstruction(self, out: SAEOutput) -> dict[int, tuple[Tensor, Tensor]]:
        """Each token once, at its argmax block: inner(x_{i*}) unscaled, de-standardised with that block's μ, σ.

        Hard routing: the reference's evaluation splice (docs/reference.md §3.6, §6.2). Soft routing: the same rule.
        A soft x_route = Σ p_l x_l is a mixture of layers, so its reconstruction belongs to no
        block; the argmax block is where the router puts most weight, splicing once per token
        keeps downstream metrics comparable with hard routing (a splice at several blocks would
        compound errors, each later block seeing the earlier replacement), and it is what the
        reference effectively evaluates, since its pipeline forces hard routing at evaluation
        (docs/reference.md §6.7, §12.15) — here explicitly, with the NMSE still on the soft target.
        """
        x_chosen_ND, chosen_N = out.extras["x_chosen"], out.extras["chosen"]
        rows = torch.arange(x_chosen_ND.shape[0], device=x_chosen_ND.device)
        x_hat_ND = self.sae.decode_standardized(self.sae.encode_standardized(x_chosen_ND))
        if out.norm is not None:
            at_chosen = dataclasses.replace(
                out.norm, mean=out.norm.mean[rows, chosen_N][:, None], std=out.norm.std[rows, chosen_N][:, None]
            )
            x_hat_ND = at_chosen.undo(x_hat_ND[:, None])[:, 0]
        return {block: (x_hat_ND, chosen_N == i) for i, block in enumerate(self.layers)}

    # -- the rest of the contract ----------------------------------------------------------------
    def inference(self, override: Inference) -> AbstractContextManager[None]:
        """The inner SAE does all encoding, so the override (and its checks) is the inner's."""
        return self.sae.inference(override)

    def edit_latents(self, edit: LatentEdit) -> AbstractContextManager[None]:
        """The inner SAE makes every latent (``forward`` and ``reconstruction`` alike), so the edit is the inner's."""
        return self.sae.edit_latents(edit)

    def routed_blocks(self, out: SAEOutput) -> Tensor:
        """The block each token was routed to (the argmax one, where a router mixes blocks)."""
        return torch.tensor(self.layers, device=out.latents.device)[out.extras["chosen"]]

    def steering_caveat(self) -> str | None:
        """A router that sends each token to a single block (``hard``) puts its latents there; others mix blocks."""
        if self.routing_rule.single_block:
            return None
        return (
            f"this RouteSAE routes with {self.cfg.router!r}: each token's latents encode a mix of blocks, so no "
            "single block holds what a clamp changes"
        )

    def encode_standardized(self, x_route_ND: Tensor) -> Tensor:
        """Latents of a routed input (the SAE's input space, like ``out.target``); ``encode`` routes raw activations."""
        return self.sae.encode_standardized(x_route_ND)

    def decode_standardized(self, latents_NF: Tensor) -> Tensor:
        """x̂ in the routed, standardised space."""
        return self.sae.decode_standardized(latents_NF)

    def decoder_directions(self) -> list[nn.Parameter]:
        return self.sae.decoder_directions()

    def after_step(self, step: int) -> None:
        self.sae.after_step(step)

    def training_sums(self) -> list[Tensor]:
        return [self.routing_counts, *self.sae.training_sums()]

    def statistics(self) -> dict[str, Any]:
        return {"routing_counts": {str(block): count for block, count in zip(self.layers, self.routing_counts.tolist())}}
