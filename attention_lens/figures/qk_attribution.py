"""QK attribution figures: the query × key term heatmap, the per-dimension view, the row."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from .theme import DIVERGING, QUALITATIVE, TEMPLATE
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.qk_attribution import QKAttribution, QKRow


def component_name(label: str, kind: str, source: int, display: tuple[str, ...], pos: int
                   ) -> str:
    """A component as an axis label: "tok ' Potter'", "pos 7", "L0H2", "L0H2←'·and'"."""
    if kind == "embed":
        return f"tok {quoted(display[pos])}"
    if kind == "pos_embed":
        return f"pos {pos}"
    if kind == "head_src":
        return f"{label.split('←')[0]}←{source} {quoted(display[source])}"
    return esc(label)


def _cell_title(res: QKAttribution) -> str:
    q, k = res.query, res.key
    cell = (f"L{res.layer}H{res.head} at query {q} {quoted(res.display[q])} → key {k} "
            f"{quoted(res.display[k])}")
    if res.contrast_key is None:
        return f"{cell}: score {res.score:+.3f} (A = {res.pattern:.3f})"
    k2 = res.contrast_key
    return (f"{cell} minus key {k2} {quoted(res.display[k2])}: score difference "
            f"{res.score:+.3f}")


def qk_terms_figure(res: QKAttribution) -> go.Figure:
    """Heatmap of the terms Q_i · K_j / √d_head: query-side rows, key-side columns."""
    rows = [component_name(lab, kind, int(src), res.display, res.query)
            for lab, kind, src in zip(res.q_labels, res.q_kinds, res.q_sources)]
    cols = [component_name(lab, kind, int(src), res.display, res.key)
            for lab, kind, src in zip(res.k_labels, res.k_kinds, res.k_sources)]
    z = res.terms
    vmax = float(np.abs(z).max()) or 1.0
    hover = [[f"query: {r}<br>key: {c}<br>term: {z[i, j]:+.4f}" for j, c in enumerate(cols)]
             for i, r in enumerate(rows)]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, colorscale=DIVERGING, zmin=-vmax,
                               zmax=vmax, zmid=0, hovertext=hover, hoverinfo="text",
                               hoverongaps=False, colorbar=dict(title="term")))
    side = max(320, 15 * len(rows) + 160)
    fig.update_layout(template=TEMPLATE, title=dict(text=_cell_title(res), font=dict(size=14)),
                      height=min(side, 1100),
                      xaxis=dict(title="key-side component", type="category", tickangle=-60),
                      yaxis=dict(title="query-side component", type="category",
                                 autorange="reversed"))
    return finish(fig)


def qk_top_terms_figure(res: QKAttribution, n: int = 12) -> go.Figure:
    """The largest terms by magnitude as horizontal bars, each written out above its bar
    (over the plot's whole width, so the bars keep their length on a phone too)."""
    top = res.top_terms(n)
    labels = [esc(res.describe(i, j)).replace(" × ", " ×<br>") for i, j, _ in top][::-1]
    values = [v for _, _, v in top][::-1]
    colors = [QUALITATIVE[4] if v >= 0 else QUALITATIVE[5] for v in values]
    rows = list(range(len(values)))
    fig = go.Figure(go.Bar(x=values, y=rows, orientation="h", marker_color=colors, width=0.3,
                           customdata=labels,
                           hovertemplate="%{customdata}<br>%{x:+.4f}<extra></extra>"))
    for r, label in zip(rows, labels):
        fig.add_annotation(text=label, xref="paper", x=0, xanchor="left", y=r + 0.2,
                           yanchor="bottom", align="left", showarrow=False,
                           font=dict(size=11))
    fig.update_layout(template=TEMPLATE, height=150 + 56 * len(rows),
                      title=dict(text=f"Largest terms (of {res.terms.size}; they sum to "
                                      f"{res.total:+.3f})", font=dict(size=14)),
                      xaxis_title="term",
                      yaxis=dict(showticklabels=False, range=[-0.5, len(rows) - 0.1],
                                 zeroline=False, showgrid=False),
                      margin=dict(l=10))
    return finish(fig)


def qk_dims_figure(res: QKAttribution) -> go.Figure:
    """The neuron view: q_e k_e / √d_head over the head's dimensions (they sum to the score)."""
    e = np.arange(len(res.dims))
    colors = [QUALITATIVE[4] if v >= 0 else QUALITATIVE[5] for v in res.dims]
    fig = go.Figure(go.Bar(x=e, y=res.dims, marker_color=colors,
                           hovertemplate="dimension %{x}<br>q·k part %{y:+.4f}<extra></extra>"))
    what = "k" if res.contrast_key is None else "(k − k′)"
    fig.update_layout(template=TEMPLATE, height=320,
                      title=dict(text=f"Per dimension: q_e · {what}_e / √d_head (sum "
                                      f"{res.dims.sum():+.3f})", font=dict(size=14)),
                      xaxis_title="head dimension e", yaxis_title="contribution")
    return finish(fig)


def qk_row_figure(row: QKRow, n_groups: int = 6) -> go.Figure:
    """Every key of the query row: its score split into the largest key-side components."""
    per_key = row.terms.sum(1)  # [keys, Ck]: summed over query-side components
    strength = np.abs(per_key).sum(0)
    top = list(np.argsort(-strength, kind="stable")[:n_groups])
    keys = [f"{k}: {esc(row.display[k])}" for k in range(row.query + 1)]
    fig = go.Figure()
    for n, c in enumerate(top):
        fig.add_bar(x=keys, y=per_key[:, c], name=esc(row.k_labels[c]),
                    marker_color=QUALITATIVE[n % len(QUALITATIVE)],
                    hovertemplate="%{x}<br>" + esc(row.k_labels[c]) + ": %{y:+.3f}<extra></extra>")
    rest = np.delete(per_key, top, axis=1).sum(1) if per_key.shape[1] > len(top) else None
    if rest is not None:
        fig.add_bar(x=keys, y=rest, name="other", marker_color="#777777",
                    hovertemplate="%{x}<br>other: %{y:+.3f}<extra></extra>")
    fig.add_scatter(x=keys, y=row.scores, mode="markers", name="score",
                    marker=dict(color="#ffffff", size=6, symbol="diamond"),
                    hovertemplate="%{x}<br>score %{y:+.3f}<extra></extra>")
    # the legend below the key axis, in as many rows as a phone needs (about two a row):
    # the plot keeps its own height whatever the number of components
    entries = len(fig.data)
    legend_room = 24 + 22 * -(-entries // 2)
    fig.update_layout(template=TEMPLATE, barmode="relative", height=400 + legend_room,
                      title=dict(text=f"L{row.layer}H{row.head}, query {row.query} "
                                      f"{quoted(row.display[row.query])}: each key's score by "
                                      "key-side component", font=dict(size=14)),
                      xaxis=dict(title="key", type="category", tickangle=-60),
                      yaxis_title="score part",
                      margin=dict(b=140 + legend_room),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom",
                                  x=0))
    return finish(fig)
