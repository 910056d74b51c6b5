"""Direct-logit-attribution figures: per head, and every component in residual-stream order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import DIVERGING, QUALITATIVE, TEMPLATE, number, signed
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.attribution import LogitAttribution

KIND_COLOURS = {"embed": QUALITATIVE[0], "pos_embed": QUALITATIVE[2], "head": QUALITATIVE[1],
                "b_O": QUALITATIVE[7], "mlp": QUALITATIVE[5], "ln_bias": QUALITATIVE[6]}


def _what(result: LogitAttribution) -> str:
    """"logit(' Potter')" or "logit(' Potter') − logit(' Harry')"."""
    text = f"logit({quoted(result.target_display)})"
    if result.contrast_id is not None:
        text += f" − logit({quoted(result.contrast_display)})"
    return text


def attribution_heads_figure(result: LogitAttribution) -> go.Figure:
    """Heatmap [layer, head] of each head's direct contribution, diverging around zero."""
    n_layers, n_heads = result.heads.shape
    what = _what(result)
    bound = float(np.abs(result.heads).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=result.heads, x=[f"H{h}" for h in range(n_heads)],
        y=[f"L{layer}" for layer in range(n_layers)], colorscale=DIVERGING, zmid=0.0,
        zmin=-bound, zmax=bound, texttemplate="%{z:+.2f}", colorbar=dict(title="Δ logit"),
        hovertemplate=f"%{{y}}%{{x}}: %{{z:+.4f}} to {what}<extra></extra>",
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"Direct attribution per head to {what} after {quoted(result.context)}",
        xaxis_title="head", yaxis=dict(title="layer", autorange="reversed"),
        height=max(250, 45 * n_layers + 150),
    )
    return finish(fig)


def attribution_components_figure(result: LogitAttribution) -> go.Figure:
    """Bars of every component's contribution, in the order they enter the residual stream."""
    what = _what(result)
    fig = go.Figure(go.Bar(
        x=[esc(label) for label in result.labels], y=result.values,
        marker_color=[KIND_COLOURS.get(kind, QUALITATIVE[8]) for kind in result.kinds],
        customdata=np.asarray(result.kinds, dtype=object),
        hovertemplate=f"%{{x}} (%{{customdata}}): %{{y:+.4f}} to {what}<extra></extra>",
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=(f"Direct logit attribution at position {result.position} "
               f"{quoted(result.context)}: sum {signed(result.total)} = {what} − b_U, "
               f"with {what} = {number(result.logit)} and b_U = {number(result.bias)}"),
        xaxis=dict(type="category", title="component", tickangle=-60),
        yaxis_title=f"contribution to {what}",
    )
    return finish(fig)


