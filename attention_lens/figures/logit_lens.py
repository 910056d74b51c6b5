"""Logit-lens figures: the stage × position grid of top tokens, and a token's trajectory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import plotly.graph_objects as go

from .theme import QUALITATIVE, SEQUENTIAL, TEMPLATE, position_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.logit_lens import LogitLens

Colour = Literal["top", "actual", "target"]


#: Positions in view at first: longer prompts open on their last positions and scroll
#: sideways (drag the grid or the range slider), the tokens and stages staying on screen.
WINDOW = 16
#: Cell text is cut to this many characters (plotly sizes the text of every cell to fit the
#: narrowest one; cells too narrow for legible text show colour and hover only).
CELL_CHARS = 6
#: Narrowest cell (px) on screen: about CELL_CHARS characters of legible text.
CELL_PX = 46


#: Markup characters in cell text, written as look-alikes: plotly sizes cell text by its
#: characters, and an escape (&lt;) would count four.
CELL_LOOKALIKES = str.maketrans({"<": "‹", ">": "›", "&": "＆"})


def _cell_text(display: str) -> str:
    text = display if len(display) <= CELL_CHARS else display[: CELL_CHARS - 1] + "…"
    return text.translate(CELL_LOOKALIKES)


def logit_lens_figure(result: LogitLens, colour: Colour = "top") -> go.Figure:
    """Grid [stage, position]: each cell shows the top token; colour is a probability.

    ``colour``: "top" (probability of the top token), "actual" (of the token that really came
    next) or "target" (of the chosen target token). Prompts longer than :data:`WINDOW`
    positions open on their last ``WINDOW`` positions with a range slider below.
    """
    if colour == "target" and result.target_probs is None:
        raise ValueError("colour='target' needs a logit lens computed with a target token")
    z = {"top": result.top_probs[..., 0], "actual": result.next_probs,
         "target": result.target_probs}[colour]
    what = {"top": "top token", "actual": "actual next token",
            "target": f"target {quoted(result.target_display)}"}[colour]
    s, p, k = result.top_ids.shape
    # hover: the stage and position come from the axes, the rest from each cell's customdata
    tops = [[[f"{quoted(str(result.top_display[si, i, j]))} {result.top_probs[si, i, j]:.3f}"
              for j in range(k)] for i in range(p)] for si in range(s)]
    hover = np.full((s, p), "", dtype=object)
    computed = range(p) if result.positions is None else result.positions
    for si in range(s):
        for i in computed:
            lines = [f"  {j + 1}. {t}" for j, t in enumerate(tops[si][i])]
            if i < p - 1:
                lines.append(f"actual next {quoted(result.display[i + 1])}: "
                             f"p = {result.next_probs[si, i]:.4f}, "
                             f"rank {result.next_ranks[si, i]}")
            if result.target_id is not None:
                lines.append(f"target {quoted(result.target_display)}: "
                             f"p = {result.target_probs[si, i]:.4f}, "
                             f"rank {result.target_ranks[si, i]}")
            hover[si, i] = "<br>".join(lines)
    text = np.vectorize(lambda d: _cell_text(str(d)), otypes=[object])(result.top_display[..., 0])
    labels = [esc(label) for label in position_labels(list(result.display))]
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=[esc(label) for label in result.stage_labels], text=text,
        texttemplate="%{text}", customdata=hover, colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
        hoverongaps=False, colorbar=dict(title="p"), xgap=1, ygap=1,
        hovertemplate="%{y}, after position %{x}<br>%{customdata}<extra></extra>",
    ))
    xaxis = dict(title="position (prediction of the next token)", type="category",
                 tickangle=-60, nticks=min(p, WINDOW) + 1)
    if p > WINDOW:
        xaxis.update(range=[p - WINDOW - 0.5, p - 0.5],
                     rangeslider=dict(visible=True, thickness=0.06))
    title = f"Logit lens: top token per stage; colour = p({what})"
    if result.positions is not None:
        title += (f"<br>{len(result.positions)} of {p} positions so far; the others are "
                  "being computed")
    elif p > WINDOW:
        title += f"<br>the last positions of {p}: drag sideways for the rest"
    fig.update_layout(
        template=TEMPLATE, title=title, xaxis=xaxis, dragmode="pan",
        # a narrow screen shows fewer positions at once, each wide enough for its token
        # (assets/app.js); the rest are a drag away
        meta={"al_cell_px": CELL_PX},
        yaxis=dict(type="category", autorange="reversed", fixedrange=True),
        height=max(300, 26 * s + (290 if p > WINDOW else 220)),
    )
    return finish(fig)


def logit_lens_target_figure(result: LogitLens, position: int = -1) -> go.Figure:
    """Probability across stages at one position of the target (or else the actual next token)."""
    p = len(result.display)
    pos = position % p
    if result.target_id is not None:
        probs, ranks = result.target_probs[:, pos], result.target_ranks[:, pos]
        name = f"target {quoted(result.target_display)}"
    elif pos < p - 1:
        probs, ranks = result.next_probs[:, pos], result.next_ranks[:, pos]
        name = f"actual next {quoted(result.display[pos + 1])}"
    else:
        raise ValueError("the last position has no next token: choose a target token")
    stages = [esc(label) for label in result.stage_labels]
    fig = go.Figure(go.Scatter(
        x=stages, y=probs, mode="lines+markers", name=name, customdata=ranks,
        line=dict(color=QUALITATIVE[0]),
        hovertemplate=f"{name} %{{x}}: p = %{{y:.4f}}, rank %{{customdata}}<extra></extra>",
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"{name} after position {pos} {quoted(result.display[pos])}, stage by stage",
        xaxis=dict(type="category", title="stage"), yaxis=dict(title="probability", range=[0, 1]),
    )
    return finish(fig)


