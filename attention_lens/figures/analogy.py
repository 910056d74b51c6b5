"""Analogy figure: the top answers of an embedding equation with their scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from .theme import QUALITATIVE, TEMPLATE
from .tokens import esc

if TYPE_CHECKING:
    from ..analysis.analogy import Analogy

METHOD_NAMES = {"3cosadd": "3CosAdd", "3cosmul": "3CosMul"}


def equation(result: Analogy) -> str:
    """``king + woman − man`` as typed (escaped for plotly)."""
    text = " + ".join(esc(w) for w in result.positive)
    return text + "".join(f" − {esc(w)}" for w in result.negative)


def analogy_figure(result: Analogy) -> go.Figure:
    """Horizontal bars of the answers' scores, best first; hover gives the cosine too."""
    labels = [f"{i + 1}. '{esc(d)}'" for i, d in enumerate(result.display)]
    method = METHOD_NAMES.get(result.method, result.method)
    fig = go.Figure(go.Bar(
        x=result.scores, y=labels, orientation="h", marker_color=QUALITATIVE[2],
        customdata=list(zip(result.token_ids.tolist(), result.cosine.tolist())),
        hovertemplate=(f"%{{y}} (id %{{customdata[0]}}): {method} %{{x:.4f}}, "
                       "cosine to target %{customdata[1]:.4f}<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"{equation(result)} = ?  ({method}, {result.matrix})",
        xaxis=dict(title=f"{method} score" + (" (cosine)" if result.method == "3cosadd"
                                               else "")),
        yaxis=dict(type="category", autorange="reversed"),
        height=max(360, 26 * len(labels) + 140),
    )
    return fig


