"""The circuit on the (position, layer) grid of /graph when its edge scores are split by
position (else on a layer × component grid), its faithfulness curve beside random circuits,
and its strongest edges."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import plotly.graph_objects as go

from .theme import GRID, QUALITATIVE, TEMPLATE, number, wrap_title
from .tokens import esc, finish

if TYPE_CHECKING:
    from ..analysis.circuit.discovery import CircuitDiscovery
    from ..analysis.circuit.search import FaithfulnessCurve

POSITIVE, NEGATIVE = QUALITATIVE[4], QUALITATIVE[5]
#: Where an edge ends below its receiver: query left, key centre, value right.
INPUT_OFFSET = {"q": -0.25, "k": 0.0, "v": 0.25, "": 0.0}
ABLATION_COLOURS = {"resample": QUALITATIVE[0], "mean": QUALITATIVE[2], "zero": QUALITATIVE[3]}
METHOD_NAMES = {"eap": "EAP", "eap_ig": "EAP-IG", "exact": "exact edge patching"}


def node_xy(n_layers: int, n_heads: int, has_mlp: bool) -> dict[str, tuple[float, float]]:
    """Grid coordinates of every component: x = head (the MLP after the heads), y = layer + 1;
    the input below layer 0, the logits above the last layer."""
    centre = (n_heads - 1 + int(has_mlp)) / 2
    out = {"input": (centre, 0.0), "logits": (centre, n_layers + 1.0)}
    for layer in range(n_layers):
        for h in range(n_heads):
            out[f"L{layer}H{h}"] = (float(h), layer + 1.0)
        if has_mlp:
            out[f"MLP{layer}"] = (float(n_heads), layer + 1.0)
    return out


#: Per-position cells of the circuit's edges drawn at most (the strongest by |score|).
MAX_CELLS = 300
#: Cells below this share of the largest cell's |score| are not drawn (the table and the
#: exports hold every edge's score).
MIN_CELL_SHARE = 0.02
#: Where an input sits below its head on the position grid, and its marker.
INPUT_SYMBOL = {"q": "triangle-up", "k": "square", "v": "diamond"}
INPUT_WORD = {"q": "query", "k": "key", "v": "value"}


def _how(disc: CircuitDiscovery) -> str:
    """How the circuit was chosen, in words."""
    if disc.settings.get("search") == "acdc":
        return f"ACDC, threshold {disc.settings.get('threshold'):g}"
    return f"top {disc.k} by |score|"


def circuit_figure(disc: CircuitDiscovery) -> go.Figure:
    """The circuit on the (position, layer) grid where its scores are split by position (and
    some cell is large enough to draw), else on the layer × component grid."""
    if disc.scores.by_position is not None and \
            disc.scores.by_position.shape[1] == len(disc.clean_display) and circuit_cells(disc):
        return circuit_positions_figure(disc)
    return circuit_components_figure(disc)


def cell_x(node: str, pos: int, n_heads: int, has_mlp: bool) -> float:
    """x of a component at a position on the position grid: the position, the heads (then
    the MLP) spread across its width; the input and the logits at its centre."""
    if node in ("input", "logits"):
        return float(pos)
    per = n_heads + int(has_mlp)
    col = n_heads if node.startswith("MLP") else int(node.split("H")[1])
    return pos - 0.36 + 0.72 * (col + 0.5) / per


def node_row(node: str, n_layers: int) -> float:
    """The grid row of a component: the input 0, layer l's components l + 1, the logits on
    top."""
    if node == "input":
        return 0.0
    if node == "logits":
        return n_layers + 1.0
    return float(node[3:] if node.startswith("MLP") else node[1:].split("H")[0]) + 1.0


def circuit_cells(disc: CircuitDiscovery) -> list[tuple[int, int, float]]:
    """(edge, position, score at that position) of the circuit's edges, strongest first:
    at most :data:`MAX_CELLS`, none below :data:`MIN_CELL_SHARE` of the strongest."""
    bp = disc.scores.by_position
    idx = np.nonzero(disc.kept)[0]
    if not len(idx):
        return []
    sub = bp[idx]  # [K, n]
    top = float(np.abs(sub).max())
    if top == 0:
        return []
    flat = np.argsort(-np.abs(sub), axis=None, kind="stable")[:MAX_CELLS]
    out = []
    for f in flat:
        i, p = divmod(int(f), sub.shape[1])
        v = float(sub[i, p])
        if abs(v) < MIN_CELL_SHARE * top:
            break
        out.append((int(idx[i]), p, v))
    return out


def circuit_positions_figure(disc: CircuitDiscovery) -> go.Figure:
    """The circuit's edges position by position on /graph's (position, layer) grid: edge
    u → v at position p (u's output at p, one term of v's input at p) goes from u at p up to
    v's query, key or value input at p (marker: triangle, square, diamond); colour: the sign
    of its score there, width: its size. Attention inside each head moves information
    between positions and is not an edge."""
    g, s = disc.scores.graph, disc.scores.scores
    L, H, mlp = g.n_layers, g.n_heads, g.has_mlp
    disp = disc.clean_display
    n = len(disp)
    cells = circuit_cells(disc)
    # one column per position that holds a drawn edge, in order (the others left out)
    busy = sorted({p for _, p, _ in cells})
    col = {p: float(i) for i, p in enumerate(busy)}

    def cx(node: str, p: int) -> float:
        return cell_x(node, p, H, mlp) - p + col[p]

    fig = go.Figure()
    starts, ends, vals, labels, comps = [], [], [], [], []
    for e, p, v in cells:
        snd = g.senders[g.src[e]]
        node, _, comp = g.receivers[g.dst[e]].partition(".")
        starts.append((cx(snd, p), node_row(snd, L)))
        ends.append((cx(node, p) + 0.1 * INPUT_OFFSET[comp] * 12 / (H + mlp),
                     node_row(node, L) - (0.22 if comp else 0.0)))
        vals.append(v)
        labels.append(f"{g.edge_label(e)} @ {p}")
        comps.append(comp)
    if cells:
        sa, ea, va = np.array(starts), np.array(ends), np.array(vals)
        vmax = float(np.abs(va).max()) or 1.0
        bins = np.minimum((np.abs(va) / vmax * 4).astype(int), 3)
        for sign, colour, label in ((1, POSITIVE, "raises m when ablated"),
                                    (-1, NEGATIVE, "lowers m when ablated")):
            shown = False
            for b in range(4):
                sel = np.nonzero((np.sign(va) == sign) & (bins == b))[0]
                if not len(sel):
                    continue
                nan = np.full(len(sel), np.nan)
                fig.add_scatter(x=np.column_stack([sa[sel, 0], ea[sel, 0], nan]).ravel(),
                                y=np.column_stack([sa[sel, 1], ea[sel, 1], nan]).ravel(),
                                mode="lines", hoverinfo="skip",
                                line=dict(color=colour, width=1 + 2 * b),
                                opacity=0.5 + 0.15 * b, name=label, legendgroup=label,
                                showlegend=not shown)
                shown = True
        for comp in ("q", "k", "v", ""):
            sel = [i for i, c in enumerate(comps) if c == comp]
            if not sel:
                continue
            fig.add_scatter(
                x=ea[sel, 0], y=ea[sel, 1], mode="markers", name=(
                    f"into a {INPUT_WORD[comp]}" if comp else "into an MLP or the logits"),
                marker=dict(size=8, symbol=INPUT_SYMBOL.get(comp, "circle-open"),
                            color=[POSITIVE if va[i] >= 0 else NEGATIVE for i in sel],
                            line=dict(color="#111111", width=0.5)),
                customdata=[labels[i] for i in sel],
                hovertext=[f"{esc(labels[i]).replace('-&gt;', '→')} ({esc(disp[cells[i][1]])})"
                           f": {vals[i]:+.4f}" for i in sel], hoverinfo="text")
    # the components at the positions where the drawn edges leave or enter them
    nodes: dict[tuple[str, int], float] = {}
    for (e, p, v) in cells:
        for name in (g.senders[g.src[e]], g.receivers[g.dst[e]].partition(".")[0]):
            nodes[(name, p)] = nodes.get((name, p), 0.0) + abs(v)
    heads = sorted(((name, p) for name, p in nodes if name.startswith("L")),
                   key=lambda t: (t[1], node_row(t[0], L), cell_x(t[0], t[1], H, mlp)))
    others = [(name, p) for name, p in nodes if not name.startswith("L")]
    if others:
        fig.add_scatter(x=[cx(a, p) for a, p in others],
                        y=[node_row(a, L) for a, p in others], mode="markers",
                        marker=dict(size=11, color=QUALITATIVE[7], symbol="square",
                                    line=dict(color="#111111", width=1)), showlegend=False,
                        hovertext=[f"{a} at {p} ({esc(disp[p])})" for a, p in others],
                        hoverinfo="text", name="inputs and outputs")
    if heads:
        fig.add_scatter(
            x=[cx(a, p) for a, p in heads], y=[node_row(a, L) for a, p in heads],
            mode="markers+text", name="heads (click: open on /attention)",
            text=[a for a, _ in heads], textfont=dict(size=10),
            textposition=["top center" if i % 2 == 0 else "bottom center"
                          for i in range(len(heads))],
            marker=dict(size=13, color=QUALITATIVE[1], line=dict(color="#111111", width=1)),
            customdata=[[int(a[1:].split("H")[0]), int(a.split("H")[1]), p] for a, p in heads],
            hovertext=[f"<b>{a}</b> at {p} ({esc(disp[p])}); click to open it on /attention"
                       for a, p in heads], hoverinfo="text", showlegend=False)
    rows = ["input", *[f"layer {layer}" for layer in range(L)], "logits"]
    faith = disc.faithfulness.get(disc.scores.ablation, float("nan"))
    how = _how(disc)
    title = (f"{METHOD_NAMES.get(disc.scores.method, disc.scores.method)} circuit: "
             f"{disc.n_kept} of {g.n_edges} edges ({how}, pruned to paths input → logits), "
             f"faithfulness {number(faith, '.2f')} under {disc.scores.ablation} ablation; "
             f"drawn per position: {len(cells)} edge-positions of at least "
             f"{MIN_CELL_SHARE:.0%} of the strongest")
    entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
    legend_room = 24 + 22 * -(-entries // 2)
    return _grid_layout(
        fig, 260 + 130 * (L + 1) + legend_room, title, rows, legend_room,
        dict(title=f"position: the {len(busy)} of {n} with a drawn edge<br>"
                   f"(heads across each, H0 left)",
             tickmode="array", tickvals=list(range(len(busy))),
             ticktext=[f"{p}: {esc(disp[p])}" for p in busy], tickangle=-50,
             range=[-0.6, max(len(busy), 1) - 0.4], gridcolor=GRID, zeroline=False))


def _grid_layout(fig: go.Figure, height: int, title: str, rows: list, legend_room: int,
                 xaxis: dict) -> go.Figure:
    """The circuit drawings' common layout: rows of components, legend below the axis."""
    fig.update_layout(
        template=TEMPLATE, height=height,
        title=dict(text=wrap_title(title, 90), font=dict(size=13)), xaxis=xaxis,
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows,
                   range=[-0.5, len(rows) - 0.3], gridcolor=GRID, zeroline=False),
        margin=dict(b=80 + legend_room),
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
        hovermode="closest")
    return finish(fig)


def circuit_components_figure(disc: CircuitDiscovery) -> go.Figure:
    """The circuit's edges (colour: sign of the score, width: its size) between the
    components they join; each edge ends under its receiver at the query (left), key
    (centre) or value (right) input."""
    g, s = disc.scores.graph, disc.scores.scores
    xy = node_xy(g.n_layers, g.n_heads, g.has_mlp)
    idx = np.nonzero(disc.kept)[0]
    fig = go.Figure()
    # every component, faint, so the grid reads as the model
    names = list(xy)
    fig.add_scatter(x=[xy[n][0] for n in names], y=[xy[n][1] for n in names], mode="markers",
                    marker=dict(size=8, color=GRID, line=dict(width=0)), hoverinfo="text",
                    hovertext=names, showlegend=False, name="components")
    if len(idx):
        smax = float(np.abs(s[idx]).max()) or 1.0
        bins = np.minimum((np.abs(s[idx]) / smax * 4).astype(int), 3)
        ends: list[tuple[float, float]] = []
        for e in idx:
            node, _, comp = g.receivers[g.dst[e]].partition(".")
            x, y = xy[node]
            ends.append((x + INPUT_OFFSET[comp], y - (0.18 if node != "logits" else 0.0)))
        ends_a = np.array(ends)
        starts = np.array([xy[g.senders[g.src[e]]] for e in idx])
        for sign, colour, label in ((1, POSITIVE, "raises m when ablated"),
                                    (-1, NEGATIVE, "lowers m when ablated")):
            shown = False
            for b in range(4):
                sel = np.nonzero((np.sign(s[idx]) == sign) & (bins == b))[0]
                if not len(sel):
                    continue
                xs = np.column_stack([starts[sel, 0], ends_a[sel, 0], np.full(len(sel), np.nan)])
                ys = np.column_stack([starts[sel, 1], ends_a[sel, 1], np.full(len(sel), np.nan)])
                fig.add_scatter(x=xs.ravel(), y=ys.ravel(), mode="lines", hoverinfo="skip",
                                line=dict(color=colour, width=1 + 2 * b), opacity=0.5 + 0.15 * b,
                                name=label, legendgroup=label, showlegend=not shown)
                shown = True
        mid = (starts + ends_a) / 2
        fig.add_scatter(x=mid[:, 0], y=mid[:, 1], mode="markers", showlegend=False,
                        marker=dict(size=6, color=[POSITIVE if s[e] >= 0 else NEGATIVE
                                                   for e in idx], opacity=0.8),
                        hovertext=[f"{esc(g.edge_label(e))}: {s[e]:+.4f}" for e in idx],
                        customdata=[g.edge_label(e) for e in idx],
                        hoverinfo="text", name="edges")
    used = disc.nodes()
    heads = [[int(n[1:].split("H")[0]), int(n.split("H")[1]), -1] if n.startswith("L") else None
             for n in used]
    fig.add_scatter(x=[xy[n][0] for n in used], y=[xy[n][1] for n in used], customdata=heads,
                    mode="markers+text", text=used, textposition="top center",
                    marker=dict(size=16, color=QUALITATIVE[1], symbol="circle",
                                line=dict(color="#111111", width=1)),
                    hoverinfo="text", hovertext=used, showlegend=False, name="circuit")
    faith = disc.faithfulness.get(disc.scores.ablation, float("nan"))
    title = (f"{METHOD_NAMES.get(disc.scores.method, disc.scores.method)} circuit: "
             f"{disc.n_kept} of {g.n_edges} edges ({_how(disc)}, pruned to paths "
             f"input → logits); faithfulness {number(faith, '.2f')} under "
             f"{disc.scores.ablation} ablation")
    cols = [f"H{h}" for h in range(g.n_heads)] + (["MLP"] if g.has_mlp else [])
    rows = ["input", *[f"layer {layer}" for layer in range(g.n_layers)], "logits"]
    entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
    legend_room = 24 + 22 * -(-entries // 2)
    return _grid_layout(
        fig, 260 + 120 * (g.n_layers + 1) + legend_room, title, rows, legend_room,
        dict(title="head (q ← left, k centre, v right →)", tickmode="array",
             tickvals=list(range(len(cols))), ticktext=cols, range=[-0.8, len(cols) - 0.2],
             gridcolor=GRID, zeroline=False))


def faithfulness_figure(curve: FaithfulnessCurve,
                        mark: Optional[tuple[int, dict[str, float], str]] = None) -> go.Figure:
    """Faithfulness against edges kept, per ablation, with the random circuits' 5–95 %
    band and mean; a dotted line at 80 %. ``mark``: (edges, {ablation: faithfulness}, name)
    of the page's circuit, drawn as stars."""
    fig = go.Figure()
    x = np.maximum(curve.sizes, 0).astype(float)
    for a, ablation in enumerate(curve.ablations):
        colour = ABLATION_COLOURS.get(ablation, QUALITATIVE[a % len(QUALITATIVE)])
        if curve.n_random:
            r = curve.random[a]
            lo, hi = np.percentile(r, 5, axis=1), np.percentile(r, 95, axis=1)
            fig.add_scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                            fill="toself", mode="lines", line=dict(width=0), opacity=0.2,
                            fillcolor=colour, hoverinfo="skip", legendgroup=ablation,
                            name=f"{ablation}: random 5–95 %")
            fig.add_scatter(x=x, y=r.mean(1), mode="lines", legendgroup=ablation,
                            line=dict(color=colour, dash="dash", width=1),
                            name=f"{ablation}: random mean",
                            hovertemplate="%{x} random edges: %{y:.3f}<extra></extra>")
        fig.add_scatter(x=x, y=curve.faithfulness[a], mode="lines+markers", legendgroup=ablation,
                        line=dict(color=colour, width=2.5), name=f"{ablation}: circuit",
                        customdata=curve.k,
                        hovertemplate="top %{customdata} → %{x} edges: %{y:.3f}<extra></extra>")
    if mark is not None and mark[0] > 0:
        edges, faith, name = mark
        shown = [a for a in curve.ablations if a in faith]
        fig.add_scatter(x=[edges] * len(shown), y=[faith[a] for a in shown],
                        mode="markers", name=name, customdata=shown,
                        marker=dict(symbol="star", size=15, line=dict(color="#111111", width=1),
                                    color=[ABLATION_COLOURS.get(a, QUALITATIVE[1])
                                           for a in shown]),
                        hovertemplate=f"{esc(name)} (%{{x}} edges), %{{customdata}}: "
                                      f"%{{y:.3f}}<extra></extra>")
    fig.add_hline(y=0.8, line=dict(dash="dot", color=QUALITATIVE[7]),
                  annotation_text="80 %", annotation_position="top left")
    reach = curve.edges_to_reach(0.8, curve.ablations[0])
    rand = curve.edges_to_reach(0.8, curve.ablations[0], random=True)
    title = (f"faithfulness (m(C) − m(∅)) / (m(full) − m(∅)) over edges kept; "
             f"{curve.ablations[0]}: 80 % at {reach if reach is not None else 'no size'} "
             f"edges, random at {rand if rand is not None else 'no size'}")
    # the legend below the axis title, in as many rows as a phone needs (two entries a row)
    entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
    legend_room = 24 + 22 * -(-entries // 2)
    fig.update_layout(template=TEMPLATE, height=460 + legend_room, title=wrap_title(title, 80),
                      xaxis=dict(title="edges in the circuit", type="log", dtick=1),
                      yaxis=dict(title="faithfulness", gridcolor=GRID),
                      margin=dict(b=80 + legend_room),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
                      hovermode="closest")
    return finish(fig)


def edge_scores_figure(disc: CircuitDiscovery, n: int = 30) -> go.Figure:
    """The ``n`` edges of largest |score| (kept ones marked)."""
    g, s = disc.scores.graph, disc.scores.scores
    order = np.argsort(-np.abs(s), kind="stable")[:n][::-1]
    labels = [esc(g.edge_label(e)).replace("->", "→") for e in order]
    colours = [QUALITATIVE[1] if disc.kept[e] else QUALITATIVE[7] for e in order]
    fig = go.Figure(go.Bar(x=s[order], y=labels, orientation="h", marker_color=colours,
                           hovertemplate="%{y}: %{x:+.4f}<extra></extra>"))
    what = {"eap": "EAP estimate", "eap_ig": f"EAP-IG ({disc.scores.steps} steps) estimate",
            "exact": "exact"}.get(disc.scores.method, disc.scores.method)
    fig.update_layout(template=TEMPLATE, height=max(320, 22 * len(order) + 140),
                      title=wrap_title(f"strongest edges: {what} of m(edge ablated) − m(clean) "
                                       f"({disc.scores.ablation}); coloured = in the circuit",
                                       70),
                      xaxis_title="score", yaxis=dict(type="category"))
    return finish(fig)
