"""Settings of a training run, what ``run.json`` records of them, and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from routesae.activations import HarvestConfig
from routesae.cache import TRAIN_DEFAULTS, ActivationCache
from routesae.config import setting
from routesae.errors import ConfigError
from routesae.plugins import get_plugin_manager

if TYPE_CHECKING:
    from routesae.specs import SAESpec

CHECKPOINT_SECONDS = 120.0
DEFAULT_TOKENS = 200_000
Schedule = Literal["wsd", "reference-2025"]
# Settings added after runs existed, left out of run.json's request while at these defaults.
OPTIONAL_SETTINGS: dict[str, Any] = {"from_cache": None, "compile": False, "autocast": False, "epochs": None}
# Settings that change how a run is carried out, not what it trains: never part of the request, so a run resumes (or
# is reused) whatever their values.
EXECUTION_SETTINGS = ("overlap_harvest", "checkpoint_every", "log_every", "device")
# Settings that shape only the steps still to come (the learning rate and its schedule): --resume may change them,
# and run.json records the change with the step it took effect at.
RESUMABLE_SETTINGS = ("lr", "schedule", "warmup", "decay")


@dataclass
class TrainConfig(HarvestConfig):
    """Settings of a training run (shared by every SAE in it)."""

    tokens: int | None = setting(
        None,
        f"Training tokens per SAE (BOS and padding positions excluded). Default: {DEFAULT_TOKENS:,}; with --epochs N "
        "and no --tokens, N whole passes over the train split.",
    )
    epochs: int | None = setting(
        None,
        "Passes over the train split (from a cache: over the cached tokens), each in a new seeded order. Without "
        "it, --tokens must fit in one pass; with it, --tokens (if given) must fit in this many and ends training.",
    )
    sae_batch_tokens: int = setting(2048, "Tokens per SAE optimisation step.")
    buffer_tokens: int = setting(16_384, "Shuffle-buffer size in tokens; mixes tokens from many sequences per step.")
    lr: float = setting(5e-4, "Adam learning rate (betas 0.9, 0.999).")
    schedule: Schedule = setting(
        "wsd",
        "Learning-rate schedule: 'wsd' is linear warm-up, stable, then linear decay to zero; 'reference-2025' "
        "reproduces the reference code's older schedule (lr 0 at step 0, a drop to 0.2 at 80%, 0 for the last 5%).",
    )
    warmup: float = setting(0.05, "Fraction of steps with linear learning-rate warm-up.")
    decay: float = setting(0.2, "Fraction of final steps with linear decay to zero.")
    renorm_every: int = setting(10, "Rescale decoder directions to unit norm every this many steps (and at the end).")
    remove_parallel_grad: bool = setting(
        False, "Remove the gradient component parallel to each decoder direction before every Adam step."
    )
    checkpoint_every: int | None = setting(
        None, f"Steps between checkpoints (0: only at the end). Default: every {CHECKPOINT_SECONDS:.0f} s of training."
    )
    log_every: int = setting(10, "Steps between progress reports.")
    dead_after_tokens: int = setting(100_000, "A latent counts as dead when it has not fired for this many tokens.")
    from_cache: str | None = setting(
        None,
        "Train from an activation cache written by `routesae cache` instead of running the language model; "
        "model and data settings come from the cache.",
    )
    compile: bool = setting(
        False,
        "Compile each SAE's forward with torch.compile (for GPUs; on a CPU the first steps spend minutes compiling).",
    )
    autocast: bool = setting(
        False, "Run SAE forwards and losses under bfloat16 autocast (for GPUs with bf16); weights and Adam stay float32."
    )
    overlap_harvest: bool = setting(
        False,
        "Harvest the next shuffle group in a background thread while the SAEs train on the current one (for GPUs; "
        "holds two groups in memory; same batches, bit for bit).",
    )

    def __post_init__(self) -> None:
        if self.tokens is None and self.epochs is None:
            self.tokens = DEFAULT_TOKENS
        super().__post_init__()
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        for name in ("sae_batch_tokens", "buffer_tokens", "renorm_every", "log_every", "dead_after_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not (0 <= self.warmup and 0 <= self.decay and self.warmup + self.decay <= 1):
            raise ConfigError(f"warmup ({self.warmup}) and decay ({self.decay}) must be fractions that sum to at most 1")

    @classmethod
    def for_cache(cls, cache: ActivationCache | str, **settings: Any) -> TrainConfig:
        """Settings reading an activation cache: model, data, seed, batch size and tokens default to the cache's.

        >>> train(specs, "runs/sweep", TrainConfig.for_cache("caches/smollm2", lr=1e-3))
        """
        cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        defaults = {name: cache.request[name] for name in TRAIN_DEFAULTS}
        if settings.get("epochs") is not None:  # --epochs N alone: N passes over the cache, not the tokens it was asked for
            defaults.pop("tokens")
        cfg = cls.from_dict({**defaults, **settings, "from_cache": str(settings.get("from_cache") or cache.path)})
        cache.check_train_config(cfg)
        return cfg


def run_request(specs: Sequence[SAESpec], cfg: TrainConfig) -> dict[str, Any]:
    """What ``run.json`` records as asked for: a run resumes (or is reused) only under an equal request."""
    train_request = cfg.to_dict()
    for name, default in OPTIONAL_SETTINGS.items():  # at their defaults, so runs begun before they existed still resume
        if train_request[name] == default:
            del train_request[name]
    for name in EXECUTION_SETTINGS:
        del train_request[name]
    return {"train": train_request, "saes": [s.to_dict() for s in specs]}


def upgrade_request(saved: dict[str, Any]) -> dict[str, Any]:
    """A request ``run.json`` recorded, in this version's form: each SAE's settings through its architecture's
    :meth:`~routesae.SAE.upgrade`, so a run written by an earlier routesae still resumes, or is reused, under
    the same command; execution settings that earlier versions recorded are dropped. Architectures that are not
    installed are left as they are (the request then differs)."""
    pm = get_plugin_manager()
    saes = []
    for sae in saved.get("saes", []):
        if sae.get("architecture") in pm.names("architecture"):
            sae = {**sae, "config": pm.get("architecture", sae["architecture"]).upgrade(sae["config"], {})[0]}
        saes.append(sae)
    train = {k: v for k, v in saved.get("train", {}).items() if k not in EXECUTION_SETTINGS}
    return {**saved, "train": train, "saes": saes}


@dataclass(frozen=True)
class RequestChanges:
    """How a request differs from the one a run recorded: ``{setting: (recorded, asked for)}``."""

    changes: dict[str, tuple[Any, Any]]

    @property
    def same(self) -> bool:
        return not self.changes

    @property
    def resumable(self) -> bool:
        """Whether ``--resume`` may continue the recorded run under the new request (schedule changes only)."""
        return not self.fixed()

    def fixed(self) -> list[str]:
        """The changed settings that ``--resume`` cannot take."""
        return [name for name in self.changes if name not in RESUMABLE_SETTINGS]

    def describe(self, names: Sequence[str] | None = None) -> str:
        """``lr 0.0005 -> 0.0001; k of SAE 1 (topk) 32 -> 64`` for ``names`` (default: every change)."""
        shown = self.changes.items() if names is None else [(n, c) for n, c in self.changes.items() if n in names]
        return "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in shown)

    def record(self) -> dict[str, dict[str, Any]]:
        """The changes as ``run.json`` keeps them."""
        return {name: {"from": old, "to": new} for name, (old, new) in self.changes.items()}


def compare_requests(saved: dict[str, Any], request: dict[str, Any]) -> RequestChanges:
    """What differs between the request a run recorded (upgraded to this version's form) and ``request``."""
    saved = upgrade_request(saved)
    changes: dict[str, tuple[Any, Any]] = {}
    old_train, new_train = saved.get("train", {}), request["train"]
    for name in sorted(old_train.keys() | new_train.keys()):
        if old_train.get(name) != new_train.get(name):
            changes[name] = (old_train.get(name), new_train.get(name))
    old_saes, new_saes = saved.get("saes", []), request["saes"]
    if [s.get("architecture") for s in old_saes] != [s["architecture"] for s in new_saes]:
        listed = [", ".join(str(s.get("name") or s.get("architecture")) for s in saes) for saes in (old_saes, new_saes)]
        changes["SAEs"] = (listed[0], listed[1])
        return RequestChanges(changes)
    for index, (old, new) in enumerate(zip(old_saes, new_saes), start=1):
        label = f"of SAE {index} ({new['architecture']})"
        if old.get("name") != new.get("name"):
            changes[f"name {label}"] = (old.get("name"), new.get("name"))
        old_cfg, new_cfg = old.get("config", {}), new["config"]
        for key in sorted(old_cfg.keys() | new_cfg.keys()):
            if old_cfg.get(key) != new_cfg.get(key):
                changes[f"{key} {label}"] = (old_cfg.get(key), new_cfg.get(key))
    return RequestChanges(changes)


def lr_factor(step: int, total_steps: int, warmup: float, decay: float, schedule: Schedule = "wsd") -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total_steps``.

    ``wsd``: warm-up, stable, linear decay to zero, as the paper describes; unlike the reference
    code the first step's lr is not 0. ``reference-2025``: the reference code's older schedule
    (docs/reference.md §5.4), which likely produced the paper's numbers — lr 0 at step 0, a jump from 1.0
    to 0.2 at 80% of training, and 0 for the last 5%.
    """
    n_warmup, n_decay = int(warmup * total_steps), int(decay * total_steps)
    if schedule == "reference-2025":
        if step < n_warmup:
            return step / n_warmup
        if step < total_steps - n_decay:
            return 1.0
        return max(0.0, (total_steps - step - n_warmup) / max(1, total_steps - n_warmup - n_decay))
    if step < n_warmup:
        return (step + 1) / n_warmup
    if step < total_steps - n_decay:
        return 1.0
    return max(0.0, (total_steps - step) / n_decay)
