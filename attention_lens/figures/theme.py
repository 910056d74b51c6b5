"""The dark Plotly template matching the vendored Bootstrap theme, and colour scales.

Every figure uses ``TEMPLATE``; scales are colour-blind safe (viridis/cividis for
sequential data, a blue-white-red diverging scale centred at zero for signed data).
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

TEMPLATE = "attention_lens"
SEQUENTIAL = "Viridis"
SEQUENTIAL_ALT = "Cividis"
DIVERGING = "RdBu_r"
#: Okabe-Ito qualitative palette (colour-blind safe).
QUALITATIVE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
               "#999999", "#FFFFFF", "#B9E769", "#8C6BB1", "#F4A582"]
BACKGROUND = "#222222"
PAPER = "#2b2b2b"
TEXT = "#dee2e6"
GRID = "#444444"


def _register() -> None:
    if TEMPLATE in pio.templates:
        return
    t = go.layout.Template(pio.templates["plotly_dark"])  # plotly only: no dash import here
    t.layout.paper_bgcolor = PAPER
    t.layout.plot_bgcolor = BACKGROUND
    t.layout.font = dict(color=TEXT, family="Lato, -apple-system, 'Segoe UI', sans-serif")
    t.layout.colorway = QUALITATIVE
    t.layout.xaxis = dict(gridcolor=GRID, zerolinecolor=GRID)
    t.layout.yaxis = dict(gridcolor=GRID, zerolinecolor=GRID)
    t.layout.margin = dict(l=60, r=20, t=50, b=50)
    t.layout.hoverlabel = dict(font=dict(family="Menlo, Consolas, monospace"))
    pio.templates[TEMPLATE] = t


_register()


def unique_labels(labels: list[str]) -> list[str]:
    """Make repeated category labels distinct (plotly merges equal categories).

    Repeats get zero-width spaces appended, so they look identical but stay separate.
    """
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label + "\u200b" * n)
    return out


def position_labels(display: list[str]) -> list[str]:
    """Axis labels ``"i: token"`` for a token sequence (always unique)."""
    return [f"{i}: {tok}" for i, tok in enumerate(display)]
