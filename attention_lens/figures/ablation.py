"""Ablation figures: next-token probabilities before and after, and the change per position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import DIVERGING, QUALITATIVE, TEMPLATE, number, position_labels, signed, unique_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.ablation import Ablation, HeadSweep


def _heads(result: Ablation) -> str:
    names = ", ".join(f"L{layer}H{head}" for layer, head in result.heads)
    return f"{result.method}-ablating {names}"


def ablation_figure(result: Ablation) -> go.Figure:
    """Grouped bars: probability of each token in either top-k, before and after ablation."""
    labels = unique_labels([esc(d) for d in result.union_display])
    names = np.asarray([quoted(d) for d in result.union_display], dtype=object)
    fig = go.Figure([
        go.Bar(x=labels, y=result.union_before, name="before", marker_color=QUALITATIVE[4],
               customdata=names,
               hovertemplate="%{customdata} before ablation: p = %{y:.4f}<extra></extra>"),
        go.Bar(x=labels, y=result.union_after, name="after", marker_color=QUALITATIVE[5],
               customdata=names,
               hovertemplate="%{customdata} after ablation: p = %{y:.4f}<extra></extra>"),
    ])
    fig.update_layout(
        template=TEMPLATE, barmode="group",
        title=(f"Next token after {quoted(result.context)} (position {result.position}), "
               f"{esc(_heads(result))}: KL(before‖after) = {result.kl:.4f} nats"),
        xaxis=dict(type="category", title="token"), yaxis_title="probability",
    )
    return finish(fig)


def ablation_positions_figure(result: Ablation) -> go.Figure:
    """Per position: surprisal of the actual next token before/after, and the KL divergence."""
    x = [esc(s) for s in position_labels(list(result.display))]
    fig = go.Figure([
        go.Scatter(x=x, y=result.surprisal_before, name="surprisal before (nats)",
                   mode="lines+markers", line=dict(color=QUALITATIVE[4]),
                   hovertemplate="after %{x}: next token %{y:.3f} nats before<extra></extra>"),
        go.Scatter(x=x, y=result.surprisal_after, name="surprisal after (nats)",
                   mode="lines+markers", line=dict(color=QUALITATIVE[5]),
                   hovertemplate="after %{x}: next token %{y:.3f} nats after<extra></extra>"),
        go.Bar(x=x, y=result.kl_per_position, name="KL(before‖after) (nats)",
               marker_color=QUALITATIVE[7], opacity=0.6,
               hovertemplate="after %{x}: KL = %{y:.4f} nats<extra></extra>"),
    ])
    loss = (f"loss {number(result.loss_before)} → {number(result.loss_after)} nats")
    if result.part.size:
        loss = (f"loss on the repeated part {number(result.part_loss_before)} → "
                f"{number(result.part_loss_after)} nats (whole prompt "
                f"{number(result.loss_before)} → {number(result.loss_after)})")
        # one shaded band per run of consecutive positions (one shape per position would
        # cost a second of layout work on a long prompt)
        part = np.asarray(result.part)
        breaks = np.flatnonzero(np.diff(part) != 1) + 1
        fig.update_layout(shapes=[
            dict(type="rect", xref="x", yref="paper", x0=int(run[0]) - 0.5,
                 x1=int(run[-1]) + 0.5, y0=0, y1=1, fillcolor=QUALITATIVE[2], opacity=0.12,
                 line_width=0, layer="below")
            for run in np.split(part, breaks)])
    fig.update_layout(
        template=TEMPLATE,
        title=f"{esc(_heads(result))}: {loss}",
        xaxis=dict(type="category", title="position (predicting the next token)",
                   tickangle=-60),
        yaxis_title="nats",
    )
    return finish(fig)


def sweep_figure(result: HeadSweep, what: str = "the repeated part") -> go.Figure:
    """Heatmap [layer, head]: the change in loss when that head alone is ablated."""
    z = result.loss_change
    n_layers, n_heads = z.shape
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{h}" for h in range(n_heads)], y=[f"L{la}" for la in range(n_layers)],
        colorscale=DIVERGING, zmid=0.0, zmin=-bound, zmax=bound or 1.0,
        text=[[signed(v, ".2f") for v in row] for row in z],
        texttemplate="%{text}" if n_heads <= 16 else "", textfont=dict(size=10),
        colorbar=dict(title="Δ loss (nats)"),
        hovertemplate=(f"%{{y}}%{{x}} alone {result.method}-ablated: loss on {what} "
                       "changes by %{z:+.3f} nats<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=(f"Change in loss on {what} with each head {result.method}-ablated alone "
               f"(no head ablated: {number(result.loss_before)} nats)"),
        xaxis=dict(title="head", type="category"),
        yaxis=dict(title="layer", type="category", autorange="reversed"),
        height=max(260, 40 * n_layers + 200),
    )
    return finish(fig)


