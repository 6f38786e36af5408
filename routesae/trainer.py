"""The training loop: one activation stream feeds every SAE of a run.

The language-model forward dominates the cost of training an SAE, so a run trains all of its
SAEs (architecture comparisons, sweeps) from the same shuffled batches. The :class:`Trainer`
receives everything it needs from :func:`routesae.train.train` — the run directory, the SAEs and
the stream, live or cached — and runs the loop: steps, progress reports, checkpoints, Ctrl-C and
the NaN guard. An interrupted run continues with ``resume=True`` and ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from safetensors.torch import load_file

from routesae.activations import too_few_tokens_advice
from routesae.distributed import SINGLE, Ranks
from routesae.errors import RouteSAEError
from routesae.faults import PluginFault, as_fault
from routesae.files import write_safetensors
from routesae.interrupt import Interrupt
from routesae.reporters import Reporter, StepReport
from routesae.run_records import RunRecords
from routesae.rundir import Generation, RunDirectory
from routesae.train_config import CHECKPOINT_SECONDS, TrainConfig, lr_factor
from routesae.trained_sae import TrainedSAE
from routesae.training_data import TrainingData

START = {"step": 0, "tokens": 0, "epoch": 0, "group": 0, "batch": 0}
"""Where a fresh run's stream and counters begin."""


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
        ranks: Ranks = SINGLE,
        changes: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``changes``: the settings a resume changes (``{setting: {"from": ..., "to": ...}}``), for ``run.json``."""
        self.cfg, self.saes, self.layers, self.data, self.run_dir = cfg, saes, layers, data, run_dir
        self.request, self.progress, self.reporters, self.ranks = request, dict(progress), reporters, ranks
        self.changes = changes or {}
        self.device = saes[0].layer_index.device
        self.stepping: str | None = None  # the SAE taking its step, for a fault's message
        self.records = RunRecords(cfg, saes, layers, data, run_dir, request, ranks)

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, finished: bool = False) -> None:
        """Write a new generation (every SAE, the RNG), then switch ``run.json`` to it in one atomic step.

        Every rank checks the losses and sums its statistics first (collectives); rank 0 alone writes.
        """
        self._check_finite()
        for t in self.saes:
            t.sync_sums()
        metas = {t.name: self.records.sae_meta(t, finished, self.progress) for t in self.saes}
        if self.ranks.writes:
            generation = self.run_dir.begin_generation(self.progress["step"])
            for t in self.saes:
                t.save(generation, metas[t.name], self.progress["step"])
            write_safetensors(generation.rng, {"cpu": torch.get_rng_state()})
            self.run_dir.commit(generation, self.records.manifest("finished" if finished else "running", self.progress))
        self.ranks.barrier()

    def _check_finite(self) -> None:
        """The NaN/inf guard, read back from the device at log steps and before every checkpoint."""
        for t in self.saes:
            try:
                t.check_finite()
            except FloatingPointError as e:
                raise RouteSAEError(
                    f"training diverged: SAE {t.name} {e}; the last checkpoint in {self.run_dir.path} is intact. "
                    "Lower --lr, then --resume (or --overwrite)"
                ) from None

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
        if self.ranks.writes:
            self.run_dir.publish(generation)  # repairs a publication a crash may have cut short

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.tokens`` tokens; returns the summary (also given to the reporters)."""
        total_steps = self._total_steps()
        generation = self.run_dir.current_generation() if self.progress["step"] else None
        if generation is not None:
            self._restore(generation)
            if self.ranks.writes:
                self.run_dir.rewind_metrics(self.progress["step"])
                resumes = self.run_dir.read_manifest().get("resumes", [])
                resume = {"step": self.progress["step"], "changes": self.changes}
                manifest = self.records.manifest("running", self.progress)
                self.run_dir.update_manifest({**manifest, "resumes": [*resumes, resume]})
        elif self.ranks.writes:
            self.run_dir.start(self.records.manifest("running", self.progress))  # a fresh (or overwritten) run: fresh manifest and log
        try:
            for r in self.reporters:
                r.start(self.records.manifest("running", self.progress))
            summary = self._loop(total_steps)
            for r in self.reporters:
                r.finish(summary)
            return summary
        except RouteSAEError:
            raise  # interruptions and divergence: the run stays resumable and the message says how
        except Exception as e:
            fault = as_fault(e, self._where(), self._failure_advice())
            self._record_failure(fault)
            if fault is e:
                raise
            raise fault from e
        finally:
            for r in self.reporters:
                r.close()

    def _where(self) -> str:
        sae = f" SAE {self.stepping!r}" if self.stepping else ""
        return f"while training{sae} at step {self.progress['step']}"

    def _checkpointed_step(self) -> int | None:
        """The step of the run's last complete checkpoint, or None before the first."""
        manifest = self.run_dir.read_manifest() if self.run_dir.exists() else {}
        step = manifest.get("progress", {}).get("step", 0)
        return step if "checkpoint" in manifest and step else None

    def _failure_advice(self) -> str:
        step = self._checkpointed_step()
        if step is None:
            return "nothing was checkpointed yet: once it is fixed, the same command starts the run afresh"
        return f"the run is intact at its checkpoint of step {step}: once it is fixed, continue it with --resume"

    def _record_failure(self, error: BaseException) -> None:
        """Mark the run failed in ``run.json`` (its progress and checkpoint stay the last complete generation's), so a
        run that failed before its first checkpoint starts afresh without --overwrite (:meth:`RunDirectory.prepare`)."""
        if not self.ranks.writes or not self.run_dir.exists():
            return
        failure = {"step": self.progress["step"], "error": f"{type(error).__name__}: {error}"}
        if isinstance(error, PluginFault):
            failure["plugin"] = {"name": error.plugin.name, "distribution": error.plugin.distribution,
                                 "version": error.plugin.version}
        failures = self.run_dir.read_manifest().get("failures", [])
        self.run_dir.update_manifest({"status": "failed", "failures": [*failures, failure]})

    def _total_steps(self) -> int:
        """Steps until ``cfg.tokens`` tokens, from the stream's batch plan (no LM needed)."""
        seen = 0
        for steps, size in enumerate(self.data.stream.batch_sizes(), start=1):
            seen += size
            if seen >= self.cfg.tokens:
                return steps
        one_pass, epochs = self.data.stream.pass_tokens, self.data.stream.epochs
        raise RouteSAEError(
            f"asked for {self.cfg.tokens:,} training tokens but the train split of {self.cfg.dataset!r} holds "
            f"{one_pass:,} usable tokens (context {self.cfg.context_length}){too_few_tokens_advice(self.cfg.tokens, one_pass, epochs)}"
        )

    def _decisions(self, step: int, last_checkpoint: float, interrupt: Interrupt, logging: bool) -> tuple[bool, bool]:
        """(stop for Ctrl-C, checkpoint now) after ``step`` steps.

        One process decides after every step. Under ``torchrun`` the ranks must decide alike, so
        what depends on the clock or on a signal (Ctrl-C, a timed checkpoint) is agreed at log steps.
        """
        every = self.cfg.checkpoint_every
        stepped = bool(every) and step % every == 0
        if self.ranks.distributed and not logging:
            return False, stepped
        timed = every is None and time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
        stop, timed = self.ranks.agree(interrupt.requested, timed)
        return stop, stepped or timed

    def _loop(self, total_steps: int) -> dict[str, Any]:
        cfg, stream = self.cfg, self.data.stream
        start_tokens = self.progress["tokens"]
        started = last_checkpoint = time.monotonic()
        interrupt = Interrupt()
        try:
            with interrupt.installed():
                for acts in stream:  # this rank's share of each batch; the stream stops at cfg.tokens
                    acts = acts.to(self.device, non_blocking=True)
                    step = self.progress["step"]
                    lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup, cfg.decay, cfg.schedule)
                    for t in self.saes:
                        self.stepping = t.name
                        t.step(acts, lr, step, stream.batch_tokens)
                    self.stepping = None
                    del acts  # before the stream allocates the next batch: one multi-layer batch alive, not two
                    group, batch = stream.position
                    tokens = self.progress["tokens"] + stream.batch_tokens
                    self.progress = {"step": step + 1, "tokens": tokens, "epoch": stream.epoch, "group": group, "batch": batch}
                    elapsed = time.monotonic() - started
                    for r in self.reporters:
                        r.tick(tokens, (tokens - start_tokens) / elapsed if elapsed > 0 else 0.0)
                    logging = (step + 1) % cfg.log_every == 0
                    if logging:
                        self._report(lr, time.monotonic() - started, start_tokens, total_steps)
                    if tokens >= cfg.tokens:
                        break
                    stop, due = self._decisions(step + 1, last_checkpoint, interrupt, logging)
                    if stop:
                        raise KeyboardInterrupt
                    if due:
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
        return self.records.summary(seconds, self.progress["tokens"] - start_tokens, self.progress)

    def _report(self, lr: float, seconds: float, start_tokens: int, total_steps: int) -> None:
        self._check_finite()
        logged = {t.name: t.logged() for t in self.saes}
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
