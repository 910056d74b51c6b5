"""Comparison figures: two sides (A, B) and their differences, and in-context learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .attention import masked
from .theme import DIVERGING, QUALITATIVE, SEQUENTIAL, TEMPLATE, position_labels, unique_labels
from .tokens import esc, finish, quoted

if TYPE_CHECKING:
    from ..analysis.compare import Comparison, IclScore, LossByPosition

A_COLOUR, B_COLOUR, DIFF_COLOUR = QUALITATIVE[1], QUALITATIVE[0], QUALITATIVE[6]
#: Each figure's height (px): fixed, so a page can give its graph box the same height.
HEIGHTS = {"loss": 500, "predictions": 540, "attention": 440, "lens": 460, "dla": 660,
           "icl": 700}


def side_name(c: Comparison, which: str) -> str:
    """"A: model" or "A: prompt…" depending on what differs."""
    s = c.a if which == "A" else c.b
    if c.mode == "models":
        return f"{which}: {s.model}"
    text = s.text if len(s.text) <= 28 else s.text[:27] + "…"
    return f"{which}: {esc(text)}" + (f" ({s.model})" if c.mode == "both" else "")


#: Legend in a row of its own between the title and the plots (never over a title).
LEGEND_ABOVE = dict(orientation="h", yanchor="bottom", y=1.03, x=0, xanchor="left")


def _two_rows(title_top: str, title_bottom: str) -> go.Figure:
    """Two stacked panels: the sides (y axis titled ``title_top``) and B − A below."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=False, vertical_spacing=0.16,
                        subplot_titles=["", title_bottom], row_heights=[0.6, 0.4])
    fig.update_yaxes(title_text=title_top, row=1, col=1)
    return fig


def loss_compare_figure(c: Comparison) -> go.Figure:
    """Per-token loss of each side against position, and B − A on the shared positions."""
    fig = _two_rows("per-token loss (nats)", f"B − A (first {c.n_common} positions)")
    for s, name, colour in ((c.a, side_name(c, "A"), A_COLOUR), (c.b, side_name(c, "B"),
                                                                 B_COLOUR)):
        pos = np.arange(1, s.n_tokens)
        fig.add_trace(go.Scatter(
            x=pos, y=s.loss, mode="lines+markers", name=name, line=dict(color=colour),
            customdata=[esc(d) for d in s.display[1:]],
            hovertemplate=f"{esc(name)}<br>position %{{x}} '%{{customdata}}': "
                          "%{y:.3f} nats<extra></extra>"), row=1, col=1)
    pos = np.arange(1, c.n_common)
    fig.add_trace(go.Bar(x=pos, y=c.loss_diff, name="B − A", marker_color=DIFF_COLOUR,
                         hovertemplate="position %{x}: %{y:+.3f} nats<extra></extra>"),
                  row=2, col=1)
    fig.update_xaxes(title_text="position of the predicted token", row=2, col=1)
    fig.update_layout(template=TEMPLATE, height=HEIGHTS["loss"],
                      title=f"Loss: mean A {c.a.mean_loss:.3f}, B {c.b.mean_loss:.3f} nats",
                      legend=LEGEND_ABOVE, margin=dict(t=100))
    return finish(fig)


def predictions_compare_figure(c: Comparison) -> go.Figure:
    """Next-token probabilities of every token in either top-k, each side and B − A."""
    labels = unique_labels([quoted(d) for d in c.prob_display])
    fig = _two_rows("probability", "B − A")
    fig.add_trace(go.Bar(x=labels, y=c.prob_a, name=side_name(c, "A"), marker_color=A_COLOUR,
                         hovertemplate="%{x}: %{y:.4f}<extra>A</extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=c.prob_b, name=side_name(c, "B"), marker_color=B_COLOUR,
                         hovertemplate="%{x}: %{y:.4f}<extra>B</extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=c.prob_diff, name="B − A", marker_color=DIFF_COLOUR,
                         hovertemplate="%{x}: %{y:+.4f}<extra>B − A</extra>"), row=2, col=1)
    fig.update_xaxes(tickangle=-45, type="category")
    fig.update_layout(template=TEMPLATE, height=HEIGHTS["predictions"], barmode="group",
                      title=f"Next token after A's position {c.a.position}, B's {c.b.position}",
                      legend=LEGEND_ABOVE, margin=dict(t=100))
    return finish(fig)


def attention_compare_figure(c: Comparison) -> go.Figure:
    """The compared head's pattern on each side, and B − A when both have the same length."""
    panels = [(side_name(c, "A"), c.a), (side_name(c, "B"), c.b)]
    shown = [(t, s) for t, s in panels if s.pattern is not None]
    n = len(shown) + (c.pattern_diff is not None)
    fig = make_subplots(rows=1, cols=n, horizontal_spacing=0.08,
                        subplot_titles=[t for t, _ in shown]
                        + (["B − A"] if c.pattern_diff is not None else []))
    for i, (title, s) in enumerate(shown, 1):
        labels = position_labels(list(s.display))
        fig.add_trace(go.Heatmap(
            z=masked(s.pattern), x=labels, y=labels, coloraxis="coloraxis",
            hovertemplate="query %{y} ← key %{x}: %{z:.3f}<extra></extra>"), row=1, col=i)
    if c.pattern_diff is not None:
        labels = position_labels(list(c.a.display))
        fig.add_trace(go.Heatmap(
            z=masked(c.pattern_diff), x=labels, y=labels, coloraxis="coloraxis2",
            hovertemplate="query %{y} ← key %{x}: B − A %{z:+.3f}<extra></extra>"),
            row=1, col=n)
    fig.update_xaxes(type="category", showticklabels=False, title_text="key")
    fig.update_yaxes(type="category", autorange="reversed", showticklabels=False)
    fig.update_yaxes(title_text="query", col=1)
    fig.update_layout(
        template=TEMPLATE, height=HEIGHTS["attention"], title=f"Attention of L{c.layer}H{c.head}",
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=0, cmax=1,
                       colorbar=dict(title="A", x=1.0, len=0.45, y=0.78)),
        coloraxis2=dict(colorscale=DIVERGING, cmid=0,
                        colorbar=dict(title="B − A", x=1.0, len=0.45, y=0.22)))
    return fig


def lens_compare_figure(c: Comparison) -> go.Figure:
    """Probability of the target token after each layer (logit lens), each side and B − A."""
    fig = _two_rows(f"p({quoted(c.target_display)})", "B − A")
    for s, name, colour in ((c.a, side_name(c, "A"), A_COLOUR), (c.b, side_name(c, "B"),
                                                                 B_COLOUR)):
        stages = [lab.replace(" (final)", "") for lab in s.lens_labels]
        fig.add_trace(go.Scatter(x=stages, y=s.lens_probs, mode="lines+markers", name=name,
                                 line=dict(color=colour),
                                 hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=list(c.lens_labels), y=c.lens_diff, name="B − A",
                         marker_color=DIFF_COLOUR,
                         hovertemplate="%{x}: %{y:+.4f}<extra>B − A</extra>"), row=2, col=1)
    fig.update_xaxes(type="category")
    fig.update_layout(template=TEMPLATE, height=HEIGHTS["lens"], legend=LEGEND_ABOVE,
                      margin=dict(t=100),
                      title=f"Logit lens: p({quoted(c.target_display)}) after each layer")
    return finish(fig)


def dla_compare_figure(c: Comparison, top: int = 24) -> go.Figure:
    """Direct logit attribution of the target: the components that differ most, A, B, B − A."""
    order = np.argsort(-np.abs(c.dla_diff), kind="stable")[:top]
    labels = [c.dla_labels[i] for i in order]

    def values(s) -> list[float]:
        idx = {lab: i for i, lab in enumerate(s.dla_labels)}
        return [float(s.dla_values[idx[lab]]) for lab in labels]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        column_widths=[0.6, 0.4])
    fig.update_xaxes(title_text="attribution", col=1)
    fig.update_xaxes(title_text="B − A", col=2)
    fig.add_trace(go.Bar(y=labels, x=values(c.a), orientation="h", name=side_name(c, "A"),
                         marker_color=A_COLOUR, hovertemplate="%{y}: %{x:.3f}<extra>A</extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(y=labels, x=values(c.b), orientation="h", name=side_name(c, "B"),
                         marker_color=B_COLOUR, hovertemplate="%{y}: %{x:.3f}<extra>B</extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(y=labels, x=c.dla_diff[order], orientation="h", name="B − A",
                         marker_color=DIFF_COLOUR,
                         hovertemplate="%{y}: %{x:+.3f}<extra>B − A</extra>"), row=1, col=2)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(
        template=TEMPLATE, height=HEIGHTS["dla"], barmode="group",
        title=(f"Direct logit attribution of {quoted(c.target_display)} (logit A "
               f"{c.a.logit:.2f}, B {c.b.logit:.2f}); {len(labels)} largest differences"),
        legend=LEGEND_ABOVE, margin=dict(t=100))
    return finish(fig)


def icl_figure(dataset: Sequence[LossByPosition], probe: Sequence[LossByPosition],
               scores: Sequence[IclScore], probe_len: Optional[int] = None) -> go.Figure:
    """Loss against position for each model, over the dataset (left) and the probe (right).

    Dotted lines mark the in-context-learning score's early and late positions; the probe's
    repeat starts at ``probe_len``.
    """
    # one panel above the other: two long axis titles side by side collide on a phone
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.2)
    for row, label in ((1, "dataset windows"), (2, "the probe [r ; r]")):
        fig.update_xaxes(title_text=f"position ({label})", row=row, col=1)
    colours = [A_COLOUR, B_COLOUR, QUALITATIVE[2], QUALITATIVE[4]]
    for col, curves in ((1, dataset), (2, probe)):
        for i, curve in enumerate(curves):
            fig.add_trace(go.Scatter(
                x=curve.positions, y=curve.loss, mode="lines", name=curve.model,
                legendgroup=curve.model, showlegend=col == 1 or not dataset,
                line=dict(color=colours[i % len(colours)]),
                hovertemplate=f"{curve.model}<br>position %{{x}}: %{{y:.3f}} nats"
                              "<extra></extra>"), row=col, col=1)
    if scores:
        for x in (scores[0].early, scores[0].late):
            fig.add_vline(x=x, line=dict(dash="dot", color="#999999", width=1), row=1, col=1)
    if probe_len:
        fig.add_vline(x=probe_len, line=dict(dash="dot", color="#999999", width=1), row=2,
                      col=1)
    title = "In-context learning: loss against position"
    if scores:
        title += (f" (ICL score = loss at {scores[0].late} − loss at {scores[0].early}: "
                  + ", ".join(f"{s.model} {s.score:+.3f}" for s in scores) + " nats)")
    fig.update_yaxes(title_text="mean loss (nats)")
    fig.update_layout(template=TEMPLATE, height=HEIGHTS["icl"], title=title, legend=LEGEND_ABOVE,
                      margin=dict(t=120))
    return finish(fig)
