"""Where a deployment keeps its files on this machine (no imports from the package, so every
layer may use it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``ATTENTION_LENS_CACHE_DIR``, else the user's cache folder (``~/.cache/attention-lens``
    on Linux)."""
    from platformdirs import user_cache_dir

    env = os.environ.get("ATTENTION_LENS_CACHE_DIR", "").strip()
    return Path(env) if env else Path(user_cache_dir("attention-lens", appauthor=False))
