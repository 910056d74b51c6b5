"""Analyses: pure functions, model + tokens in, frozen dataclasses of numpy arrays out.

No dash or plotly here. Every function raises :class:`AnalysisError` on bad input.
Importing the package loads no torch: ``ForwardPass`` and ``run_forward`` are loaded on first
use, so the layers above that only read labels or errors (figures) stay torch-free.
"""

from typing import Any

from .errors import AnalysisError

__all__ = ["AnalysisError", "ForwardPass", "run_forward"]


def __getattr__(name: str) -> Any:
    if name in ("ForwardPass", "run_forward"):
        from . import forward

        return getattr(forward, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
