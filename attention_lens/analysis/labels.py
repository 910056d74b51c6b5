"""Head labels, one grammar for every page, figure and API field.

A head is written ``L1H5`` (layer 1, head 5): that is how every figure labels it, and the form
:func:`head_label` writes. People also type ``1.5``, ``1:5`` or ``l1h5``, with spaces around the
separator; :func:`parse_head` reads all of these and nothing else. Figures may put zero-width
spaces into axis labels (to keep Plotly from merging equal ones); they are ignored.
"""

from __future__ import annotations

import re
from typing import Optional

from .errors import AnalysisError

#: ``L1H5``, ``1.5``, ``1:5``, ``l1 h5``; at most 6 digits each, so no huge integer is built.
HEAD_RE = re.compile(r"^\s*[Ll]?(\d{1,6})\s*[.:Hh]\s*(\d{1,6})\s*$")
_LIST_SEP = re.compile(r"[\s,;]+")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\ufeff"))


def head_label(layer: int, head: int) -> str:
    """``"L1H5"``: a head's label (read back by :func:`parse_head`)."""
    return f"L{layer}H{head}"


def parse_head(text: object) -> Optional[tuple[int, int]]:
    """``"L1H5"`` / ``"1.5"`` / ``"1:5"`` -> ``(1, 5)``; None for anything else."""
    if not isinstance(text, str):
        return None
    m = HEAD_RE.match(text.translate(_ZERO_WIDTH))
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_head_label(label: object) -> Optional[tuple[int, int]]:
    """A figure's axis label (or any value) -> ``(layer, head)``, None when it names no head."""
    return parse_head(str(label))


def parse_heads(text: str, what: str = "head") -> list[tuple[int, int]]:
    """``"L1H5, 1.0"`` -> ``[(1, 5), (1, 0)]``; an :class:`AnalysisError` naming a bad item."""
    heads = []
    for item in _LIST_SEP.split(text.strip()):
        if not item:
            continue
        head = parse_head(item)
        if head is None:
            raise AnalysisError(f"cannot read {what} {item[:20]!r}: write heads as L1H5 or 1.5")
        heads.append(head)
    return heads
