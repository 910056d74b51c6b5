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


def user_models_dir() -> Path:
    """The per-user models folder (``models/`` in the user's data folder as platformdirs gives
    it, so ``XDG_DATA_HOME`` moves it); ``attention-lens models add`` puts models there."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("attention-lens", appauthor=False)) / "models"


class ConfigError(ValueError):
    """A configuration value is invalid or unsafe (the message says which and why)."""
