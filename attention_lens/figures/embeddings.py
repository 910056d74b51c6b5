"""Embedding figures: the PCA map with clusters, explained variance, nearest neighbours."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import plotly.graph_objects as go

from .theme import QUALITATIVE, TEMPLATE
from .tokens import esc

if TYPE_CHECKING:
    from ..analysis.embeddings import EmbeddingPCA, Neighbours, TokenProjection

MATRIX_NAMES = {"W_E": "W_E", "W_U": "W_U^T"}
#: Cluster colours: Paul Tol's "bright" qualitative scheme and his vibrant orange, teal and
#: magenta (colour-blind safe, no two alike; readable on the dark and the light paper). Its
#: yellow is left out: yellow marks the searched word's neighbours.
CLUSTER_COLOURS = ["#4477AA", "#EE6677", "#228833", "#66CCEE", "#AA3377", "#BBBBBB",
                   "#EE7733", "#009988", "#EE3377"]
#: Labelled points at most: the searched word's tokens and its nearest neighbours.
MAX_LABELS = 24


def _pct(pca: EmbeddingPCA, i: int) -> str:
    r = pca.explained_variance_ratio
    return f"PC{i + 1} ({r[i]:.1%})" if i < r.shape[0] else f"PC{i + 1}"


def _xy(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(coords.shape[0])
    return coords[:, 0], y


def embedding_scatter_figure(pca: EmbeddingPCA, prompt: Optional[TokenProjection] = None,
                             search: Optional[TokenProjection] = None,
                             n_query: int = 0) -> go.Figure:
    """Tokens on the first two principal components, one colour per k-means cluster.

    The prompt's tokens are ringed; ``search`` (the searched word's tokens first, then its
    neighbours; ``n_query`` of the former) is drawn on top.
    """
    fig = go.Figure()
    x, y = _xy(pca.coords)
    for c in range(len(pca.cluster_sizes)):
        idx = np.flatnonzero(pca.cluster == c)
        fig.add_trace(go.Scattergl(
            x=x[idx], y=y[idx], mode="markers", name=f"cluster {c} ({idx.size})",
            marker=dict(size=5, color=CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)], opacity=0.8),
            text=[esc(pca.display[i]) for i in idx], customdata=pca.token_ids[idx],
            hovertemplate=(f"'%{{text}}' (id %{{customdata}}), cluster {c}"
                           "<br>PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"),
        ))
    if prompt is not None and prompt.token_ids.size:
        px, py = _xy(prompt.coords)
        fig.add_trace(go.Scattergl(  # ringed, named on hover (labels would pile up)
            x=px, y=py, mode="markers", name="prompt tokens",
            text=[esc(d) for d in prompt.display],
            marker=dict(size=11, color="rgba(0,0,0,0)", line=dict(width=2, color="#ffffff")),
            customdata=np.stack([prompt.token_ids, prompt.cluster], -1),
            hovertemplate=("prompt token '%{text}' (id %{customdata[0]}), nearest cluster "
                           "%{customdata[1]}<br>PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"),
        ))
    if search is not None and search.token_ids.size:
        sx, sy = _xy(search.coords)
        for name, sl, symbol, colour in (("neighbours", slice(n_query, None), "circle",
                                          QUALITATIVE[3]),
                                         ("searched word", slice(0, n_query), "star",
                                          QUALITATIVE[5])):
            fig.add_trace(go.Scattergl(
                x=sx[sl], y=sy[sl], mode="markers", name=name,
                text=[esc(d) for d in search.display[sl]],
                marker=dict(size=13, symbol=symbol, color=colour,
                            line=dict(width=1, color="#000")),
                customdata=search.token_ids[sl],
                hovertemplate=(f"{name}: '%{{text}}' (id %{{customdata}})"
                               "<br>PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"),
            ))
        _label_column(fig, x, y, sx, sy, list(search.display), n_query)
    total = float(pca.explained_variance_ratio[:2].sum())
    legend_room = 70 + 22 * -(-sum(1 for t in fig.data if t.name) // 3)
    fig.update_layout(
        template=TEMPLATE,
        title=(f"PCA of {MATRIX_NAMES.get(pca.matrix, pca.matrix)} rows: {len(pca.token_ids)} "
               f"tokens, {len(pca.cluster_sizes)} k-means clusters (the two axes explain "
               f"{total:.1%})"),
        xaxis=dict(title=_pct(pca, 0)), yaxis=dict(title=_pct(pca, 1)),
        # below the plot, in as many rows as a phone needs (about three a row): the map
        # keeps the figure's whole width
        legend=dict(itemsizing="constant", orientation="h", yref="container", y=0,
                    yanchor="bottom", x=0),
        margin=dict(b=legend_room), height=560 + legend_room,
    )
    return fig


def _label_column(fig: go.Figure, x: np.ndarray, y: np.ndarray, sx: np.ndarray,
                  sy: np.ndarray, names: list[str], n_query: int) -> None:
    """Name the searched word's tokens and neighbours in a column at the plot's right edge,
    each joined to its point by a line: labels never overlap, however close the points
    (at any screen width: the column's rows are a share of the plot's height)."""
    n = min(len(names), MAX_LABELS)
    if not n:
        return
    allx, ally = np.concatenate([x, sx]), np.concatenate([y, sy])
    x0, x1 = float(allx.min()), float(allx.max())
    y0, y1 = float(ally.min()), float(ally.max())
    wx, wy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    right = x1 + 0.3 * wx  # the column of labels, right of every point
    fig.update_xaxes(range=[x0 - 0.04 * wx, right + 0.02 * wx])
    fig.update_yaxes(range=[y0 - 0.04 * wy, y1 + 0.04 * wy])
    order = sorted(range(n), key=lambda i: -float(sy[i]))  # top to bottom: few crossings
    slots = np.linspace(y1, y0, n) if n > 1 else np.array([(y0 + y1) / 2])
    for slot, i in zip(slots, order):
        searched = i < n_query
        fig.add_annotation(
            x=float(sx[i]), y=float(sy[i]), ax=right, ay=float(slot), axref="x", ayref="y",
            xref="x", yref="y", text=("★ " if searched else "") + esc(names[i]),
            xanchor="right", showarrow=True, arrowhead=0, arrowwidth=1,
            arrowcolor=QUALITATIVE[5] if searched else "#999999",
            font=dict(size=12, color=QUALITATIVE[5] if searched else None))


def explained_variance_figure(pca: EmbeddingPCA) -> go.Figure:
    """Explained variance ratio of each component, and its running total."""
    r = pca.explained_variance_ratio
    labels = [f"PC{i + 1}" for i in range(r.shape[0])]
    fig = go.Figure([
        go.Bar(x=labels, y=r, name="ratio", marker_color=QUALITATIVE[1],
               hovertemplate="%{x}: %{y:.2%} of the variance<extra></extra>"),
        go.Scatter(x=labels, y=np.cumsum(r), name="cumulative", mode="lines+markers",
                   line=dict(color=QUALITATIVE[0]),
                   hovertemplate="PC1-%{x}: %{y:.2%} together<extra></extra>"),
    ])
    fig.update_layout(
        template=TEMPLATE,
        title="Explained variance" + (" (centred)" if pca.centred else " (uncentred energy)"),
        yaxis=dict(title="fraction of variance", tickformat=".0%", rangemode="tozero"),
        legend=dict(orientation="h", y=-0.2), height=380,
    )
    return fig


def neighbours_figure(result: Optional[Neighbours]) -> go.Figure:
    """Cosine similarity of the nearest tokens to the searched word."""
    if result is None:
        fig = go.Figure()
        fig.add_annotation(text="Type a word in the search box to see its nearest tokens",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_layout(template=TEMPLATE, title="Nearest tokens", height=380,
                          xaxis=dict(visible=False), yaxis=dict(visible=False))
        return fig
    labels = [f"{i + 1}. '{esc(d)}'" for i, d in enumerate(result.display)]
    query = " ".join(f"'{esc(d)}'" for d in result.query_display)
    fig = go.Figure(go.Bar(
        x=result.cosine, y=labels, orientation="h", marker_color=QUALITATIVE[3],
        customdata=result.token_ids,
        hovertemplate=f"cos(%{{y}}, {query}) = %{{x:.4f}} (id %{{customdata}})<extra></extra>",
    ))
    note = " (mean of its tokens)" if result.multi_token else ""
    fig.update_layout(
        template=TEMPLATE,
        title=f"Nearest tokens to {query}{note} in {MATRIX_NAMES.get(result.matrix)}",
        xaxis=dict(title="cosine similarity"),
        yaxis=dict(type="category", autorange="reversed"),
        height=max(380, 24 * len(labels) + 140),
    )
    return fig


# ------------------------------------------------------------------ data export
