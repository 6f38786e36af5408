"""What a training run records: the training sections of ``run.json``, each SAE's ``config.json`` beyond its
architecture, and the summary ``train`` returns (and ``--json`` prints).

Kept apart from the loop (:mod:`routesae.trainer`) so what a run writes reads in one place.
"""

from __future__ import annotations

from typing import Any

from routesae.checkpoint import plugin_provenance
from routesae.distributed import Ranks
from routesae.rundir import RunDirectory
from routesae.train_config import TrainConfig
from routesae.trained_sae import TrainedSAE
from routesae.training_data import TrainingData
from routesae.version import __version__


class RunRecords:
    """The records of one run, built from its settings, SAEs and data at the ``progress`` they are asked for."""

    def __init__(self, cfg: TrainConfig, saes: list[TrainedSAE], layers: list[int], data: TrainingData,
                 run_dir: RunDirectory, request: dict[str, Any], ranks: Ranks) -> None:
        self.cfg, self.saes, self.layers, self.data, self.run_dir = cfg, saes, layers, data, run_dir
        self.request, self.ranks = request, ranks

    def manifest(self, status: str, progress: dict[str, int]) -> dict[str, Any]:
        """The training sections of ``run.json``."""
        return {
            "routesae_version": __version__,
            "request": self.request,
            "status": status,
            "progress": progress,
            "model": self.data.model.describe(),
            "data": {k: v for k, v in self.data.description.items() if k not in ("split", "keep_bos")},
            "layers": self.layers,
            "saes": [
                {
                    "name": t.name,
                    "architecture": t.sae.name,
                    "config": t.sae.cfg.to_dict(),
                    "path": t.name,
                    "plugins": plugin_provenance(t.sae),
                }
                for t in self.saes
            ],
            "train": self.cfg.to_dict(),
            "world_size": self.ranks.world_size,
        }

    def sae_meta(self, t: TrainedSAE, finished: bool, progress: dict[str, int]) -> dict[str, Any]:
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
                "steps_done": progress["step"],
                "tokens_done": progress["tokens"],
                "epoch_tokens": self.data.stream.pass_tokens,
                "epochs_done": round(progress["tokens"] / max(1, self.data.stream.pass_tokens), 4),
                "final": t.final_terms(),
                "dead_fraction": t.dead_fraction(),
                "statistics": t.sae.statistics(),
            },
        }

    def summary(self, seconds: float, session_tokens: int, progress: dict[str, int]) -> dict[str, Any]:
        """The run's outcome and timings.

        ``seconds`` is the training loop's wall time in this session (model loading and tokenisation
        excluded); ``tokens_per_s`` is ``session_tokens / seconds``, which equals ``tokens / seconds``
        unless the run was resumed. ``harvest_seconds`` is the part spent obtaining and shuffling
        activations (LM forwards, or cache reads), ``sae_step_seconds`` each SAE's own steps.
        """
        rate = session_tokens / seconds if seconds > 0 else 0.0
        timing = {"tokens": progress["tokens"], "session_tokens": session_tokens, "seconds": seconds, "tokens_per_s": rate}
        return {
            "run": str(self.run_dir.path),
            "model": self.cfg.model,
            "source": self.data.source,
            "layers": self.layers,
            **timing,
            "steps": progress["step"],
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
