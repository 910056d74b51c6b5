"""Next-token prediction figures: top-k bar chart and per-position surprisal."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import QUALITATIVE, TEMPLATE, position_labels, unique_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.predictions import NextToken, TokenPredictions


def next_token_figure(result: NextToken) -> go.Figure:
    """Horizontal bars of the top-k next-token probabilities, most likely at the top."""
    labels = unique_labels([esc(d) for d in result.display])
    custom = np.stack([result.ranks, [quoted(d) for d in result.display], result.logits,
                       result.token_ids], axis=-1).astype(object)
    fig = go.Figure(go.Bar(
        x=result.probs, y=labels, orientation="h", marker_color=QUALITATIVE[1],
        customdata=custom,
        hovertemplate=("rank %{customdata[0]}: %{customdata[1]} (id %{customdata[3]})<br>"
                       "probability %{x:.4f}<br>logit %{customdata[2]:.3f}<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"Next token after {quoted(result.context)} (position {result.position})",
        xaxis_title="probability", yaxis=dict(autorange="reversed", type="category"),
        height=max(250, 28 * len(labels) + 100),
    )
    return finish(fig)


def next_token_table(result: NextToken) -> list[dict]:
    """Rows (rank, token, display, id, probability, logit) behind :func:`next_token_figure`."""
    return [
        {"rank": int(r), "token": t, "display": d, "token_id": int(i), "probability": float(p),
         "logit": float(lg)}
        for r, t, d, i, p, lg in zip(result.ranks, result.tokens, result.display,
                                     result.token_ids, result.probs, result.logits)
    ]


def surprisal_figure(result: TokenPredictions) -> go.Figure:
    """Bars of the surprisal (nats) of each actual next token, by the position that predicts it."""
    p = len(result.display)
    labels = [esc(s) for s in position_labels(list(result.display))]
    nxt = [quoted(str(d)) for d in result.top_display[:, 0]]
    actual = ["" if i == p - 1 else quoted(result.display[i + 1]) for i in range(p)]
    custom = np.stack([actual, result.next_probs, result.next_ranks, nxt], axis=-1).astype(object)
    fig = go.Figure(go.Bar(
        x=labels, y=result.surprisal_nats, marker_color=QUALITATIVE[0], customdata=custom,
        hovertemplate=("after %{x}: next token %{customdata[0]}<br>"
                       "surprisal %{y:.2f} nats, p = %{customdata[1]:.4f}, rank %{customdata[2]}"
                       "<br>top guess %{customdata[3]}<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE, xaxis=dict(type="category", title="position (reads this token)"),
        yaxis_title="surprisal of the next token (nats)",
        title=f"Surprisal per position (mean loss {result.loss:.3f} nats)",
    )
    return finish(fig)


