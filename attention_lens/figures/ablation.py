"""Ablation figures: next-token probabilities before and after, and the change per position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import QUALITATIVE, TEMPLATE, position_labels, unique_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.ablation import Ablation


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
    fig.update_layout(
        template=TEMPLATE,
        title=(f"{esc(_heads(result))}: loss {result.loss_before:.3f} → "
               f"{result.loss_after:.3f} nats"),
        xaxis=dict(type="category", title="position (predicting the next token)",
                   tickangle=-60),
        yaxis_title="nats",
    )
    return finish(fig)


def ablation_table(result: Ablation) -> list[dict]:
    """Rows (token, probability before, after, change) behind :func:`ablation_figure`."""
    return [
        {"token": d, "token_id": int(i), "probability_before": float(b),
         "probability_after": float(a), "change": float(a - b), "heads": _heads(result)}
        for d, i, b, a in zip(result.union_display, result.union_ids, result.union_before,
                              result.union_after)
    ]
