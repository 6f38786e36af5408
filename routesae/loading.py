"""Reopen what a trained SAE was made from: its language model and its corpus.

Evaluation, context extraction, steering and the pipeline all start from checkpoint directories.
A checkpoint's ``config.json`` records which model it reads and which data it was trained on, so
these stages need no model or dataset options: they load the same model and the other splits of
the same corpus (same source, context length and split seed, hence disjoint from training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from routesae.data import Corpus, load_corpus
from routesae.devices import resolve_device
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel
from routesae.rundir import CONFIG_FILE

MODEL_IDENTITY = ("path", "hub_name", "embedded", "architecture", "n_layers", "d_model")


def stage_device(lm: LanguageModel | None, device: str | torch.device | None) -> torch.device:
    """Where a stage runs: the given model's device, else ``device`` (checked), else CUDA when available."""
    return torch.device(lm.device) if lm is not None else resolve_device(device)


def _identity(model: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(model.get(key) for key in MODEL_IDENTITY)


def check_same_model(dirs: Sequence[Path], configs: Sequence[dict[str, Any]], lm: LanguageModel | None) -> None:
    """Every SAE must read the same model (the one given, if any) at its width."""
    if lm is not None:
        reference, where = _identity(lm.describe()), f"given ({lm.spec!r}, d_model {lm.d_model})"
    else:
        first = configs[0]["model"]
        reference, where = _identity(first), f"of {dirs[0]} ({first['spec']!r}, d_model {first.get('d_model')})"
    for directory, config in zip(dirs, configs):
        model = config["model"]
        if config["d_model"] != model.get("d_model"):
            raise RouteSAEError(
                f"{directory}/{CONFIG_FILE} contradicts itself: the SAE reads d_model {config['d_model']} but its model "
                f"{model['spec']!r} has d_model {model.get('d_model')}; the checkpoint is damaged, train it again"
            )
        if _identity(model) != reference:
            raise RouteSAEError(
                f"{directory} was trained on {model['spec']!r} (d_model {config['d_model']}), which is not the model "
                f"{where}; "
                "use SAEs of one model at a time"
            )


def model_for(
    dirs: Sequence[Path], configs: Sequence[dict[str, Any]], lm: LanguageModel | None = None, device: str | torch.device | None = None
) -> LanguageModel:
    """The model the SAEs in ``dirs`` read: ``lm`` if given (checked), else loaded from their configs."""
    check_same_model(dirs, configs, lm)
    if lm is not None:
        return lm
    return LanguageModel.load(configs[0]["model"]["spec"], device=resolve_device(device))


def corpus_for(config: dict[str, Any], lm: LanguageModel) -> Corpus:
    """The corpus an SAE was trained on, split as in training (its ``eval``/``apply`` splits are unseen)."""
    data = config["data"]
    return load_corpus(
        data["source"],
        lm.tokenizer,
        context_length=data["context_length"],
        text_field=data["text_field"],
        seed=training_seed(config),
    )


def training_seed(config: dict[str, Any]) -> int:
    return config.get("training", {}).get("seed", 0)
