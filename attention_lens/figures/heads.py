"""Head-detection figures: score grids, labels, strongest examples, composition heatmaps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import QUALITATIVE, SEQUENTIAL, TEMPLATE
from .tokens import esc

if TYPE_CHECKING:
    from ..analysis.composition import Composition
    from ..analysis.heads import HeadDetection

#: Colour of each head label (Okabe-Ito, colour-blind safe).
LABEL_COLOURS = {"induction": QUALITATIVE[5], "duplicate": QUALITATIVE[6],
                 "previous-token": QUALITATIVE[1], "self/diagonal": QUALITATIVE[3],
                 "copying": QUALITATIVE[2], "diffuse": QUALITATIVE[7], "other": "#444444"}
#: How the prompt scores were averaged, in a figure title.
ROWS_SHORT = {"target": "over rows with a target", "all": "over all rows (TransformerLens)"}
KIND_TITLES = {"previous_token": "previous-token", "duplicate_token": "duplicate-token",
               "induction": "induction", "self": "self"}


def score_grids(result: HeadDetection) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    """(title, [n_layers, n_heads] scores, colour range) of every grid, in display order."""
    lo = 0.0 if result.metric == "mul" else None
    grids = [(f"prompt: {KIND_TITLES[k]}", result.scores[k], (lo, 1.0))
             for k in ("previous_token", "duplicate_token", "induction")]
    grids += [("probe: induction", result.probe_induction, (0.0, 1.0)),
              ("probe: previous-token", result.probe_previous_token, (0.0, 1.0)),
              ("OV copying (full OV)", result.copying, (-1.0, 1.0))]
    return grids


def head_scores_figure(result: HeadDetection) -> go.Figure:
    """Layer × head grids of each score on the prompt and the probe, and OV copying."""
    grids = score_grids(result)
    L, H = result.probe_induction.shape
    # one grid a row (layers × heads strips): the values stay readable on a phone too
    n = len(grids)
    strip, gap = 26 * L + 24, 62  # px: a grid's height, the room for the next one's title
    height = n * strip + (n - 1) * gap + 150
    fig = make_subplots(rows=n, cols=1, subplot_titles=[g[0] for g in grids],
                        vertical_spacing=gap / (height - 150))
    x, y = [str(h) for h in range(H)], [str(la) for la in range(L)]
    text = "%{z:.2f}" if H <= 16 and L <= 12 else ""
    for i, (title, z, (zmin, zmax)) in enumerate(grids):
        fig.add_trace(go.Heatmap(
            z=z, x=x, y=y, name=title, coloraxis="coloraxis2" if i == n - 1 else "coloraxis",
            texttemplate=text, textfont=dict(size=9), hoverongaps=False,
            hovertemplate=f"{title}<br>layer %{{y}}, head %{{x}}: %{{z:.3f}}<extra></extra>",
        ), row=i + 1, col=1)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="head", title_standoff=2, row=n)
    fig.update_yaxes(type="category", autorange="reversed", title_text="layer")
    fig.update_annotations(font_size=11)
    fig.update_layout(
        template=TEMPLATE,
        title=(f"Head scores. Prompt: {result.metric}, "
               f"{ROWS_SHORT.get(getattr(result, 'rows', 'all'), '')}; probe: T = "
               f"{result.probe_settings.get('seq_len')}, batch "
               f"{result.probe_settings.get('batch')}, seed {result.probe_settings.get('seed')}"),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=0.0, cmax=1.0,
                       colorbar=dict(title="score", len=0.6, y=1.0, yanchor="top")),
        coloraxis2=dict(colorscale="RdBu_r", cmin=-1.0, cmax=1.0,
                        colorbar=dict(title="copying", len=0.25, y=0.0,
                                      yanchor="bottom")),
        height=height,
    )
    return fig


def head_labels_figure(result: HeadDetection, labels: Sequence[Sequence[str]],
                       source: str = "prompt") -> go.Figure:
    """Layer × head grid coloured and annotated by each head's label."""
    L, H = len(labels), len(labels[0]) if labels else 0
    names = list(LABEL_COLOURS)
    z = np.array([[names.index(lab) for lab in row] for row in labels], dtype=float)
    n = len(names)
    scale = []
    for i, name in enumerate(names):
        scale += [[i / n, LABEL_COLOURS[name]], [(i + 1) / n, LABEL_COLOURS[name]]]
    text = [[lab for lab in row] for row in labels]
    tags = [[", ".join(result.tags[la][h]) or "none" for h in range(H)] for la in range(L)]
    custom = np.stack([np.asarray(tags, dtype=object),
                       np.asarray(result.probe_induction.round(3), dtype=object),
                       np.asarray(result.copying.round(3), dtype=object)], -1)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(h) for h in range(H)], y=[str(la) for la in range(L)], text=text,
        texttemplate="%{text}" if H <= 16 else "", textfont=dict(size=9),
        zmin=-0.5, zmax=n - 0.5, colorscale=scale, showscale=False, customdata=custom,
        hovertemplate=("layer %{y}, head %{x}: %{text}<br>passes (prompt): %{customdata[0]}"
                       "<br>probe induction %{customdata[1]}, copying %{customdata[2]}"
                       "<extra></extra>"),
    ))
    for name in names:  # legend entries
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=10, color=LABEL_COLOURS[name],
                                             symbol="square"), hoverinfo="skip"))
    fig.update_layout(
        template=TEMPLATE, title=f"Head labels (pattern scores from the {source})",
        xaxis=dict(title="head", type="category"),
        yaxis=dict(title="layer", type="category", autorange="reversed"),
        # the legend sits at the bottom of the figure, below the head axis and its title
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0),
        margin=dict(b=120), height=max(330, 40 * L + 250),
    )
    return fig


def head_examples_figure(examples: Sequence[dict], layer: int, head: int,
                         kind: str) -> go.Figure:
    """The strongest "query ← key: weight" entries behind one head's score."""
    labels = [f"{e['query_pos']} '{esc(e['query'])}' ← {e['key_pos']} '{esc(e['key'])}'"
              for e in examples]
    weights = [e["weight"] for e in examples]
    fig = go.Figure(go.Bar(
        x=weights, y=labels, orientation="h", marker_color=QUALITATIVE[5],
        hovertemplate="query ← key %{y}: %{x:.3f}<extra></extra>",
    ))
    title = f"L{layer}H{head}: strongest {KIND_TITLES.get(kind, kind)} entries"
    if not examples:
        fig.add_annotation(text=f"no {KIND_TITLES.get(kind, kind)} targets in this prompt",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(
        template=TEMPLATE, title=title,
        xaxis=dict(title="attention weight", range=[0, 1]),
        yaxis=dict(type="category", autorange="reversed"),
        height=max(300, 26 * len(examples) + 140),
    )
    return fig


def composition_figure(result: Composition, kind: str, source_layer: Optional[int] = None,
                       note: Optional[str] = None) -> go.Figure:
    """Source heads (rows) × later heads (columns) composition scores, with the baseline."""
    s = result.scores(kind)
    L, H = s.shape[:2]
    base = result.baseline[kind]
    title = f"{kind}-composition (random baseline {base:.3f})"
    fig = go.Figure()
    if L < 2:
        fig.add_annotation(text=note or "one layer: no pairs of heads can compose",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_layout(template=TEMPLATE, title=title, xaxis=dict(visible=False),
                          yaxis=dict(visible=False), height=320)
        return fig
    src_layers = range(L - 1) if source_layer is None else [source_layer]
    tgt_layers = range(1 if source_layer is None else source_layer + 1, L)
    rows = [(la, h) for la in src_layers for h in range(H)]
    cols = [(la, h) for la in tgt_layers for h in range(H)]
    if source_layer is None and max(len(rows), len(cols)) > COMPOSITION_MAX_HEADS:
        return _composition_by_layer(s, kind, base, title)
    z = np.array([[s[l1, h1, l2, h2] for (l2, h2) in cols] for (l1, h1) in rows])
    ratio = z / base if base > 0 else np.full_like(z, np.nan)
    fig.add_trace(go.Heatmap(
        z=z, x=[f"L{la}H{h}" for la, h in cols], y=[f"L{la}H{h}" for la, h in rows],
        customdata=ratio, colorscale=SEQUENTIAL, hoverongaps=False,
        colorbar=dict(title="score"),
        hovertemplate=(f"%{{y}} → %{{x}}: {kind}-composition %{{z:.3f}} "
                       "(%{customdata:.1f}× baseline)<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE, title=title,
        xaxis=dict(title="later head (reads)", type="category", tickangle=-60,
                   nticks=min(len(cols), COMPOSITION_MAX_HEADS)),
        yaxis=dict(title="earlier head (writes)", type="category", autorange="reversed",
                   nticks=min(len(rows), COMPOSITION_MAX_HEADS)),
        height=max(380, 14 * min(len(rows), COMPOSITION_MAX_HEADS) + 200),
    )
    return fig


#: Above this many source or target heads, the all-layers view shows layer pairs (the
#: strongest head pair of each); one source layer at a time shows every head.
COMPOSITION_MAX_HEADS = 48


def _composition_by_layer(s: np.ndarray, kind: str, base: float, title: str) -> go.Figure:
    """Layer × later-layer grid of the strongest head pair's score, the pair in the hover."""
    L, H = s.shape[:2]
    z = np.full((L - 1, L - 1), np.nan)
    best = np.empty((L - 1, L - 1), dtype=object)
    best[...] = ""
    for l1 in range(L - 1):
        for l2 in range(l1 + 1, L):
            block = s[l1, :, l2, :]
            h1, h2 = np.unravel_index(int(np.nanargmax(block)), block.shape)
            z[l1, l2 - 1] = block[h1, h2]
            ratio = f" ({block[h1, h2] / base:.1f}× baseline)" if base > 0 else ""
            best[l1, l2 - 1] = f"L{l1}H{h1} → L{l2}H{h2}{ratio}"
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"L{la}" for la in range(1, L)], y=[f"L{la}" for la in range(L - 1)],
        customdata=best, colorscale=SEQUENTIAL, hoverongaps=False,
        colorbar=dict(title="max score"),
        hovertemplate=(f"%{{y}} → %{{x}}: strongest {kind}-composition %{{z:.3f}}<br>"
                       "%{customdata}<extra></extra>"),
    ))
    fig.update_layout(
        template=TEMPLATE,
        title=f"{title}<br>strongest head pair per pair of layers; choose a source "
              "layer to see every head",
        xaxis=dict(title="later layer (reads)", type="category"),
        yaxis=dict(title="earlier layer (writes)", type="category", autorange="reversed"),
        height=max(380, 30 * (L - 1) + 200),
    )
    return fig


# ------------------------------------------------------------------ data export
