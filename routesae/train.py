"""The trainer: one activation harvest feeds every SAE of a run.

The language-model forward dominates the cost of training an SAE, so a run trains all of its
SAEs (architecture comparisons, sweeps) from the same shuffled batches. A run directory holds
``run.json`` (what was asked for and how far training got), one checkpoint directory per SAE
and ``metrics.jsonl``; an interrupted run continues with ``resume=True`` and ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from routesae.activations import ActivationStream, ShuffledStream
from routesae.architectures.base import SAE
from routesae.cache import ActivationCache, CachedModel, CachedStream
from routesae.checkpoint import load_optimizer, save_optimizer, save_sae
from routesae.data import Corpus, load_corpus
from routesae.errors import ConfigError, RouteSAEError
from routesae.files import read_json, write_json, write_safetensors
from routesae.lm import LanguageModel
from routesae.plugins import get_plugin_manager
from routesae.reporters import build_reporters
from routesae.reporters.base import StepReport
from routesae.rundir import METRICS_FILE, RNG_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE
from routesae.specs import SAESpec
from routesae.train_config import CHECKPOINT_SECONDS, TrainConfig, lr_factor, run_request
from routesae.version import __version__

MANIFEST_FILE = "run.json"


class Interrupt:
    """Ctrl-C as a flag checked between steps, so a checkpoint never holds half a step.

    The first Ctrl-C sets ``requested``; a second one interrupts at once (``forced``), and then
    no checkpoint is written from the half-done step.
    """

    def __init__(self) -> None:
        self.hits = 0

    @property
    def requested(self) -> bool:
        return self.hits > 0

    @property
    def forced(self) -> bool:
        return self.hits > 1

    def _handler(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.forced:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Catch SIGINT while active (a no-op outside the main thread, where signals cannot be caught)."""
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


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
        # The fused kernel updates each parameter in one pass: on CPU 4x faster than the default for-each
        # implementation (4,096 x 576 matrices) and without its temporaries.
        fused = layer_index.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.since_fired = torch.zeros(sae.cfg.latent_size, dtype=torch.long)
        self.recent: deque[dict[str, float]] = deque(maxlen=10)
        self.step_seconds = 0.0

    def step(self, acts_NLD: Tensor, lr: float, step: int) -> dict[str, float]:
        """One optimiser step; raises FloatingPointError (before touching the weights) on a NaN/inf loss."""
        start = time.perf_counter()
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            out = self.forward(acts_NLD if self.reads_all else acts_NLD.index_select(1, self.layer_index))
            loss, terms = self.sae.loss(out)
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
        fired = (out.latents != 0).any(0).cpu()
        self.since_fired += acts_NLD.shape[0]
        self.since_fired[fired] = 0
        logged = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}
        self.recent.append(logged)
        self.step_seconds += time.perf_counter() - start
        return logged

    def final_terms(self) -> dict[str, float]:
        keys = self.recent[0].keys() if self.recent else []
        return {k: sum(r[k] for r in self.recent) / len(self.recent) for k in keys}

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_after_tokens).float().mean())

    def save_state(self, path: Path, step: int) -> None:
        save_optimizer(self.optimizer, path, step, extra={"since_fired": self.since_fired})

    def load_state(self, path: Path) -> int:
        step, extra = load_optimizer(self.optimizer, path)
        self.since_fired = extra["since_fired"]
        return step


class Trainer:
    """Train ``specs`` on activations of ``cfg.model`` over ``cfg.dataset``, checkpointing into ``out``.

    A resumed run continues bit-identically: the checkpoint holds weights, optimiser state, the
    RNG and the stream position, and the stream re-derives everything else from the data.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        specs: list[SAESpec],
        out: Path | str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        reporters: list[str] | None = None,
        lm: LanguageModel | None = None,
    ) -> None:
        if not specs:
            raise ConfigError("nothing to train: give at least one architecture")
        self.cfg = cfg
        self.specs = specs
        self.out = Path(out)
        self.request = run_request(specs, cfg)
        self.progress = self._check_out_dir(overwrite, resume)
        self.reporters = build_reporters(reporters if reporters is not None else ["console"], self.out)
        self.device = cfg.resolved_device()
        # Training from a cache needs the model's shape and identity only, which the cache records.
        self.cache = ActivationCache(cfg.from_cache) if cfg.from_cache else None
        self.lm: LanguageModel | None = None
        self.model: LanguageModel | CachedModel
        if self.cache is not None:
            self.cache.check_train_config(cfg)
            self.model = self.cache.model
        else:
            self.model = self.lm = lm or LanguageModel.load(cfg.model, device=self.device)
        self.saes = self._build_saes()
        if self.cache is not None:
            self._check_cached_blocks(self.cache)
        self.corpus: Corpus | None = None
        self.data: dict[str, Any] | None = None  # the training data's describe(), once loaded

    # -- set-up -------------------------------------------------------------------------------
    def _check_out_dir(self, overwrite: bool, resume: bool) -> dict[str, int]:
        """Refuse to mix runs in one directory; return where training should start."""
        start = {"step": 0, "tokens": 0, "group": 0, "batch": 0}
        if self.out.exists() and not self.out.is_dir():
            raise RouteSAEError(f"--out {self.out} is a file; give a directory")
        manifest_path = self.out / MANIFEST_FILE
        if not manifest_path.exists():
            if resume:
                raise RouteSAEError(f"nothing to resume: {self.out} holds no run ({MANIFEST_FILE} is missing)")
            return start
        existing = read_json(manifest_path)
        same = existing.get("request") == self.request
        if resume:
            if not same:
                raise RouteSAEError(
                    f"cannot resume: {self.out} holds a run with different settings; resume with the same options, "
                    "or use --overwrite to start over"
                )
            if existing.get("status") == "finished":
                raise RouteSAEError(f"{self.out} holds a finished run; nothing to resume (use --overwrite to retrain)")
            return existing.get("progress", start)
        if overwrite:
            return start
        if same and existing.get("status") == "finished":
            raise RouteSAEError(f"{self.out} already holds this finished run; use --overwrite to train it again")
        if same:
            raise RouteSAEError(f"{self.out} holds an unfinished run of these settings; continue it with --resume (or --overwrite)")
        raise RouteSAEError(f"{self.out} already holds a different run; choose another --out, or --overwrite to replace it")

    def _build_saes(self) -> list[TrainedSAE]:
        pm = get_plugin_manager()
        resolved = [(s, s.config.resolve(self.model.n_layers)) for s in self.specs]
        self.layers = sorted({layer for _, c in resolved for layer in c.resolved_layers()})
        names = [s.name or "-".join([s.architecture, *c.name_parts()]) for s, c in resolved]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigError(f"two SAEs in this run would share the name {sorted(duplicates)[0]!r}; give them distinct names")
        trained = []
        for (spec, config), name in zip(resolved, names):
            arch = pm.get("architecture", spec.architecture)
            torch.manual_seed(seed_for(self.cfg.seed, name))
            sae = arch(config, self.model.d_model).to(self.device).train()
            index = torch.tensor([self.layers.index(layer) for layer in config.resolved_layers()], device=self.device)
            trained.append(TrainedSAE(name, sae, index, self.cfg, len(self.layers)))
        return trained

    def _check_cached_blocks(self, cache: ActivationCache) -> None:
        lacking = [f"{t.name} reads {cache.missing_blocks(t.sae.layers)}" for t in self.saes if cache.missing_blocks(t.sae.layers)]
        if lacking:
            raise RouteSAEError(
                f"the activation cache in {cache.path} holds blocks {cache.layers}, but {'; '.join(lacking)}: cache those "
                "blocks too (routesae cache --layer N / --layers A:B) or train without --from-cache"
            )

    def _stream(self) -> ShuffledStream:
        """The live harvest, or the same batches read from the cache; loads the training data's description."""
        shuffle = {
            "lm_batch_size": self.cfg.batch_size,
            "sae_batch_tokens": self.cfg.sae_batch_tokens,
            "buffer_tokens": self.cfg.buffer_tokens,
            "seed": self.cfg.seed,
            "position": (self.progress["group"], self.progress["batch"]),
            "prefetch": self.cfg.overlap_harvest,
        }
        if self.cache is not None:
            self.data = self.cache.data
            return CachedStream(self.cache, self.layers, **shuffle)
        assert self.lm is not None
        self.corpus = load_corpus(
            self.cfg.dataset, self.lm.tokenizer, context_length=self.cfg.context_length, text_field=self.cfg.text_field, seed=self.cfg.seed
        )
        self.data = {**self.corpus.describe(), "split": "train", "keep_bos": self.cfg.keep_bos}
        return ActivationStream(self.lm, self.corpus.split("train"), self.layers, keep_bos=self.cfg.keep_bos, **shuffle)

    def _total_steps(self, stream: ShuffledStream) -> int:
        """Steps until ``cfg.tokens`` tokens, from the stream's batch plan (no LM needed)."""
        seen = 0
        for steps, size in enumerate(stream.batch_sizes(), start=1):
            seen += size
            if seen >= self.cfg.tokens:
                return steps
        raise RouteSAEError(
            f"asked for {self.cfg.tokens:,} training tokens but the train split of {self.cfg.dataset!r} holds "
            f"{seen:,} usable tokens (context {self.cfg.context_length}); lower --tokens or use a larger --dataset"
        )

    def _manifest(self, status: str) -> dict[str, Any]:
        assert self.data is not None
        return {
            "routesae_version": __version__,
            "request": self.request,
            "status": status,
            "progress": self.progress,
            "model": self.model.describe(),
            "data": {k: v for k, v in self.data.items() if k not in ("split", "keep_bos")},
            "layers": self.layers,
            "saes": [
                {"name": t.name, "architecture": t.sae.name, "config": t.sae.cfg.to_dict(), "path": t.name}
                for t in self.saes
            ],
            "train": self.cfg.to_dict(),
        }

    def _restore(self) -> None:
        """Weights, optimiser state and RNG of the last checkpoint, for ``resume``."""
        for t in self.saes:
            directory = self.out / t.name
            t.sae.load_state_dict(load_file(directory / WEIGHTS_FILE, device=str(self.device)))
            saved_step = t.load_state(directory / TRAINER_STATE_FILE)
            if saved_step != self.progress["step"]:
                raise RouteSAEError(
                    f"cannot resume: {directory} is at step {saved_step} but {MANIFEST_FILE} says {self.progress['step']}; "
                    "the checkpoint is inconsistent, use --overwrite to start over"
                )
        torch.set_rng_state(load_file(self.out / RNG_FILE)["cpu"])

    # -- checkpoints --------------------------------------------------------------------------
    def _sae_meta(self, t: TrainedSAE, finished: bool) -> dict[str, Any]:
        assert self.data is not None
        return {
            "name": t.name,
            "model": self.model.describe(),
            "hooks": [self.model.hook_name(layer) for layer in t.sae.layers],
            "hf_hidden_states_index": [layer + 1 for layer in t.sae.layers],
            "data": self.data,
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

    def checkpoint(self, finished: bool = False) -> None:
        """Each SAE's files first, then the manifest: the manifest never points past what is on disk."""
        for t in self.saes:
            directory = self.out / t.name
            save_sae(t.sae, directory, self._sae_meta(t, finished))
            t.save_state(directory / TRAINER_STATE_FILE, self.progress["step"])
        write_safetensors(self.out / RNG_FILE, {"cpu": torch.get_rng_state()})
        write_json(self.out / MANIFEST_FILE, self._manifest("finished" if finished else "running"))

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.tokens`` tokens; returns the summary (also given to the reporters)."""
        stream = self._stream()
        total_steps = self._total_steps(stream)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.progress["step"]:
            self._restore()
        else:
            (self.out / METRICS_FILE).unlink(missing_ok=True)  # a fresh (or overwritten) run starts a fresh log
        write_json(self.out / MANIFEST_FILE, self._manifest("running"))
        try:
            for r in self.reporters:
                r.start(self._manifest("running"))
            summary = self._loop(stream, total_steps)
            for r in self.reporters:
                r.finish(summary)
            return summary
        finally:
            for r in self.reporters:
                r.close()

    def _checkpoint_due(self, step: int, last_checkpoint: float) -> bool:
        if self.cfg.checkpoint_every is None:
            return time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS
        return self.cfg.checkpoint_every > 0 and step % self.cfg.checkpoint_every == 0

    def _loop(self, stream: ShuffledStream, total_steps: int) -> dict[str, Any]:
        cfg = self.cfg
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
            if interrupt.forced:
                raise RouteSAEError(f"interrupted mid-step; the last checkpoint in {self.out} is intact, continue with --resume") from None
            self.checkpoint()
            raise RouteSAEError(
                f"interrupted at step {self.progress['step']}; checkpoint saved in {self.out}, continue with --resume"
            ) from None
        seconds = time.monotonic() - started
        for t in self.saes:
            t.sae.normalize_decoder()
        self.checkpoint(finished=True)
        return self._summary(seconds, self.progress["tokens"] - start_tokens, stream.harvest_seconds)

    def _step(self, t: TrainedSAE, acts: Tensor, lr: float, step: int) -> dict[str, float]:
        try:
            return t.step(acts, lr, step)
        except FloatingPointError as e:
            raise RouteSAEError(
                f"training diverged: SAE {t.name} {e} at step {step}; the last checkpoint in {self.out} is intact. "
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

    def _summary(self, seconds: float, session_tokens: int, harvest_seconds: float) -> dict[str, Any]:
        """The run's outcome and timings.

        ``seconds`` is the training loop's wall time in this session (model loading and tokenisation
        excluded); ``tokens_per_s`` is ``session_tokens / seconds``, which equals ``tokens / seconds``
        unless the run was resumed. ``harvest_seconds`` is the part spent obtaining and shuffling
        activations (LM forwards, or cache reads), ``sae_step_seconds`` each SAE's own steps.
        """
        rate = session_tokens / seconds if seconds > 0 else 0.0
        return {
            "run": str(self.out),
            "model": self.cfg.model,
            "source": "cache" if self.cache is not None else "live",
            "layers": self.layers,
            "tokens": self.progress["tokens"],
            "session_tokens": session_tokens,
            "steps": self.progress["step"],
            "seconds": seconds,
            "tokens_per_s": rate,
            "harvest_seconds": harvest_seconds,
            "sae_step_seconds": sum(t.step_seconds for t in self.saes),
            "saes": [
                {
                    "name": t.name,
                    "architecture": t.sae.name,
                    "layers": list(t.sae.layers),
                    "tokens": self.progress["tokens"],
                    "session_tokens": session_tokens,
                    "seconds": seconds,
                    "tokens_per_s": rate,
                    "sae_step_seconds": t.step_seconds,
                    "final": t.final_terms(),
                    "dead_fraction": t.dead_fraction(),
                    "statistics": t.sae.statistics(),
                    "path": str(self.out / t.name),
                }
                for t in self.saes
            ],
        }


def train(
    specs: list[SAESpec],
    out: Path | str,
    cfg: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporters: list[str] | None = None,
    lm: LanguageModel | None = None,
) -> dict[str, Any]:
    """Train SAEs from one activation harvest; see :class:`TrainConfig` for the settings.

    >>> train([SAESpec.build("topk", k=32, layer=21)], "runs/demo", TrainConfig(tokens=200_000))
    """
    trainer = Trainer(cfg or TrainConfig(), specs, out, overwrite=overwrite, resume=resume, reporters=reporters, lm=lm)
    return trainer.run()
