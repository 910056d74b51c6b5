"""Activation-patching grids (exact and attribution patching), their scatter, path patching."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from ..analysis.labels import head_label
from .theme import DIVERGING, QUALITATIVE, TEMPLATE, number, position_labels, wrap_title
from .tokens import esc, finish

if TYPE_CHECKING:
    from ..analysis.patching import PairSetPatching, PatchingGrid, PathPatching

METRIC_NAMES = {"logit_diff": "logit difference", "normalized": "normalised logit difference",
                "logprob": "log-probability", "kl": "KL to clean"}
CELL_PX = 16


def _rows_cols(grid: PatchingGrid, z: np.ndarray) -> tuple[np.ndarray, list[str], list[str],
                                                          str, str]:
    """Heatmap matrix and labels: rows are layers (or heads), columns positions (or heads)."""
    axes = grid.axes
    if axes == ("layer", "pos", "head"):
        n_layers, n_pos, n_heads = z.shape
        mat = z.transpose(0, 2, 1).reshape(n_layers * n_heads, n_pos)
        rows = [head_label(la, h) for la in range(n_layers) for h in range(n_heads)]
        return mat, rows, position_labels(list(grid.clean_display)), "head", "position"
    if axes == ("layer", "head"):
        return (z, [f"L{la}" for la in range(z.shape[0])], [f"H{h}" for h in range(z.shape[1])],
                "layer", "head")
    return (z, [f"L{la}" for la in range(z.shape[0])],
            position_labels(list(grid.clean_display)), "layer", "position")


def patching_figure(grid: PatchingGrid, which: str = "exact") -> go.Figure:
    """Heatmap of the change in the metric each patch causes (exact, or its attribution
    estimate), diverging around zero; positions carry the clean prompt's tokens."""
    values = grid.effect if which == "exact" else grid.attribution_effect
    mat, rows, cols, row_title, col_title = _rows_cols(grid, values)
    finite = np.abs(mat[np.isfinite(mat)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    metric = METRIC_NAMES.get(grid.metric, grid.metric)
    hover_col = "%{x}"
    if col_title == "position":
        differs = [c != r for c, r in zip(grid.clean_display, grid.corrupted_display)]
        custom = np.array([[f" (corrupted: {esc(grid.corrupted_display[i])})" if differs[i]
                            else "" for i in range(len(cols))]] * len(rows), dtype=object)
        hover_col = "%{x}%{customdata}"
    else:
        custom = None
    what = "activation patching (exact)" if which == "exact" else "attribution patching"
    fig = go.Figure(go.Heatmap(
        z=mat, x=[esc(c) for c in cols], y=rows, colorscale=DIVERGING, zmid=0.0,
        zmin=-bound, zmax=bound, customdata=custom, xgap=1, ygap=1,
        colorbar=dict(title=f"Δ {metric}"),
        hovertemplate=f"%{{y}} at {hover_col}: Δ {metric} %{{z:+.4f}}<extra></extra>",
    ))
    title = (f"{what}, {grid.direction}: Δ {metric} "
             f"(clean {number(grid.clean_metric)}, corrupted {number(grid.corrupted_metric)})")
    fig.update_layout(
        template=TEMPLATE, title=wrap_title(title, 70),
        xaxis=dict(title=col_title, type="category", tickangle=-60 if col_title == "position"
                   else 0),
        yaxis=dict(title=row_title, type="category", autorange="reversed"),
        height=max(300, CELL_PX * len(rows) + 220),
    )
    return finish(fig)


def patching_scatter_figure(grid: PatchingGrid) -> go.Figure:
    """Attribution-patching estimate against the exact effect of every cell, with y = x."""
    exact, approx = grid.effect.ravel(), grid.attribution_effect.ravel()
    mat, rows, cols, _, _ = _rows_cols(grid, grid.effect)
    labels = np.array([[f"{r} @ {esc(c)}" for c in cols] for r in rows], dtype=object)
    if grid.axes == ("layer", "pos", "head"):  # labels follow the heatmap's row order
        n_layers, n_pos, n_heads = grid.effect.shape
        labels = labels.reshape(n_layers, n_heads, n_pos).transpose(0, 2, 1)
    keep = np.isfinite(exact) & np.isfinite(approx)
    lo = float(min(exact[keep].min(), approx[keep].min())) if keep.any() else -1.0
    hi = float(max(exact[keep].max(), approx[keep].max())) if keep.any() else 1.0
    metric = METRIC_NAMES.get(grid.metric, grid.metric)
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", hoverinfo="skip",
                   line=dict(color=QUALITATIVE[7], dash="dot")),
        go.Scatter(x=exact[keep], y=approx[keep], mode="markers", name="cells",
                   marker=dict(color=QUALITATIVE[1], size=6, opacity=0.7),
                   customdata=labels.ravel()[keep],
                   hovertemplate="%{customdata}: exact %{x:+.4f}, attribution %{y:+.4f}"
                                 "<extra></extra>"),
    ])
    fig.update_layout(
        template=TEMPLATE, showlegend=False, height=420,
        title=wrap_title(f"attribution vs exact patching: correlation "
                         f"{number(grid.correlation, '.3f')}", 60),
        xaxis_title=f"exact Δ {metric}", yaxis_title=f"attribution Δ {metric}",
    )
    return finish(fig)


def path_patching_figure(result: PathPatching) -> go.Figure:
    """Receiver head × {q, k, v}: the change in the metric when the sender's output reaches
    only that input; the direct path to the logits in the title."""
    n_layers, n_heads, _ = result.values.shape
    ls, hs = result.sender
    layers = range(ls + 1, n_layers)
    rows = [head_label(la, h) for la in layers for h in range(n_heads)]
    mat = (result.values[ls + 1:].reshape(-1, 3) - result.base_metric) if rows else \
        np.zeros((0, 3))
    finite = np.abs(mat[np.isfinite(mat)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    metric = METRIC_NAMES.get(result.metric, result.metric)
    fig = go.Figure(go.Heatmap(
        z=mat, x=["query", "key", "value"], y=rows, colorscale=DIVERGING, zmid=0.0,
        zmin=-bound, zmax=bound, xgap=1, ygap=1, colorbar=dict(title=f"Δ {metric}"),
        hovertemplate=(f"L{ls}H{hs} → %{{y}} %{{x}}: Δ {metric} %{{z:+.4f}}"
                       "<extra></extra>"),
    ))
    title = (f"path patching from L{ls}H{hs} ({result.direction}, MLPs "
             f"{getattr(result, 'mlps', 'recomputed')}): direct to logits "
             f"Δ {number(result.direct - result.base_metric, '+.3f')}")
    if not rows:
        title += "; no later layer to receive it"
    fig.update_layout(template=TEMPLATE, title=wrap_title(title, 60),
                      xaxis_title="receiver input",
                      yaxis=dict(title="receiver head", type="category",
                                 autorange="reversed"),
                      height=max(300, CELL_PX * len(rows) + 200))
    return finish(fig)


def pair_set_figure(result: PairSetPatching) -> go.Figure:
    """The mean change of the metric over a set of pairs (positions labelled by pair 1)."""
    shape = (-1,) + (1,) * (result.per_pair.ndim - 1)
    bases = result.base_metrics.reshape(shape)
    first = result.grids[0]
    mean = dataclasses.replace(
        first, values=(result.per_pair - bases).mean(0),
        attribution=(result.per_pair_attribution - bases).mean(0), base_metric=0.0,
        clean_metric=float(result.clean_metrics.mean()),
        corrupted_metric=float(result.corrupted_metrics.mean()), correlation=result.correlation)
    fig = patching_figure(mean, "exact")
    n = len(result.grids)
    metric = METRIC_NAMES.get(first.metric, first.metric)
    title = (f"mean over {n} pair{'s' if n != 1 else ''}, {first.direction}: Δ {metric} "
             f"(clean {number(mean.clean_metric)}, corrupted {number(mean.corrupted_metric)} "
             f"on average; attribution correlation {number(result.correlation)})")
    if "pos" in first.axes:
        title += "; positions labelled by pair 1"
    fig.update_layout(title=wrap_title(title, 90))
    return fig
