"""An SAE inside a training run: its optimiser, its dead-latent counter, its step and its checkpoint files.

:func:`build_trained_saes` turns the run's :class:`~routesae.specs.SAESpec` list into these for a
model of a given shape: names, per-SAE seeds and the layers each SAE reads from the harvest.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from routesae.architectures.base import SAE, TrainingState
from routesae.checkpoint import load_optimizer, read_sae_config, read_weights, save_optimizer, save_sae
from routesae.distributed import SINGLE, Ranks
from routesae.errors import ConfigError
from routesae.firing import FiringCounter
from routesae.plugins import get_plugin_manager
from routesae.rundir import Generation, check_sae_name
from routesae.specs import SAESpec
from routesae.train_config import TrainConfig

FIRING_STATE = "since_fired"  # the dead-latent counter's name in the trainer-state file
NO_STEP, NEVER = -1, 2**62  # no non-finite loss yet, as stored and as compared across ranks


class ModelShape(Protocol):
    """What building SAEs needs of a model: a live :class:`~routesae.lm.LanguageModel` or a cache's record of one."""

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...


def seed_for(seed: int, name: str) -> int:
    """A per-SAE seed, so adding an SAE to a run does not change the others' initialisation."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


class TrainedSAE:
    """An SAE with its optimiser and running statistics inside a run.

    A step never waits for the device: the loss and the logged terms stay on it, as does the
    record of the first non-finite loss, until the trainer reads them (:meth:`logged`,
    :meth:`final_terms`, :meth:`check_finite`) every ``log_every`` steps and before a checkpoint.
    Under ``torchrun`` those reads are collectives, so every rank calls them at the same step.
    """

    def __init__(
        self, name: str, sae: SAE, layer_index: Tensor, cfg: TrainConfig, n_layers_harvested: int, ranks: Ranks = SINGLE
    ) -> None:
        self.name = name
        self.sae = sae
        self.layer_index = layer_index  # positions of this SAE's layers in the harvested layer axis
        # An SAE that reads every harvested layer in order (RouteSAE over the run's whole range) takes the batch
        # as it is: selecting its layers would copy [N, 16, D] per step for nothing.
        self.reads_all = layer_index.tolist() == list(range(n_layers_harvested))
        self.cfg = cfg
        self.ranks = ranks
        device = layer_index.device
        # The compiled module shares the SAE's parameters; checkpoints keep saving the plain module.
        self.forward = torch.compile(sae) if cfg.compile else sae
        self.autocast_device = device.type
        # The fused kernel updates each parameter in one pass, faster than the default for-each implementation
        # and without its temporaries (measured: docs/speed.md).
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
        self.firing = FiringCounter(sae.cfg.latent_size, cfg.dead_after_tokens, device)
        self.recent: deque[dict[str, Tensor]] = deque(maxlen=10)  # the last steps' terms (this rank's weighted share)
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.long, device=device)  # first non-finite loss
        self.first_bad_loss = torch.zeros((), device=device)
        self.synced_sums = [b.clone() for b in sae.training_sums()]  # the statistics all ranks agreed on last
        self.step_seconds = 0.0

    def step(self, acts_NLD: Tensor, lr: float, step: int, batch_tokens: int | None = None) -> None:
        """One optimiser step on ``acts_NLD``: the whole batch, or under ``torchrun`` this rank's share of a batch of
        ``batch_tokens`` tokens (each rank's loss is weighted by its share; the gradients are summed across ranks)."""
        start = time.perf_counter()
        n = acts_NLD.shape[0]
        share = n / batch_tokens if self.ranks.distributed and batch_tokens else 1.0
        state = TrainingState(step=step, dead_F=self.firing.dead())  # dead before this batch counts, as AuxK expects
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if n:
            with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.cfg.autocast):
                out = self.forward(acts_NLD if self.reads_all else acts_NLD.index_select(1, self.layer_index))
                loss, terms = self.sae.loss(out, state)
            (loss * share if self.ranks.distributed else loss).backward()
            fired_F = out.latents.any(0)  # non-zero anywhere; one kernel (comparing first doubled it)
            self._note(step, loss.detach(), terms, share)
        else:  # an empty share still takes part in the gradient sum, with nothing to add
            fired_F = torch.zeros(self.sae.cfg.latent_size, dtype=torch.bool, device=self.layer_index.device)
        if self.ranks.distributed:
            for p in self.sae.parameters():
                if p.grad is None:  # an empty share, or a parameter no loss term reaches: it adds nothing to the sum
                    p.grad = torch.zeros_like(p)
            self.ranks.sum_([p.grad for p in self.sae.parameters()])
            self.ranks.max_(fired_F)
        if self.cfg.remove_parallel_grad:
            self.sae.remove_parallel_gradient()
        self.optimizer.step()
        if (step + 1) % self.cfg.renorm_every == 0:
            self.sae.normalize_decoder()
        self.sae.after_step(step)
        self.firing.update_fired(fired_F, batch_tokens or n)
        self.step_seconds += time.perf_counter() - start

    def _note(self, step: int, loss: Tensor, terms: dict[str, Tensor], share: float) -> None:
        """Keep this step's terms and, if its loss is not finite and none was before, the step and value: on the device."""
        first = ~torch.isfinite(loss) & (self.first_bad_step == NO_STEP)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.first_bad_loss = torch.where(first, loss.float(), self.first_bad_loss)
        logged = {"loss": loss, **terms}
        self.recent.append({k: v * share for k, v in logged.items()} if self.ranks.distributed else logged)

    def logged(self) -> dict[str, float]:
        """The last step's terms (all ranks' shares summed): what the progress report shows."""
        return self._read([self.recent[-1]]) if self.recent else {}

    def final_terms(self) -> dict[str, float]:
        """The terms averaged over the last (up to) 10 steps: what the checkpoint and the summary record."""
        return self._read(list(self.recent)) if self.recent else {}

    def _read(self, steps: list[dict[str, Tensor]]) -> dict[str, float]:
        keys = list(steps[0])
        totals = torch.stack([torch.stack([s[k].double() for k in keys]) for s in steps]).sum(0)
        self.ranks.sum_([totals])
        return dict(zip(keys, (totals / len(steps)).tolist()))

    def check_finite(self) -> None:
        """Raise FloatingPointError if some step's loss (on any rank) was NaN or infinite, naming the first."""
        earliest = torch.where(self.first_bad_step == NO_STEP, NEVER, self.first_bad_step).neg()
        self.ranks.max_(earliest)  # the maximum of the negated steps: the earliest bad step of any rank
        step = -int(earliest)
        if step == NEVER:
            return
        if int(self.first_bad_step) == step:
            raise FloatingPointError(f"loss is {float(self.first_bad_loss)} at step {step}")
        raise FloatingPointError(f"loss is not finite at step {step} (on another rank)")

    def sync_sums(self) -> None:
        """Add every rank's share of the SAE's additive statistics since the last sync (under ``torchrun``)."""
        if not self.ranks.distributed:
            return
        sums = self.sae.training_sums()
        deltas = [now - then for now, then in zip(sums, self.synced_sums)]
        self.ranks.sum_(deltas)
        for now, then, delta in zip(sums, self.synced_sums, deltas):
            now.copy_(then + delta)
            then.copy_(now)

    def dead_fraction(self) -> float:
        return float(self.firing.dead_fraction())

    def save(self, generation: Generation, meta: dict[str, Any], step: int) -> None:
        """This SAE's checkpoint (config, weights) and trainer state (Adam moments, counter) into ``generation``."""
        directory = generation.sae_dir(self.name)
        save_sae(self.sae, directory, meta)
        save_optimizer(self.optimizer, generation.trainer_state(self.name), step, extra={FIRING_STATE: self.firing.tokens_since_fired})

    def restore(self, generation: Generation) -> int:
        """Weights, optimiser state and counter from ``generation``; returns the step they were saved at."""
        device = self.layer_index.device
        directory = generation.sae_dir(self.name)
        _, state = self.sae.upgrade(self.sae.cfg.to_dict(), read_weights(directory, read_sae_config(directory), device))
        self.sae.load_state_dict(state)
        self.synced_sums = [b.clone() for b in self.sae.training_sums()]
        step, extra = load_optimizer(self.optimizer, generation.trainer_state(self.name))
        self.firing.tokens_since_fired = extra[FIRING_STATE].to(device)
        return step


def build_trained_saes(
    specs: Sequence[SAESpec], model: ModelShape, cfg: TrainConfig, device: torch.device, ranks: Ranks = SINGLE
) -> tuple[list[int], list[TrainedSAE]]:
    """(the blocks to harvest: every block some SAE reads, sorted; one :class:`TrainedSAE` per spec).

    Each SAE is initialised from its own seed (:func:`seed_for` of its name), so the same SAE gets
    the same weights whatever else the run trains.
    """
    if not specs:
        raise ConfigError("nothing to train: give at least one architecture")
    pm = get_plugin_manager()  # the one train() activated
    resolved = [(s, s.config.resolve(model.n_layers)) for s in specs]
    layers = sorted({layer for _, c in resolved for layer in c.resolved_layers()})
    names = [check_sae_name(s.name or "-".join([s.architecture, *c.name_parts()])) for s, c in resolved]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"two SAEs in this run would share the name {sorted(duplicates)[0]!r}; give them distinct names")
    trained = []
    for (spec, config), name in zip(resolved, names):
        arch = pm.get("architecture", spec.architecture)
        torch.manual_seed(seed_for(cfg.seed, name))
        sae = arch(config, model.d_model).to(device).train()
        index = torch.tensor([layers.index(layer) for layer in config.resolved_layers()], device=device)
        trained.append(TrainedSAE(name, sae, index, cfg, len(layers), ranks))
    return layers, trained
