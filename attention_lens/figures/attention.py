"""Attention figures: one head's pattern, every head at once, entropy, activations."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import SEQUENTIAL, SEQUENTIAL_ALT, TEMPLATE, position_labels
from .tokens import esc, finish

#: Outline of the head shown in the main figure (Okabe-Ito vermillion).
SELECTED = "#D55E00"

if TYPE_CHECKING:
    from ..analysis.attention import AttentionPattern, AttentionPatterns


def _labels(display: tuple[str, ...]) -> list[str]:
    """Unique, escaped ``"i: token"`` axis labels (repeated tokens stay distinct)."""
    return [esc(s) for s in position_labels(list(display))]


def masked(pattern: np.ndarray) -> np.ndarray:
    """A copy of causal pattern(s) [..., q, k] with the upper triangle set to NaN (not drawn)."""
    out = np.array(pattern, dtype=np.float64, copy=True)
    q, k = out.shape[-2:]
    upper = np.triu_indices(q, 1, k)
    out[..., upper[0], upper[1]] = np.nan
    return out


def attention_figure(result: AttentionPattern) -> go.Figure:
    """Heatmap of one head's pattern: rows are queries, columns the keys they attend to."""
    labels = _labels(result.display)
    name = f"L{result.layer}H{result.head}"
    fig = go.Figure(go.Heatmap(
        z=masked(result.pattern), x=labels, y=labels, colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
        hoverongaps=False, colorbar=dict(title="weight"),
        hovertemplate=f"query %{{y}} ← key %{{x}}: %{{z:.3f}}<extra>{name}</extra>",
        meta={"layer": int(result.layer), "head": int(result.head)},  # read by a click
    ))
    n = len(labels)
    # long prompts fit the viewport (zoom in with a drag, double-click to reset); every
    # k-th position is labelled so the labels never run into each other
    ticks = min(n, PATTERN_MAX_LABELS)
    fig.update_layout(
        template=TEMPLATE,
        title=(f"Layer {result.layer}, head {result.head}: attention pattern "
               f"(mean entropy {result.mean_entropy:.2f} nats)"),
        xaxis=dict(title="key (attended to)", type="category", tickangle=-60, nticks=ticks),
        yaxis=dict(title="query (attending)", type="category", autorange="reversed",
                   nticks=ticks),
        height=min(PATTERN_MAX_HEIGHT, max(450, 14 * n + 200)),
    )
    return finish(fig)


#: Tallest pattern heatmap (px): it fits a laptop screen whatever the prompt's length.
PATTERN_MAX_HEIGHT = 820
#: Most position labels on a pattern's axes (every k-th position beyond that).
PATTERN_MAX_LABELS = 48


#: Thumbnails of longer prompts are max-pooled to at most this many rows and columns.
GRID_MAX_POSITIONS = 96


def pooled(z: np.ndarray, labels: list[str], max_positions: int = GRID_MAX_POSITIONS
           ) -> tuple[np.ndarray, list[str], bool]:
    """Max-pool masked patterns [..., q, k] into blocks so at most ``max_positions`` remain.

    Returns the pooled array, block labels ("i–j: first token") and whether pooling happened.
    """
    n = z.shape[-1]
    if n <= max_positions:
        return z, labels, False
    b = -(-n // max_positions)
    m = -(-n // b)
    padded = np.full(z.shape[:-2] + (m * b, m * b), np.nan)
    padded[..., :n, :n] = z
    blocks = padded.reshape(z.shape[:-2] + (m, b, m, b))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks above the diagonal
        out = np.nanmax(blocks, axis=(-3, -1))
    names = [f"{i * b}–{min(n, (i + 1) * b) - 1}" for i in range(m)]
    return out, names, True


def attention_grid_figure(result: AttentionPatterns,
                          layers: Optional[Sequence[int]] = None,
                          selected: Optional[tuple[int, int]] = None) -> go.Figure:
    """Every head's pattern in a layer × head grid, one shared colour scale (0 to 1).

    ``layers`` limits the rows (models with many heads show one layer at a time); prompts
    longer than :data:`GRID_MAX_POSITIONS` are max-pooled into position blocks;
    ``selected`` (layer, head) is outlined.
    """
    n_layers, n_heads = result.patterns.shape[:2]
    rows = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    z, labels, is_pooled = pooled(masked(result.patterns[rows]), _labels(result.display))
    what = "max weight in block" if is_pooled else "weight"
    unit = "positions " if is_pooled else ""
    # one layer of many heads wraps into rows of GRID_MAX_COLUMNS larger thumbnails; heads
    # name the thumbnails (only the top row when each layer is one row) and layers the rows:
    # short labels that fit a phone
    per_row = n_heads if len(rows) > 1 else min(n_heads, GRID_MAX_COLUMNS)
    lines = -(-n_heads // per_row)
    grid_rows = len(rows) * lines
    fig = make_subplots(rows=grid_rows, cols=per_row, horizontal_spacing=0.01,
                        vertical_spacing=(0.03 if lines == 1 else 0.06) if grid_rows > 1
                        else 0.0, subplot_titles=[
                            head_name(head, per_row) if (lines > 1 or r == 0) else ""
                            for r in range(len(rows)) for head in range(n_heads)])
    for r, layer in enumerate(rows):
        for head in range(n_heads):
            line, col = divmod(head, per_row)
            fig.add_trace(go.Heatmap(
                z=z[r, head], x=labels, y=labels, coloraxis="coloraxis", hoverongaps=False,
                hovertemplate=(f"L{layer}H{head}<br>query {unit}%{{y}} ← key {unit}%{{x}}: "
                               f"{what} %{{z:.3f}}<extra></extra>"),
            ), row=r * lines + line + 1, col=col + 1)
    fig.update_xaxes(showticklabels=False, type="category")
    fig.update_yaxes(showticklabels=False, type="category", autorange="reversed")
    for r, layer in enumerate(rows):
        fig.update_yaxes(title_text=f"L{layer}", title_standoff=2, row=r * lines + 1, col=1)
    fig.update_annotations(font_size=9)
    if selected is not None and int(selected[0]) in rows and 0 <= selected[1] < n_heads:
        line, col = divmod(int(selected[1]), per_row)  # the thumbnail's place after wrapping
        fig.add_shape(type="rect", xref="x domain", yref="y domain", x0=-0.04, x1=1.04,
                      y0=-0.04, y1=1.04, line=dict(color=SELECTED, width=3),
                      row=rows.index(int(selected[0])) * lines + line + 1, col=col + 1)
    title = ("Attention patterns of every head (rows: queries, columns: keys)" if per_row <= 8
             else "Attention patterns of every head (heads 0, 1, … across; in each, rows: "
                  "queries, columns: keys)")
    if layers is not None and len(rows) < n_layers:
        title = f"Layer {', '.join(map(str, rows))} of {n_layers}: every head's pattern"
    if is_pooled:
        title += f"; {result.patterns.shape[-1]} positions max-pooled into blocks"
    fig.update_layout(
        template=TEMPLATE, title=title,
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=0.0, cmax=1.0, colorbar_title="weight"),
        height=max(300, (110 if lines == 1 else 150) * grid_rows + 120),
    )
    return finish(fig)


def head_name(head: int, per_row: int) -> str:
    """A thumbnail's title: "H3", or "3" when more than eight share a row (so the titles
    keep a legible size on a phone without running into each other)."""
    return f"H{head}" if per_row <= 8 else str(head)


#: Thumbnails per row when the grid shows one layer (larger than one row of every head).
GRID_MAX_COLUMNS = 6


def entropy_figure(result: AttentionPatterns) -> go.Figure:
    """Heatmap [layer, head] of each head's mean attention entropy (nats)."""
    n_layers, n_heads = result.entropy.shape
    uniform = float(result.max_entropy.mean())
    fig = go.Figure(go.Heatmap(
        z=result.entropy, x=[f"H{h}" for h in range(n_heads)],
        y=[f"L{layer}" for layer in range(n_layers)], colorscale=SEQUENTIAL_ALT, zmin=0.0,
        zmax=max(uniform, float(np.nanmax(result.entropy)) if result.entropy.size else 0.0),
        colorbar=dict(title="nats"), texttemplate="%{z:.2f}",
        hovertemplate=("%{y} %{x}: mean entropy %{z:.3f} nats<br>"
                       f"(uniform attention: {uniform:.3f}; one-hot: 0)<extra></extra>"),
    ))
    fig.update_layout(template=TEMPLATE, title="Mean attention entropy per head (low = focused)",
                      xaxis_title="head", yaxis=dict(title="layer", autorange="reversed"),
                      height=max(250, 45 * n_layers + 150))
    return finish(fig)
