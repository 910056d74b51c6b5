"""Head dashboard figures: head-finder scatter, a head's value distribution, all-heads view."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import plotly.graph_objects as go

from .theme import GRID, QUALITATIVE, SEQUENTIAL, TEMPLATE, position_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.head_metrics import HeadMetrics

#: Heights (px) of the fixed-size figures, so a page can give their boxes the same height.
HEIGHTS = {"finder": 460, "values": 300}
LABELS = {"previous_token": "previous-token", "induction": "induction",
          "duplicate_token": "duplicate-token", "first_token": "first-token",
          "self": "self", "entropy": "entropy (nats)", "copying": "copying (OV)"}


def layer_colour(layer: int, n_layers: int) -> str:
    """One colour per layer (Okabe-Ito for up to 12 layers, a sequential scale beyond)."""
    if n_layers <= len(QUALITATIVE):
        return QUALITATIVE[layer]
    import plotly.colors as pc

    return pc.sample_colorscale(SEQUENTIAL, [layer / max(1, n_layers - 1)])[0]


def head_finder_figure(hm: HeadMetrics, x: str, y: str,
                       selected: Optional[tuple[int, int]] = None) -> go.Figure:
    """Every head as a point at (metric x, metric y), one colour per layer.

    Each point's ``customdata`` is ``[layer, head]``; the selected head is ringed.
    """
    L, H = hm.shape
    fig = go.Figure()
    for layer in range(L):
        xs, ys = hm.metrics[x][layer], hm.metrics[y][layer]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"layer {layer}",
            marker=dict(size=11, color=layer_colour(layer, L), line=dict(width=1, color=GRID)),
            customdata=[[layer, h] for h in range(H)],
            text=[f"L{layer}H{h}" for h in range(H)],
            hovertemplate=(f"%{{text}}<br>{LABELS[x]} %{{x:.3f}}<br>{LABELS[y]} %{{y:.3f}}"
                           "<extra></extra>")))
    if selected is not None:
        layer, head = selected
        fig.add_trace(go.Scatter(
            x=[hm.metrics[x][layer, head]], y=[hm.metrics[y][layer, head]], mode="markers",
            name=f"L{layer}H{head}", hoverinfo="skip",
            marker=dict(size=22, color="rgba(0,0,0,0)", line=dict(width=3, color="#ffffff"))))
    fig.update_layout(
        template=TEMPLATE, height=HEIGHTS["finder"],
        title=f"Head finder ({hm.windows.n_windows} windows)",
        xaxis_title=LABELS[x], yaxis_title=LABELS[y],
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), margin=dict(t=90),
        clickmode="event")
    return finish(fig)


def head_values_figure(hm: HeadMetrics, metric: str, layer: int, head: int) -> go.Figure:
    """Histogram of one head's per-window values, with its deciles marked."""
    vals = hm.per_window[metric][:, layer, head]
    vals = vals[~np.isnan(vals)]
    fig = go.Figure(go.Histogram(x=vals, nbinsx=40, marker_color=QUALITATIVE[1],
                                 hovertemplate="%{x}: %{y} windows<extra></extra>",
                                 name="windows"))
    if vals.size:
        for q in range(10, 100, 10):
            v = float(np.percentile(vals, q, method="inverted_cdf"))
            fig.add_vline(x=v, line=dict(color=GRID if q != 50 else "#ffffff", dash="dot",
                                         width=1))
    fig.update_layout(
        template=TEMPLATE, height=HEIGHTS["values"], showlegend=False, bargap=0.05,
        title=f"L{layer}H{head}: {LABELS[metric]} per window ({vals.size} windows; "
              f"dotted: deciles)",
        xaxis_title=f"{LABELS[metric]} (window mean)", yaxis_title="windows")
    return finish(fig)


def prompt_tokens_figure(display: tuple[str, ...], query: Optional[int] = None,
                         weights: Optional[np.ndarray] = None, per_row: int = 16) -> go.Figure:
    """The prompt as a grid of tokens (hover a token to see every head's attention from it).

    With ``weights`` [pos] the cells are coloured by them; the ``query`` cell is outlined.
    Each cell's ``customdata`` is its position.
    """
    p = len(display)
    per_row = max(1, min(per_row, p))
    rows = math.ceil(p / per_row)
    z = np.full((rows, per_row), np.nan)
    custom = np.full((rows, per_row), -1)
    xs, ys, texts = [], [], []
    for i, tok in enumerate(display):
        r, c = divmod(i, per_row)
        z[r, c] = 0.0 if weights is None else float(weights[i])
        custom[r, c] = i
        xs.append(c)
        ys.append(r)
        texts.append(esc(tok))
    fig = go.Figure([
        go.Heatmap(z=z, customdata=custom, colorscale=SEQUENTIAL, zmin=0, zmax=1, xgap=2,
                   ygap=2, showscale=weights is not None,
                   hovertemplate="position %{customdata}<extra></extra>"),
        go.Scatter(x=xs, y=ys, mode="text", text=texts, hoverinfo="skip", showlegend=False,
                   textfont=dict(color="#ffffff")),
    ])
    if query is not None and 0 <= query < p:
        r, c = divmod(query, per_row)
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                      line=dict(color="#ffffff", width=3))
    fig.update_layout(
        template=TEMPLATE, height=max(140, 34 * rows + 80),
        title="The prompt: hover (or click) a token to see every head's attention from it",
        xaxis=dict(visible=False, range=[-0.5, per_row - 0.5]),
        yaxis=dict(visible=False, autorange="reversed"), plot_bgcolor=GRID,
        margin=dict(l=10, r=10, t=40, b=10))
    return fig


def all_heads_query_figure(patterns: np.ndarray, display: tuple[str, ...],
                           query: int) -> go.Figure:
    """Every head's attention from token ``query`` to each earlier token (rows: heads)."""
    L, H, p, _ = patterns.shape
    if not 0 <= query < p:
        query = p - 1
    z = patterns[:, :, query, : query + 1].reshape(L * H, query + 1)
    keys = position_labels(list(display[: query + 1]))
    heads = [f"L{layer}H{h}" for layer in range(L) for h in range(H)]
    fig = go.Figure(go.Heatmap(
        z=z, x=keys, y=heads, colorscale=SEQUENTIAL, zmin=0, zmax=1,
        colorbar=dict(title="A"),
        hovertemplate=(f"%{{y}}: {quoted(display[query])} ← %{{x}}: %{{z:.3f}}"
                       "<extra></extra>")))
    fig.update_layout(
        template=TEMPLATE, height=max(260, 16 * L * H + 150),
        title=f"Every head's attention from {query}: {quoted(display[query])}",
        xaxis=dict(type="category", title="key (earlier token)", tickangle=-60),
        yaxis=dict(type="category", autorange="reversed", title="head", dtick=1))
    return finish(fig)
