"""The pruned attribution graph on a (position, layer) grid, and its node table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import GRID, QUALITATIVE, TEMPLATE
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.graph import AttributionGraph, GraphView

POSITIVE, NEGATIVE = QUALITATIVE[4], QUALITATIVE[5]
#: Edges drawn at most (the strongest by magnitude); the table and export hold them all.
MAX_EDGES = 400


def node_label(graph: AttributionGraph, i: int) -> str:
    """A node in words, escaped for plotly."""
    return esc(graph.label(i))


def node_rows(graph: AttributionGraph) -> np.ndarray:
    """[N] the grid row of each node: tokens 0, layer l's nodes l + 1, the target on top."""
    rows = graph.layer + 1
    rows[graph.kind == "ln_bias"] = graph.n_layers
    rows[graph.kind == "target"] = graph.n_layers + 1
    return rows.astype(np.float64)


#: Nodes a column of one (row, position) cell holds before the cell gets another column.
CELL_COLUMN = 6
#: Largest marker (px) of a node that shares its cell with more than two others.
CROWDED_SIZE = 13


def node_cells(graph: AttributionGraph) -> dict[tuple[float, int], list[int]]:
    """The nodes of each (row, position) cell of the grid, in graph order."""
    rows = node_rows(graph)
    cells: dict[tuple[float, int], list[int]] = {}
    for i in range(graph.n_nodes):
        cells.setdefault((rows[i], int(graph.pos[i])), []).append(i)
    return cells


def node_xy(graph: AttributionGraph) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates: x = position, y = row; nodes sharing a (row, position) cell spread over
    it in staggered columns of at most :data:`CELL_COLUMN` (down the row's height, across
    the position's width), so that none is drawn on another."""
    x = graph.pos.astype(np.float64).copy()
    y = node_rows(graph)
    for members in node_cells(graph).values():
        k = len(members)
        if k < 2:
            continue
        cols = -(-k // CELL_COLUMN)
        per_col = -(-k // cols)
        dx = np.linspace(-0.25, 0.25, cols) if cols > 1 else np.zeros(1)
        half = 0.5 if cols > 1 else 0.0  # odd columns sit half a step lower
        step = 0.76 / (per_col - 1 + half) if per_col > 1 else 0.0
        for j, i in enumerate(members):
            c, r = divmod(j, per_col)
            x[i] += dx[c]
            y[i] += 0.38 - (r + half * (c % 2)) * step if per_col > 1 else 0.0
    return x, y


def _top_links(graph: AttributionGraph, i: int, incoming: bool, n: int = 4) -> list[str]:
    mask = graph.dst == i if incoming else graph.src == i
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(-np.abs(graph.weight[idx]), kind="stable")[:n]]
    other = graph.src if incoming else graph.dst
    return [f"  {node_label(graph, int(other[e]))}: {graph.weight[e]:+.3f}" for e in idx]


def graph_figure(view: GraphView) -> go.Figure:
    """Nodes on the (position, layer) grid, edges by magnitude (width) and sign (colour)."""
    g = view.graph
    x, y = node_xy(g)
    fig = go.Figure()
    order = np.argsort(-np.abs(g.weight), kind="stable")[:MAX_EDGES]
    if len(order):
        wmax = float(np.abs(g.weight[order]).max()) or 1.0
        bins = np.minimum((np.abs(g.weight[order]) / wmax * 4).astype(int), 3)
        for sign, colour in ((1, POSITIVE), (-1, NEGATIVE)):
            for b in range(4):
                sel = order[(np.sign(g.weight[order]) == sign) & (bins == b)]
                if not len(sel):
                    continue
                xs = np.column_stack([x[g.src[sel]], x[g.dst[sel]], np.full(len(sel), np.nan)])
                ys = np.column_stack([y[g.src[sel]], y[g.dst[sel]], np.full(len(sel), np.nan)])
                fig.add_scatter(x=xs.ravel(), y=ys.ravel(), mode="lines", hoverinfo="skip",
                                line=dict(color=colour, width=0.6 + 1.6 * b),
                                opacity=0.35 + 0.15 * b, showlegend=False)
    vmax = float(np.abs(g.value[g.kind != "target"]).max()) if g.n_nodes > 1 else 1.0
    sizes = 7 + 18 * np.sqrt(np.abs(g.value) / (vmax or 1.0))
    for members in node_cells(g).values():  # crowded cells: smaller markers, spread apart
        if len(members) > 2:
            sizes[members] = np.minimum(sizes[members], CROWDED_SIZE)
    sizes[g.kind == "target"] = 24
    colours = np.where(g.value >= 0, POSITIVE, NEGATIVE).astype(object)
    colours[g.kind == "target"] = "#ffffff"
    symbols = {"token": "square", "head": "circle", "bias": "diamond", "mlp": "triangle-up",
               "ln_bias": "diamond", "target": "star"}
    hover = []
    for i in range(g.n_nodes):
        lines = [f"<b>{node_label(g, i)}</b>", f"value {g.value[i]:+.4f}",
                 f"cumulative influence {view.pruned.cumulative[i]:.3f}"]
        ins, outs = _top_links(g, i, True), _top_links(g, i, False)
        if ins:
            lines += ["top inputs:", *ins]
        if outs:
            lines += ["top outputs:", *outs]
        hover.append("<br>".join(lines))
    custom = np.column_stack([g.kind, g.layer, g.head, g.pos]).tolist()
    fig.add_scatter(x=x, y=y, mode="markers", name="nodes", hovertext=hover,
                    hoverinfo="text", customdata=custom, showlegend=False,
                    marker=dict(size=sizes, color=colours.tolist(),
                                symbol=[symbols[k] for k in g.kind],
                                line=dict(color="#111111", width=1)))
    # label the positions where something besides the token is kept
    busy = sorted(set(int(p) for p in g.pos[g.kind != "token"]))
    ticks = [f"{p}: {esc(g.display[p])}" for p in busy]
    rows = ["tokens", *[f"layer {layer}" for layer in range(g.n_layers)], "logit"]
    what = quoted(g.target_display) if g.contrast_id is None else \
        f"{quoted(g.target_display)} − {quoted(g.contrast_display)}"
    title = (f"Logit {what} at position {g.position}: {g.logit - g.bias:+.3f} (− b_U); kept "
             f"{g.n_nodes} of {view.n_nodes_full} nodes, {len(g.weight)} of "
             f"{view.n_edges_full} edges ({view.kept_target_share:.0%} of the target)")
    fig.update_layout(
        template=TEMPLATE, height=300 + 150 * g.n_layers,
        title=dict(text=title, font=dict(size=13)),
        xaxis=dict(title="position (token)", tickmode="array", tickvals=busy, ticktext=ticks,
                   tickangle=-50, range=[-0.8, g.position + 0.8], gridcolor=GRID),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows,
                   range=[-0.6, len(rows) - 0.4], gridcolor=GRID),
        hovermode="closest")
    return finish(fig)


def graph_table(view: GraphView, n: int = 40) -> list[dict]:
    """The kept nodes by magnitude: label, kind, layer, head, position, value, influence."""
    g = view.graph
    order = np.argsort(-np.abs(g.value), kind="stable")[:n]
    return [{"node": g.label(int(i)), "kind": str(g.kind[i]), "layer": int(g.layer[i]),
             "head": int(g.head[i]), "position": int(g.pos[i]), "value": float(g.value[i]),
             "cumulative influence": float(view.pruned.cumulative[i])} for i in order]
