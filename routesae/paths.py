"""Where routesae keeps its caches (the de-quantised embedded model, tokenised corpora)."""

import os
from pathlib import Path


def routesae_home() -> Path:
    """``$ROUTESAE_HOME``, default ``~/.cache/routesae``."""
    return Path(os.environ.get("ROUTESAE_HOME") or Path.home() / ".cache" / "routesae").expanduser()
