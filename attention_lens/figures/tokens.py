"""The prompt as a grid of tokens, each coloured by the probability the model gave it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import GRID, SEQUENTIAL, TEMPLATE

#: Outline of the pinned token (Okabe-Ito vermillion).
PINNED = "#D55E00"
#: Each cell is at least this wide (px); a wider grid scrolls inside its box.
MIN_CELL = 44

if TYPE_CHECKING:
    from ..analysis.predictions import TokenPredictions


def esc(text: str) -> str:
    """Escape the characters plotly's hover and tick labels read as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def finish(fig: go.Figure) -> go.Figure:
    """Let every axis grow its margin to fit long tick labels and titles."""
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def quoted(display: str) -> str:
    """A token's display string in quotes, escaped for plotly labels."""
    return f"'{esc(display)}'"


def _alternatives(result: TokenPredictions, row: int) -> str:
    return "<br>".join(
        f"  {quoted(str(tok))} {prob:.3f}"
        for tok, prob in zip(result.top_display[row], result.top_probs[row])
    )


def grid_width(n_tokens: int, per_row: int) -> int:
    """Columns of the token grid: ``per_row``, or fewer for a short prompt."""
    return max(1, min(per_row, n_tokens))


def cell_position(x: object, y: object, per_row: int, n_tokens: int) -> int | None:
    """The token position of the grid cell at column ``x``, row ``y`` (a click's x and y).

    A browser's click on a heatmap carries the cell's x and y (and z) but not always the
    trace's ``customdata``, so the position is computed from the cell. None for a padding
    cell after the last token or for coordinates that are not a cell.
    """
    try:
        col, row = int(round(float(x))), int(round(float(y)))
    except (TypeError, ValueError):
        return None
    width = grid_width(n_tokens, per_row)
    if not (0 <= col < width and row >= 0):
        return None
    pos = row * width + col
    return pos if pos < n_tokens else None


def token_sequence_figure(result: TokenPredictions, per_row: int = 16,
                          pinned: int | None = None) -> go.Figure:
    """Tokens in reading order, coloured by p(token | everything before it); hover: alternatives.

    Token 0 has no prediction (nothing comes before it) and is left uncoloured. Each cell's
    ``customdata`` is ``[position, hover text]`` (position -1 for padding cells), so a page
    can pin the clicked token.
    """
    p = len(result.display)
    per_row = grid_width(p, per_row)
    rows = math.ceil(p / per_row)
    z = np.full((rows, per_row), np.nan)
    custom = np.empty((rows, per_row, 2), dtype=object)
    custom[..., 0], custom[..., 1] = -1, ""
    xs, ys, texts, colours = [], [], [], []
    for i, tok in enumerate(result.display):
        r, c = divmod(i, per_row)
        xs.append(c)
        ys.append(r)
        texts.append(esc(tok))
        if i == 0:
            hover = f"position 0 {quoted(tok)}<br>first token: nothing predicts it"
            colours.append("#ffffff")
        else:
            prob = float(result.next_probs[i - 1])
            z[r, c] = prob
            hover = (f"position {i} {quoted(tok)}<br>"
                     f"p = {prob:.4f} (rank {int(result.next_ranks[i - 1])}, "
                     f"surprisal {float(result.surprisal_nats[i - 1]):.2f} nats)<br>"
                     f"model's top {result.k} after {quoted(result.display[i - 1])}:<br>"
                     f"{_alternatives(result, i - 1)}")
            colours.append("#111111" if prob > 0.6 else "#ffffff")
        custom[r, c, 0], custom[r, c, 1] = i, hover
    fig = go.Figure([
        go.Heatmap(z=z, customdata=custom, hovertemplate="%{customdata[1]}<extra></extra>",
                   colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0, xgap=2, ygap=2,
                   colorbar=dict(title="p(token)")),
        go.Scatter(x=xs, y=ys, mode="text", text=texts, textfont=dict(color=colours),
                   hoverinfo="skip", showlegend=False),
    ])
    if pinned is not None and 0 <= pinned < p:
        r, c = divmod(pinned, per_row)
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                      line=dict(color=PINNED, width=3))
    fig.update_layout(
        template=TEMPLATE, title="Probability of each actual token given the tokens before it",
        height=max(160, 40 * rows + 90), width=MIN_CELL * per_row + 140,
        xaxis=dict(visible=False, range=[-0.5, per_row - 0.5]),
        yaxis=dict(visible=False, autorange="reversed"),
        plot_bgcolor=GRID,
    )
    return finish(fig)


