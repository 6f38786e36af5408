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
from routesae.errors import ConfigError
from routesae.firing import FiringCounter
from routesae.plugins import get_plugin_manager
from routesae.rundir import Generation, check_sae_name
from routesae.specs import SAESpec
from routesae.train_config import TrainConfig

FIRING_STATE = "since_fired"  # the dead-latent counter's name in the trainer-state file


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
    """An SAE with its optimiser and running statistics inside a run."""

    def __init__(self, name: str, sae: SAE, layer_index: Tensor, cfg: TrainConfig, n_layers_harvested: int) -> None:
        self.name = name
        self.sae = sae
        self.layer_index = layer_index  # positions of this SAE's layers in the harvested layer axis
        # An SAE that reads every harvested layer in order (RouteSAE over the run's whole range) takes the batch
        # as it is: selecting its layers would copy [N, 16, D] per step for nothing.
        self.reads_all = layer_index.tolist() == list(range(n_layers_harvested))
        self.cfg = cfg
        # The compiled module shares the SAE's parameters; checkpoints keep saving the plain module.
        self.forward = torch.compile(sae) if cfg.compile else sae
        self.autocast_device = layer_index.device.type
        # The fused kernel updates each parameter in one pass, faster than the default for-each implementation
        # and without its temporaries (measured: docs/speed.md).
        fused = layer_index.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.firing = FiringCounter(sae.cfg.latent_size, cfg.dead_after_tokens, layer_index.device)
        self.recent: deque[dict[str, float]] = deque(maxlen=10)
        self.step_seconds = 0.0

    def step(self, acts_NLD: Tensor, lr: float, step: int) -> dict[str, float]:
        """One optimiser step; raises FloatingPointError (before touching the weights) on a NaN/inf loss."""
        start = time.perf_counter()
        state = TrainingState(step=step, dead_F=self.firing.dead())  # dead before this batch counts, as AuxK expects
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            out = self.forward(acts_NLD if self.reads_all else acts_NLD.index_select(1, self.layer_index))
            loss, terms = self.sae.loss(out, state)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.remove_parallel_grad:
            self.sae.remove_parallel_gradient()
        self.optimizer.step()
        if (step + 1) % self.cfg.renorm_every == 0:
            self.sae.normalize_decoder()
        self.sae.after_step(step)
        self.firing.update(out.latents)
        logged = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}
        self.recent.append(logged)
        self.step_seconds += time.perf_counter() - start
        return logged

    def final_terms(self) -> dict[str, float]:
        keys = self.recent[0].keys() if self.recent else []
        return {k: sum(r[k] for r in self.recent) / len(self.recent) for k in keys}

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
        step, extra = load_optimizer(self.optimizer, generation.trainer_state(self.name))
        self.firing.tokens_since_fired = extra[FIRING_STATE].to(device)
        return step


def build_trained_saes(
    specs: Sequence[SAESpec], model: ModelShape, cfg: TrainConfig, device: torch.device
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
        trained.append(TrainedSAE(name, sae, index, cfg, len(layers)))
    return layers, trained
