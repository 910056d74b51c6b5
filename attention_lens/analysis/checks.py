"""Checks of the indices every analysis takes: layer, head, (layer, head), position, k.

One contract for all of them: a valid value comes back as a non-negative ``int`` (a negative
index counts from the end, as in Python); anything else raises :class:`AnalysisError` with a
message that says what exists.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Optional

from ..model.checkpoint import LoadedModel
from .errors import AnalysisError


def _index(value: Any, n: int, what: str, exists: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise AnalysisError(f"{what} must be a whole number, got {value!r}")
    if not -n <= int(value) < n:
        raise AnalysisError(f"{what} {value} does not exist: {exists}, numbered 0 to {n - 1}")
    return int(value) % n


def check_layer(lm: LoadedModel, layer: Any) -> int:
    """``layer`` as an index of one of ``lm``'s layers."""
    n = lm.cfg.n_layers
    return _index(layer, n, "layer", f"the model has {n} layer(s)")


def check_head(lm: LoadedModel, head: Any) -> int:
    """``head`` as an index of one of the heads of a layer of ``lm``."""
    n = lm.cfg.n_heads
    return _index(head, n, "head", f"each layer has {n} heads")


def check_layer_head(lm: LoadedModel, layer: Optional[Any], head: Optional[Any]
                     ) -> tuple[Optional[int], Optional[int]]:
    """Both indices (either may be None: not chosen)."""
    return (None if layer is None else check_layer(lm, layer),
            None if head is None else check_head(lm, head))


def check_position(fp: Any, position: Any) -> int:
    """``position`` as a token position of the forward pass ``fp``."""
    if isinstance(position, bool) or not isinstance(position, Integral):
        raise AnalysisError(f"position must be a whole number, got {position!r}")
    n = fp.n_tokens
    position = int(position)
    if not -n <= position < n:
        raise AnalysisError(f"position {position} is outside the prompt: it has {n} tokens "
                            f"(positions 0 to {n - 1}, or -1 for the last)")
    return position % n


def check_k(lm: LoadedModel, k: Any) -> int:
    """``k`` (how many tokens to list) between 1 and the vocabulary size."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise AnalysisError(f"k must be a whole number, got {k!r}")
    k = int(k)
    if not 1 <= k <= lm.cfg.d_vocab:
        raise AnalysisError(f"k must lie between 1 and the vocabulary size {lm.cfg.d_vocab}, "
                            f"got {k}")
    return k
