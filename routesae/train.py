"""Set up a training run and hand it to the :class:`~routesae.trainer.Trainer`.

:func:`train` joins the ``torchrun`` job if there is one (:mod:`routesae.distributed`), takes the
run's writer lock (:mod:`routesae.locks`), checks the run directory against the request
(:mod:`routesae.rundir`), builds the SAEs (:mod:`routesae.trained_sae`) and chooses the activation
stream, live or cached (:mod:`routesae.training_data`); the trainer only runs the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from routesae.cache import ActivationCache
from routesae.distributed import Ranks, joined
from routesae.errors import RouteSAEError
from routesae.faults import contained
from routesae.lm import LanguageModel
from routesae.locks import writing
from routesae.plugins import PluginManager, activated
from routesae.reporters.build import build_reporters
from routesae.rundir import RunDirectory
from routesae.specs import SAESpec
from routesae.train_config import TrainConfig, compare_requests, run_request
from routesae.trained_sae import build_trained_saes
from routesae.trainer import START, Trainer
from routesae.training_data import cached_data, live_data


def train(
    specs: Sequence[SAESpec],
    out: Path | str,
    cfg: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporters: list[str] | None = None,
    lm: LanguageModel | None = None,
    plugins: PluginManager | None = None,
) -> dict[str, Any]:
    """Train SAEs from one activation harvest; see :class:`TrainConfig` for the settings.

    Everything that can be refused is checked before the model loads: the run directory against
    the request, the reporters, the cache. With ``cfg.from_cache`` the activations come from an
    activation cache and no language model is loaded. ``plugins``: the plugin manager whose
    architectures and reporters the run uses (default: the one in use).

    >>> train([SAESpec.build("topk", k=32, layer=21)], "runs/demo", TrainConfig(tokens=200_000))
    """
    cfg = cfg or TrainConfig()
    run_dir = RunDirectory(out)
    with (
        joined(cfg.resolved_device()) as (ranks, device),
        activated(plugins),
        writing(run_dir.path, "train", enabled=ranks.writes),
    ):
        return _train(specs, run_dir, cfg, ranks, device, overwrite=overwrite, resume=resume, reporters=reporters, lm=lm)


def _train(
    specs: Sequence[SAESpec],
    run_dir: RunDirectory,
    cfg: TrainConfig,
    ranks: Ranks,
    device: torch.device,
    *,
    overwrite: bool,
    resume: bool,
    reporters: list[str] | None,
    lm: LanguageModel | None,
) -> dict[str, Any]:
    request = run_request(specs, cfg)
    resumed, changes = run_dir.prepare(request, overwrite=overwrite, resume=resume, compare=compare_requests)
    if ranks.writes:
        run_dir.remove_orphans()  # under the lock: whatever a killed writer left
    ranks.barrier()  # every rank has read run.json before rank 0 writes a fresh one
    if resumed and resumed.get("world_size", 1) != ranks.world_size:
        raise RouteSAEError(
            f"cannot resume: {run_dir.path} was trained by {resumed.get('world_size', 1)} process(es), this is "
            f"{ranks.world_size}; resume with the same number (torchrun --nproc-per-node ...), or --overwrite"
        )
    progress = resumed.get("progress", START) if resumed else START
    wanted = reporters if reporters is not None else ["console"]
    built_reporters = build_reporters(wanted, run_dir.path) if ranks.writes else []
    position = (progress.get("epoch", 0), progress["group"], progress["batch"])  # runs before --epochs: epoch 0
    building = contained("while building the SAEs", "nothing was written to the run")
    if cfg.from_cache:
        cache = ActivationCache(cfg.from_cache)
        cache.check_train_config(cfg)
        with building:
            layers, saes = build_trained_saes(specs, cache.model, cfg, device, ranks)
        data = cached_data(cache, cfg, layers, {t.name: t.sae.layers for t in saes}, position, ranks.shard)
    else:
        lm = lm or LanguageModel.load(cfg.model, device=device)
        with building:
            layers, saes = build_trained_saes(specs, lm, cfg, device, ranks)
        data = live_data(lm, cfg, layers, position, ranks.shard)
    if cfg.tokens is None:  # --epochs N without --tokens: N whole passes, as many tokens as the stream holds
        cfg = cfg.replace(tokens=cfg.epochs * data.stream.pass_tokens)
    trainer = Trainer(
        cfg, saes, layers, data, run_dir, request=request, progress=progress, reporters=built_reporters, ranks=ranks,
        changes=changes.record() if changes else {},
    )
    return trainer.run()
