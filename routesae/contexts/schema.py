"""The ``contexts.json`` file: its name, format tag, reader, and the one way to show a context.

Interpretation and reports read these files, so the reader checks what they rely on and says
what to do when a file is missing or is something else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from routesae.errors import RouteSAEError
from routesae.files import read_json
from routesae.rundir import CONTEXTS_FILE

FORMAT = "routesae.contexts"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks the dashboard fields (firings, frequency, histogram, logit_lens)
TOP_KEYS = ("sae", "architecture", "model", "latent_size", "settings", "interpretable_latents", "latents", "pool")
LATENT_KEYS = ("activations", "max_activation", "classes", "held_out", "non_activating")
CONTEXT_KEYS = ("tokens", "index", "activation", "layer", "document", "position")


def contexts_fingerprint(path: Path | str) -> str:
    """SHA-256 of a contexts file's bytes: interpretations record it, so work made from another file is caught."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def render_context(context: dict[str, Any], open: str = "<<", close: str = ">>") -> str:
    """The context's text with its activating token wrapped in ``open``/``close`` (pool windows: plain text)."""
    tokens, index = context["tokens"], context["index"]
    if index is None:
        return "".join(tokens)
    return "".join(tokens[:index]) + open + tokens[index] + close + "".join(tokens[index + 1 :])


def read_contexts(path: Path | str) -> dict[str, Any]:
    """Read and check a ``contexts.json`` (or the one in an SAE directory); errors say what to run."""
    path = Path(path)
    if path.is_dir():
        path = path / CONTEXTS_FILE
    if not path.is_file():
        raise RouteSAEError(f"{path} does not exist; run `routesae contexts {path.parent}` first")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise RouteSAEError(f"{path} is not a routesae contexts file (format {found!r}, expected {FORMAT!r})")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise RouteSAEError(
            f"{path} has contexts format version {data.get('format_version')!r}; this routesae reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Re-run `routesae contexts {path.parent}`"
        )
    _require(data, TOP_KEYS, path, "the file")
    for latent, record in data["latents"].items():
        _require(record, LATENT_KEYS, path, f"latent {latent}")
        for context in [*(c for cs in record["classes"].values() for c in cs), *record["held_out"]]:
            _require(context, CONTEXT_KEYS, path, f"a context of latent {latent}")
    for context in data["pool"]:
        _require(context, CONTEXT_KEYS, path, "a pool window")
    return data


def _require(record: Any, keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        raise RouteSAEError(
            f"{path} is damaged: {what} lacks {', '.join(missing)}; re-run `routesae contexts {path.parent}`"
        )
