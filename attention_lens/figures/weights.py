"""Weight figures: singular-value spectra of head circuits, their norms, top-token directions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import plotly.graph_objects as go

from .theme import QUALITATIVE, SEQUENTIAL, TEMPLATE
from .tokens import esc

if TYPE_CHECKING:
    from ..analysis.circuits import CircuitSVD


SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
SUPERSCRIPTS = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


def subscript(n: int) -> str:
    """``n`` in subscript digits (σ₁₂)."""
    return str(n).translate(SUBSCRIPTS)


def tick_text(v: float) -> str:
    """A log-axis tick as a reader writes it: 0.05, 20, 1000, or 2·10⁻⁵ / 10⁶ beyond."""
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    exp = int(np.floor(np.log10(v) + 1e-9))
    mant = round(v / 10.0 ** exp)
    power = "10" + str(exp).translate(SUPERSCRIPTS)
    return power if mant == 1 else f"{mant}·{power}"


def log_ticks(values: np.ndarray) -> dict:
    """Ticks of a log axis over ``values`` (positive ones): 1, 2 and 5 times each power of
    ten in range when the values span at most three decades, the powers alone beyond, every
    label written in full (plotly's own minor labels read "2 … 9" beside "1" and "10")."""
    v = values[np.isfinite(values) & (values > 0)]
    if not v.size:
        return {}
    lo, hi = float(v.min()), float(v.max())
    d0, d1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    steps = (1, 2, 5) if d1 - d0 <= 3 else (1,)
    vals = [m * 10.0 ** d for d in range(d0, d1 + 1) for m in steps]
    vals = [t for t in vals if lo / 1.5 <= t <= hi * 1.5]
    if len(vals) < 2:  # within one step: the two powers of ten around the values
        vals = [10.0 ** d0, 10.0 ** d1] if d1 > d0 else [10.0 ** d0, 10.0 ** (d0 + 1)]
    return dict(tickmode="array", tickvals=vals, ticktext=[tick_text(t) for t in vals])


def singular_values_figure(svd: CircuitSVD, heads: Sequence[tuple[int, int]],
                           log: bool = True) -> go.Figure:
    """One line per selected head: σᵢ of its OV (or QK) circuit against i (1-based)."""
    fig = go.Figure()
    values = []
    legend_room = 70 + 22 * -(-len(heads) // 4)
    for n, (layer, head) in enumerate(heads):
        s = svd.singular_values[layer, head]
        values.append(np.asarray(s, dtype=float).ravel())
        name = f"L{layer}H{head}"
        fig.add_trace(go.Scatter(
            x=np.arange(1, s.shape[0] + 1), y=s, mode="lines+markers", name=name,
            line=dict(color=QUALITATIVE[n % len(QUALITATIVE)], width=1.5),
            marker=dict(size=4),
            hovertemplate=f"{name}: σ<sub>%{{x}}</sub> = %{{y:.4g}}<extra></extra>",
        ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"Singular values of W_{svd.circuit} per head ({len(heads)} heads)",
        xaxis=dict(title="index i", rangemode="tozero"),
        yaxis=dict(title="σᵢ", type="log" if log else "linear",
                   **(log_ticks(np.concatenate(values)) if log and values else {})),
        # below the plot, in as many rows as a phone-width figure needs (about four a row)
        legend=dict(title="head", orientation="h", yref="container", y=0, yanchor="bottom",
                    x=0), margin=dict(b=legend_room), height=400 + legend_room,
    )
    return fig


def svd_norms_figure(svd: CircuitSVD) -> go.Figure:
    """Layer × head heatmap of ||W||_F, with σ_1 in the hover."""
    L, H = svd.frobenius.shape
    s1 = svd.singular_values[..., 0]
    fig = go.Figure(go.Heatmap(
        z=svd.frobenius, x=[str(h) for h in range(H)], y=[str(la) for la in range(L)],
        customdata=s1, colorscale=SEQUENTIAL, colorbar=dict(title="‖W‖_F"),
        hovertemplate=("layer %{y}, head %{x}: ‖W_" + svd.circuit + "‖_F = %{z:.4g}, "
                       "σ₁ = %{customdata:.4g}<extra></extra>"),
    ))
    fig.update_layout(template=TEMPLATE, title=f"‖W_{svd.circuit}‖_F of every head",
                      xaxis=dict(title="head", type="category"),
                      yaxis=dict(title="layer", type="category", autorange="reversed"),
                      height=max(300, 40 * L + 160))
    return fig


def svd_directions_figure(svd: CircuitSVD, layer: int, head: int) -> go.Figure:
    """Top tokens of one head's singular directions: input side left, output side right."""
    n_dir, k = svd.input_ids.shape[2:]
    rows = []
    for d in range(n_dir):
        s = svd.singular_values[layer, head, d]
        rows.append(f"σ{subscript(d + 1)} = {s:.3g}")
    fig = go.Figure()
    for side, tokens, scores, offset in (
        ("input", svd.input_tokens, svd.input_scores, 0),
        ("output", svd.output_tokens, svd.output_scores, k + 1),
    ):
        toks = np.asarray(tokens[layer][head], dtype=object).reshape(n_dir, k)
        z = scores[layer, head]
        text = [[esc(str(t)) for t in row] for row in toks]
        space = svd.input_space if side == "input" else svd.output_space
        fig.add_trace(go.Heatmap(
            z=z, x=[offset + j for j in range(k)], y=rows, text=text,
            texttemplate="%{text}", colorscale=SEQUENTIAL,  # text sized to fit its cells
            showscale=side == "output", colorbar=dict(title="score"), name=side,
            customdata=np.asarray([[esc(space)] * k] * n_dir, dtype=object),
            hovertemplate=(f"{side} token '%{{text}}' of %{{y}}: %{{z:.3f}}"
                           "<br>%{customdata}<extra></extra>"),
        ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"L{layer}H{head} W_{svd.circuit}: tokens read (left) and written (right)",
        xaxis=dict(showticklabels=False, title="input side (rank 1 → k)  |  output side "
                                               "(rank 1 → k)"),
        yaxis=dict(type="category", autorange="reversed"),
        height=max(260, 60 * n_dir + 140),
    )
    return fig


# ------------------------------------------------------------------ data export
