"""``routesae export``: write an SAE in another library's format through its architecture's exporter.

The exporters are plugins (``register_exporters``, :class:`~routesae.interop.Exporter`): the plugin
that provides an architecture says in which formats it can be written, and an exporter refuses what
its format cannot hold exactly. The output directory must be new or empty; the command holds a lock
on it while it writes, and a refused export leaves nothing there.
"""

from __future__ import annotations

from pathlib import Path

from routesae.architectures.base import SAE
from routesae.checkpoint import load_sae
from routesae.errors import RouteSAEError
from routesae.files import TEMP_SUFFIX
from routesae.interop.base import Exporter
from routesae.locks import is_lock, writing
from routesae.plugins import PluginManager, activated

LOCK_ROLE = "export"


def exporters(pm: PluginManager) -> list[Exporter]:
    return [pm.get("exporter", name) for name in pm.names("exporter")]


def export_formats(pm: PluginManager) -> list[str]:
    """The formats some installed exporter writes (``--format``'s choices)."""
    return sorted({e.format for e in exporters(pm)})


def exporter_for(pm: PluginManager, sae: SAE, format: str) -> Exporter:
    """The exporter that writes ``sae``'s architecture as ``format``, or an error that says why none does."""
    installed = exporters(pm)
    if format not in {e.format for e in installed}:
        raise RouteSAEError(f"unknown export format {format!r}; installed: {', '.join(export_formats(pm)) or 'none'}")
    for exporter in installed:
        if exporter.format == format and exporter.architecture == sae.name:
            return exporter
    reasons = {type(e).unsupported(sae) for e in installed if e.format == format} - {None}
    others = sorted({e.format for e in installed if e.architecture == sae.name})
    alternative = f"; {sae.name} can be exported as: {', '.join(others)}" if others else ""
    reason = f": {min(reasons)}" if reasons else f" (no {format} exporter is installed for it)"
    raise RouteSAEError(f"{format} cannot hold a {sae.name} SAE{reason}{alternative}")


def export_sae(sae_dir: Path | str, out: Path | str, format: str = "saelens", *, plugins: PluginManager | None = None) -> list[Path]:
    """Write the SAE in ``sae_dir`` (a routesae checkpoint or a SAELens directory) as ``format`` into ``out``.

    ``out`` must be new or empty. Returns the files written.

    >>> export_sae("runs/demo/topk-L21-k32-F4096", "exports/topk-saelens", "saelens")
    """
    sae_dir, out = Path(sae_dir), Path(out)
    with activated(plugins) as pm:
        sae, config = load_sae(sae_dir, plugins=pm)
        exporter = exporter_for(pm, sae, format)
        with writing(out, LOCK_ROLE):
            _check_empty(out)
            try:
                exporter.export(sae, config, out)
            except BaseException:
                _clear(out)  # it was empty: whatever is there now is this export's
                raise
            return sorted(p for p in out.iterdir() if not is_lock(p))


def _check_empty(out: Path) -> None:
    """Refuse an ``out`` that holds anything but our lock and temp files a killed export left (removed here)."""
    held = []
    for path in out.iterdir():
        if is_lock(path):
            continue
        if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file():
            path.unlink()
            continue
        held.append(path.name)
    if held:
        shown = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
        raise RouteSAEError(f"--out {out} is not empty (it holds {shown}); export into a new or empty directory")


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.is_file() and not is_lock(path):
            path.unlink()
        elif path.is_dir():
            _clear(path)
            path.rmdir()
