"""Analyses: pure functions, model + tokens in, frozen dataclasses of numpy arrays out.

No dash or plotly here. Every function raises :class:`AnalysisError` on bad input.
"""

from .errors import AnalysisError
from .forward import ForwardPass, run_forward

__all__ = ["AnalysisError", "ForwardPass", "run_forward"]
