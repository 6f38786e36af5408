"""The reporters a run or an evaluation writes to, by name, from the plugin manager in use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from routesae.plugins import get_plugin_manager
from routesae.reporters.base import Reporter


def build_reporters(names: Sequence[str], run_dir: Path) -> list[Reporter]:
    """The named reporters for ``run_dir``; ``jsonl`` (``metrics.jsonl``) is always on: it is the run's record."""
    pm = get_plugin_manager()
    return [pm.get("reporter", name)(run_dir) for name in dict.fromkeys(["jsonl", *names])]
