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


def _names(model: dict[str, Any]) -> set[str]:
    """What a model is called: its spec, hub name and directory (also resolved, for a path)."""
    names = {str(model[key]) for key in ("spec", "path", "hub_name") if model.get(key)}
    return names | {str(Path(name).resolve()) for name in names if Path(name).exists()}


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two recorded models are one. An SAE read from another library (SAELens) knows its model by name
    only (``known_by_name``): it is the model of that name, spec or directory, at its width."""
    if a.get("known_by_name") or b.get("known_by_name"):
        return a.get("d_model") == b.get("d_model") and bool(_names(a) & _names(b))
    return _identity(a) == _identity(b)


def check_same_model(dirs: Sequence[Path], configs: Sequence[dict[str, Any]], lm: LanguageModel | None) -> None:
    """Every SAE must read the same model (the one given, if any) at its width."""
    if lm is not None:
        reference, where = lm.describe(), f"given ({lm.spec!r}, d_model {lm.d_model})"
    else:
        reference = configs[0]["model"]
        where = f"of {dirs[0]} ({reference['spec']!r}, d_model {reference.get('d_model')})"
    for directory, config in zip(dirs, configs):
        model = config["model"]
        if not model.get("spec"):
            raise RouteSAEError(f"{directory} names no model (a SAELens cfg.json without metadata.model_name)")
        if config["d_model"] != model.get("d_model"):
            raise RouteSAEError(
                f"{directory}/{CONFIG_FILE} contradicts itself: the SAE reads d_model {config['d_model']} but its model "
                f"{model['spec']!r} has d_model {model.get('d_model')}; the checkpoint is damaged, train it again"
            )
        if not same_model(model, reference):
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
    data = config.get("data")
    if not data:
        raise RouteSAEError(
            f"{config.get('name', 'the first SAE')} records no training data (a SAELens cfg.json without "
            "metadata.dataset_path and context_size): list a routesae SAE of the same model first, whose data is used"
        )
    return load_corpus(
        data["source"],
        lm.tokenizer,
        context_length=data["context_length"],
        text_field=data["text_field"],
        seed=training_seed(config),
    )


def training_seed(config: dict[str, Any]) -> int:
    return config.get("training", {}).get("seed", 0)
