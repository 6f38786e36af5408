"""The training loop: one activation stream feeds every SAE of a run.

The language-model forward dominates the cost of training an SAE, so a run trains all of its
SAEs (architecture comparisons, sweeps) from the same shuffled batches. :func:`train` sets a run
up — the run directory and its request (:mod:`routesae.rundir`), the SAEs
(:mod:`routesae.trained_sae`), the stream, live or cached (:mod:`routesae.training_data`) — and the
:class:`Trainer` runs the loop: steps, progress reports, checkpoints, Ctrl-C and the NaN guard.
An interrupted run continues with ``resume=True`` and ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from routesae.cache import ActivationCache
from routesae.errors import RouteSAEError
from routesae.files import write_safetensors
from routesae.interrupt import Interrupt
from routesae.lm import LanguageModel
from routesae.plugins import PluginManager, activated
from routesae.reporters import Reporter, StepReport
from routesae.reporters.build import build_reporters
from routesae.rundir import Generation, RunDirectory
from routesae.specs import SAESpec
from routesae.train_config import CHECKPOINT_SECONDS, TrainConfig, lr_factor, run_request, upgrade_request
from routesae.trained_sae import TrainedSAE, build_trained_saes
from routesae.training_data import TrainingData, cached_data, live_data
from routesae.version import __version__

START = {"step": 0, "tokens": 0, "group": 0, "batch": 0}


class Trainer:
    """Train ``saes`` on ``data.stream`` to ``cfg.tokens`` tokens, checkpointing into ``run_dir``.

    A resumed run continues bit-identically: a checkpoint generation holds weights, optimiser
    state, dead-latent counters, the RNG and the stream position (``progress``), and the stream
    re-derives everything else from the data.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        saes: list[TrainedSAE],
        layers: list[int],
        data: TrainingData,
        run_dir: RunDirectory,
        *,
        request: dict[str, Any],
        progress: dict[str, int],
        reporters: list[Reporter],
    ) -> None:
        self.cfg, self.saes, self.layers, self.data, self.run_dir = cfg, saes, layers, data, run_dir
        self.request, self.progress, self.reporters = request, dict(progress), reporters
        self.device = saes[0].layer_index.device

    # -- records --------------------------------------------------------------------------------
    def _manifest(self, status: str) -> dict[str, Any]:
        """The training sections of ``run.json``."""
        return {
            "routesae_version": __version__,
            "request": self.request,
            "status": status,
            "progress": self.progress,
            "model": self.data.model.describe(),
            "data": {k: v for k, v in self.data.description.items() if k not in ("split", "keep_bos")},
            "layers": self.layers,
            "saes": [
                {"name": t.name, "architecture": t.sae.name, "config": t.sae.cfg.to_dict(), "path": t.name} for t in self.saes
            ],
            "train": self.cfg.to_dict(),
        }

    def _sae_meta(self, t: TrainedSAE, finished: bool) -> dict[str, Any]:
        """What an SAE's ``config.json`` records beyond its architecture: model, hooks, data, training."""
        model = self.data.model
        return {
            "name": t.name,
            "model": model.describe(),
            "hooks": [model.hook_name(layer) for layer in t.sae.layers],
            "hf_hidden_states_index": [layer + 1 for layer in t.sae.layers],
            "data": self.data.description,
            "training": {
                **self.cfg.to_dict(),
                "finished": finished,
                "steps_done": self.progress["step"],
                "tokens_done": self.progress["tokens"],
                "final": t.final_terms(),
                "dead_fraction": t.dead_fraction(),
                "statistics": t.sae.statistics(),
            },
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, finished: bool = False) -> None:
        """Write a new generation (every SAE, the RNG), then switch ``run.json`` to it in one atomic step."""
        generation = self.run_dir.begin_generation(self.progress["step"])
        for t in self.saes:
            t.save(generation, self._sae_meta(t, finished), self.progress["step"])
        write_safetensors(generation.rng, {"cpu": torch.get_rng_state()})
        self.run_dir.commit(generation, self._manifest("finished" if finished else "running"))

    def _restore(self, generation: Generation) -> None:
        """Weights, optimiser state, counters and RNG of the current generation, for ``resume``."""
        for t in self.saes:
            saved_step = t.restore(generation)
            if saved_step != self.progress["step"]:
                raise RouteSAEError(
                    f"cannot resume: {generation.sae_dir(t.name)} is at step {saved_step} but the run's manifest says "
                    f"{self.progress['step']}; the checkpoint is inconsistent, use --overwrite to start over"
                )
        torch.set_rng_state(load_file(generation.rng)["cpu"])
        self.run_dir.publish(generation)  # repairs a publication a crash may have cut short

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.tokens`` tokens; returns the summary (also given to the reporters)."""
        total_steps = self._total_steps()
        generation = self.run_dir.current_generation() if self.progress["step"] else None
        if generation is not None:
            self._restore(generation)
            self.run_dir.update_manifest(self._manifest("running"))
        else:
            self.run_dir.start(self._manifest("running"))  # a fresh (or overwritten) run: fresh manifest and log
        try:
            for r in self.reporters:
                r.start(self._manifest("running"))
            summary = self._loop(total_steps)
            for r in self.reporters:
                r.finish(summary)
            return summary
        finally:
            for r in self.reporters:
                r.close()

    def _total_steps(self) -> int:
        """Steps until ``cfg.tokens`` tokens, from the stream's batch plan (no LM needed)."""
        seen = 0
        for steps, size in enumerate(self.data.stream.batch_sizes(), start=1):
            seen += size
            if seen >= self.cfg.tokens:
                return steps
        raise RouteSAEError(
            f"asked for {self.cfg.tokens:,} training tokens but the train split of {self.cfg.dataset!r} holds "
            f"{seen:,} usable tokens (context {self.cfg.context_length}); lower --tokens or use a larger --dataset"
        )

    def _checkpoint_due(self, step: int, last_checkpoint: float) -> bool:
        if self.cfg.checkpoint_every is None:
            return time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
        return self.cfg.checkpoint_every > 0 and step % self.cfg.checkpoint_every == 0

    def _loop(self, total_steps: int) -> dict[str, Any]:
        cfg, stream = self.cfg, self.data.stream
        start_tokens = self.progress["tokens"]
        started = last_checkpoint = time.monotonic()
        interrupt = Interrupt()
        try:
            with interrupt.installed():
                for acts in stream:
                    acts = acts[: cfg.tokens - self.progress["tokens"]].to(self.device, non_blocking=True)
                    step = self.progress["step"]
                    lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup, cfg.decay, cfg.schedule)
                    logged = {t.name: self._step(t, acts, lr, step) for t in self.saes}
                    served = acts.shape[0]
                    del acts  # before the stream allocates the next batch: one multi-layer batch alive, not two
                    group, batch = stream.position
                    self.progress = {"step": step + 1, "tokens": self.progress["tokens"] + served, "group": group, "batch": batch}
                    if (step + 1) % cfg.log_every == 0:
                        self._report(logged, lr, time.monotonic() - started, start_tokens, total_steps)
                    if self.progress["tokens"] >= cfg.tokens:
                        break
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    if self._checkpoint_due(step + 1, last_checkpoint):
                        self.checkpoint()
                        last_checkpoint = time.monotonic()
        except KeyboardInterrupt:
            where = self.run_dir.path
            if interrupt.forced:
                raise RouteSAEError(f"interrupted mid-step; the last checkpoint in {where} is intact, continue with --resume") from None
            self.checkpoint()
            raise RouteSAEError(f"interrupted at step {self.progress['step']}; checkpoint saved in {where}, continue with --resume") from None
        seconds = time.monotonic() - started
        for t in self.saes:
            t.sae.normalize_decoder()
        self.checkpoint(finished=True)
        return self._summary(seconds, self.progress["tokens"] - start_tokens)

    def _step(self, t: TrainedSAE, acts: Tensor, lr: float, step: int) -> dict[str, float]:
        try:
            return t.step(acts, lr, step)
        except FloatingPointError as e:
            raise RouteSAEError(
                f"training diverged: SAE {t.name} {e} at step {step}; the last checkpoint in {self.run_dir.path} is intact. "
                "Lower --lr, then --resume (or --overwrite)"
            ) from None

    def _report(self, logged: dict[str, dict[str, float]], lr: float, seconds: float, start_tokens: int, total_steps: int) -> None:
        report = StepReport(
            step=self.progress["step"],
            total_steps=total_steps,
            tokens=self.progress["tokens"],
            total_tokens=self.cfg.tokens,
            seconds=seconds,
            tokens_per_s=(self.progress["tokens"] - start_tokens) / seconds if seconds > 0 else 0.0,
            lr=lr,
            saes=logged,
        )
        for r in self.reporters:
            r.step(report)

    def _summary(self, seconds: float, session_tokens: int) -> dict[str, Any]:
        """The run's outcome and timings.

        ``seconds`` is the training loop's wall time in this session (model loading and tokenisation
        excluded); ``tokens_per_s`` is ``session_tokens / seconds``, which equals ``tokens / seconds``
        unless the run was resumed. ``harvest_seconds`` is the part spent obtaining and shuffling
        activations (LM forwards, or cache reads), ``sae_step_seconds`` each SAE's own steps.
        """
        rate = session_tokens / seconds if seconds > 0 else 0.0
        timing = {"tokens": self.progress["tokens"], "session_tokens": session_tokens, "seconds": seconds, "tokens_per_s": rate}
        return {
            "run": str(self.run_dir.path),
            "model": self.cfg.model,
            "source": self.data.source,
            "layers": self.layers,
            **timing,
            "steps": self.progress["step"],
            "harvest_seconds": self.data.stream.harvest_seconds,
            "sae_step_seconds": sum(t.step_seconds for t in self.saes),
            "saes": [
                {
                    "name": t.name,
                    "architecture": t.sae.name,
                    "layers": list(t.sae.layers),
                    **timing,
                    "sae_step_seconds": t.step_seconds,
                    "final": t.final_terms(),
                    "dead_fraction": t.dead_fraction(),
                    "statistics": t.sae.statistics(),
                    "path": str(self.run_dir.sae_dir(t.name)),
                }
                for t in self.saes
            ],
        }


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
    with activated(plugins):
        request = run_request(specs, cfg)
        resumed = run_dir.prepare(request, overwrite=overwrite, resume=resume, upgrade=upgrade_request)
        progress = resumed.get("progress", START) if resumed else START
        built_reporters = build_reporters(reporters if reporters is not None else ["console"], run_dir.path)
        device, position = cfg.resolved_device(), (progress["group"], progress["batch"])
        if cfg.from_cache:
            cache = ActivationCache(cfg.from_cache)
            cache.check_train_config(cfg)
            layers, saes = build_trained_saes(specs, cache.model, cfg, device)
            data = cached_data(cache, cfg, layers, {t.name: t.sae.layers for t in saes}, position)
        else:
            lm = lm or LanguageModel.load(cfg.model, device=device)
            layers, saes = build_trained_saes(specs, lm, cfg, device)
            data = live_data(lm, cfg, layers, position)
        trainer = Trainer(cfg, saes, layers, data, run_dir, request=request, progress=progress, reporters=built_reporters)
        return trainer.run()
