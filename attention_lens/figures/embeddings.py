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
            marker=dict(size=5, color=QUALITATIVE[c % len(QUALITATIVE)], opacity=0.7),
            text=[esc(pca.display[i]) for i in idx], customdata=pca.token_ids[idx],
            hovertemplate=(f"'%{{text}}' (id %{{customdata}}), cluster {c}"
                           "<br>PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"),
        ))
    if prompt is not None and prompt.token_ids.size:
        px, py = _xy(prompt.coords)
        fig.add_trace(go.Scattergl(
            x=px, y=py, mode="markers+text", name="prompt tokens",
            text=[esc(d) for d in prompt.display], textposition="top center",
            textfont=dict(size=10, color="#ffffff"),
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
                x=sx[sl], y=sy[sl], mode="markers+text", name=name,
                text=[esc(d) for d in search.display[sl]], textposition="bottom center",
                textfont=dict(size=11, color=colour),
                marker=dict(size=13, symbol=symbol, color=colour,
                            line=dict(width=1, color="#000")),
                customdata=search.token_ids[sl],
                hovertemplate=(f"{name}: '%{{text}}' (id %{{customdata}})"
                               "<br>PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"),
            ))
    total = float(pca.explained_variance_ratio[:2].sum())
    fig.update_layout(
        template=TEMPLATE,
        title=(f"PCA of {MATRIX_NAMES.get(pca.matrix, pca.matrix)} rows: {len(pca.token_ids)} "
               f"tokens, {len(pca.cluster_sizes)} k-means clusters (the two axes explain "
               f"{total:.1%})"),
        xaxis=dict(title=_pct(pca, 0)), yaxis=dict(title=_pct(pca, 1)),
        legend=dict(itemsizing="constant"), height=620,
    )
    return fig


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
