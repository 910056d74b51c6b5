"""Eigenvalue figures: attention-pattern spectra, circuit eigenvalues, copying scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import DIVERGING, QUALITATIVE, SEQUENTIAL, TEMPLATE, signed
from .tokens import esc

if TYPE_CHECKING:
    from ..analysis.eigen import AttentionSpectrum, CircuitEigenvalues

CIRCUIT_TITLES = {"ov": "OV: W_V W_O", "full_ov": "full OV: W_E W_OV W_U",
                  "qk": "QK: W_Q W_K^T", "full_qk": "full QK: W_E W_QK W_E^T"}


def attention_spectrum_figure(result: AttentionSpectrum, layer: int, head: int,
                              sort: bool = True) -> go.Figure:
    """The eigenvalues of one head's causal pattern, i.e. its diagonal A[i, i]."""
    diag = result.eigenvalues[layer, head]
    pos = np.arange(diag.shape[0])
    order = np.argsort(-diag, kind="stable") if sort else pos
    text = [f"{i}: '{esc(result.display[i])}'" for i in order]
    fig = go.Figure(go.Bar(
        x=np.arange(1, diag.shape[0] + 1) if sort else pos, y=diag[order], text=text,
        textposition="none", marker_color=QUALITATIVE[1],
        hovertemplate="position %{text}: A[i, i] = %{y:.3f}<extra></extra>",
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"L{layer}H{head}: eigenvalues = diagonal A[i, i]",
        xaxis=dict(title="rank" if sort else "position i"),
        yaxis=dict(title="λ = A[i, i]", range=[0, 1.02]), height=420,
    )
    return fig


def circuit_eigenvalues_figure(result: CircuitEigenvalues, layer: int, head: int) -> go.Figure:
    """One head's eigenvalues of each circuit in the complex plane, one panel per circuit."""
    names = list(result.CIRCUITS)
    cols = 2  # two panels a row: each stays readable on a phone
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.14, vertical_spacing=0.22,
                        subplot_titles=[
        f"{CIRCUIT_TITLES[c]}<br>copying {signed(result.copying[c][layer, head], '.2f')}<br>"
        f"Re λ > 0: {result.positive[c][layer, head]:.0%}" for c in names])
    for i, c in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        e = result.eigenvalues(c)[layer, head]
        fig.add_trace(go.Scatter(
            x=e.real, y=e.imag, mode="markers", name=CIRCUIT_TITLES[c],
            marker=dict(size=7, color=QUALITATIVE[i % len(QUALITATIVE)],
                        line=dict(width=0.5, color="#000")),
            customdata=np.stack([np.arange(1, e.shape[0] + 1), np.abs(e)], -1),
            hovertemplate=(f"{CIRCUIT_TITLES[c]}<br>λ_%{{customdata[0]}} = %{{x:.4g}} "
                           "%{y:+.4g}i (|λ| %{customdata[1]:.4g})<extra></extra>"),
        ), row=row, col=col)
        fig.add_vline(x=0, line=dict(color="#888", width=1), row=row, col=col)
        fig.add_hline(y=0, line=dict(color="#888", width=1), row=row, col=col)
    fig.update_xaxes(title_text="Re λ")
    fig.update_yaxes(title_text="Im λ", col=1)
    fig.update_annotations(font_size=11)
    fig.update_layout(template=TEMPLATE, showlegend=False, height=330 * rows + 120,
                      margin=dict(t=110),
                      title=f"L{layer}H{head}: circuit eigenvalues in the complex plane")
    return fig


def copying_scores_figure(result: CircuitEigenvalues, which: str = "full_ov") -> go.Figure:
    """Layer × head heatmaps of the copying score and the positive-eigenvalue fraction."""
    copying, positive = result.copying[which], result.positive[which]
    L, H = copying.shape
    x, y = [str(h) for h in range(H)], [str(la) for la in range(L)]
    # one grid above the other, each with its colour bar beside it: readable on a phone
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.28, subplot_titles=[
        "copying score Re(Σλ)/Σ|λ|", "fraction of eigenvalues with Re λ > 0"])
    fig.add_trace(go.Heatmap(
        z=copying, x=x, y=y, zmin=-1, zmax=1, colorscale=DIVERGING, zmid=0,
        colorbar=dict(title="copying", y=1.0, yanchor="top", len=0.36),
        hovertemplate="layer %{y}, head %{x}: copying %{z:+.3f}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=positive, x=x, y=y, zmin=0, zmax=1, colorscale=SEQUENTIAL,
        colorbar=dict(title="Re λ > 0", y=0.0, yanchor="bottom", len=0.36),
        hovertemplate="layer %{y}, head %{x}: %{z:.0%} of eigenvalues with Re λ > 0"
                      "<extra></extra>",
    ), row=2, col=1)
    fig.update_xaxes(title_text="head", type="category")
    fig.update_yaxes(title_text="layer", type="category", autorange="reversed")
    fig.update_annotations(font_size=11)
    fig.update_layout(template=TEMPLATE, title=f"{CIRCUIT_TITLES[which]}: every head",
                      height=max(460, 2 * (36 * L + 120) + 120))
    return fig


# ------------------------------------------------------------------ data export
