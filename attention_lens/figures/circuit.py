"""The circuit on a layer × component grid, its faithfulness curve beside random circuits,
and its strongest edges."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def circuit_figure(disc: CircuitDiscovery) -> go.Figure:
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
                        hoverinfo="text", name="edges")
    used = disc.nodes()
    fig.add_scatter(x=[xy[n][0] for n in used], y=[xy[n][1] for n in used],
                    mode="markers+text", text=used, textposition="top center",
                    marker=dict(size=16, color=QUALITATIVE[1], symbol="circle",
                                line=dict(color="#111111", width=1)),
                    hoverinfo="text", hovertext=used, showlegend=False, name="circuit")
    faith = disc.faithfulness.get(disc.scores.ablation, float("nan"))
    title = (f"{METHOD_NAMES.get(disc.scores.method, disc.scores.method)} circuit: "
             f"{disc.n_kept} of {g.n_edges} edges (top {disc.k} by |score|, pruned to paths "
             f"input → logits); faithfulness {number(faith, '.2f')} under "
             f"{disc.scores.ablation} ablation")
    cols = [f"H{h}" for h in range(g.n_heads)] + (["MLP"] if g.has_mlp else [])
    rows = ["input", *[f"layer {layer}" for layer in range(g.n_layers)], "logits"]
    entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
    legend_room = 24 + 22 * -(-entries // 2)
    fig.update_layout(
        template=TEMPLATE, height=260 + 120 * (g.n_layers + 1) + legend_room,
        title=dict(text=wrap_title(title, 90), font=dict(size=13)),
        xaxis=dict(title="head (q ← left, k centre, v right →)", tickmode="array",
                   tickvals=list(range(len(cols))), ticktext=cols, range=[-0.8, len(cols) - 0.2],
                   gridcolor=GRID, zeroline=False),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows,
                   range=[-0.5, len(rows) - 0.3], gridcolor=GRID, zeroline=False),
        margin=dict(b=80 + legend_room),
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
        hovermode="closest")
    return finish(fig)


def faithfulness_figure(curve: FaithfulnessCurve) -> go.Figure:
    """Faithfulness against edges kept, per ablation, with the random circuits' 5–95 %
    band and mean; a dotted line at 80 %."""
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
