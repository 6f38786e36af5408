"""The exporter contract: write a routesae SAE in another library's on-disk format.

An exporter is registered (``register_exporters``) as an instance and writes the SAEs of one
architecture in one format, ``routesae export SAE_DIR --format FORMAT``; it is registered under
``FORMAT:ARCHITECTURE``. The plugin that provides an architecture provides its exporters too (the
built-in architectures' plugin, the BatchTopK example plugin), so a third-party architecture
exports like a built-in one. An exporter refuses, with the reason, an SAE that its format cannot
hold exactly: a directory it writes computes what the SAE computes, or it is not written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from routesae.architectures.base import SAE
from routesae.errors import PluginError


class Exporter:
    """Writes SAEs of the architecture ``architecture`` in the format ``format``."""

    format: ClassVar[str] = ""
    architecture: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return f"{self.format}:{self.architecture}"

    def check_contract(self) -> None:
        """Called at registration: an exporter says which format it writes and for which architecture."""
        if not self.format or not self.architecture:
            raise PluginError(f"{type(self).__qualname__} must set both format and architecture")

    def export(self, sae: SAE, config: dict[str, Any], out: Path) -> None:
        """Write ``sae`` (whose checkpoint's ``config.json`` is ``config``) into ``out``, an empty directory.

        Raise :class:`~routesae.errors.RouteSAEError` with the reason, before writing anything, for
        what the format cannot hold exactly.
        """
        raise NotImplementedError

    @classmethod
    def unsupported(cls, sae: SAE) -> str | None:
        """Why this format can hold no SAE like ``sae`` whatever its architecture, or None.

        Asked when no exporter of this format is registered for ``sae``'s architecture, so the
        refusal says why (SAELens hosts one hook per SAE; a routed SAE reads several).
        """
        return None
