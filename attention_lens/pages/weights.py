"""/weights: singular-value spectra of every head's OV (or QK) circuit and the tokens it reads."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import dcc, html

from .. import weight_analyses as W
from ..analysis.checks import check_layer_head
from ..analysis.circuits import CIRCUITS, CircuitSVD
from ..analysis.errors import AnalysisError
from ..components import page as P
from ..components.controls import Choice, Int, IntList
from ..figures.weights import singular_values_figure, svd_directions_figure, svd_norms_figure

#: At most this many spectra are drawn at once (a model with 100+ heads is paged by layer).
MAX_LINES = 48

HELP = r"""
A head's **OV circuit** $W_{OV} = W_V W_O$ (what it writes, given what it attends to) and
**QK circuit** $W_{QK} = W_Q W_K^\top$ (where it attends) are $d_\text{model} \times
d_\text{model}$ matrices of rank at most $d_\text{head}$. Their singular values
$\sigma_1 \ge \sigma_2 \ge \dots$ (computed from the thin factors by QR, never the dense
matrix) show how many directions a head really uses: a steep drop means a low-rank,
specialised head. The heatmap gives $\lVert W \rVert_F = \sqrt{\sum_i \sigma_i^2}$ of every head.

**Reading a direction**: $W = \sum_i \sigma_i u_i v_i^\top$. For OV, the input side lists
tokens $t$ with the largest $W_E[t] \cdot u_i$ (what the head reads when it attends to
them) and the output side the tokens with the largest $(v_i W_U)_t$ (the logits it raises).
For QK, the input side is the query token ($W_E[t] \cdot u_i$) and the output side the key
token ($W_E[t] \cdot v_i$). Signs are fixed so the largest output score is positive.
Pick layers and heads to compare spectra (at most 48 lines at once); the table is for one
head (empty boxes: the head with the largest $\sigma_1$).
"""


def selected_heads(n_layers: int, n_heads: int, layers: list[int], heads: list[int]
                   ) -> tuple[list[tuple[int, int]], Optional[str]]:
    """(layer, head) pairs of the selection (empty = all), capped at MAX_LINES, and a note."""
    bad_l = [x for x in layers if not 0 <= x < n_layers]
    bad_h = [x for x in heads if not 0 <= x < n_heads]
    if bad_l:
        raise AnalysisError(f"layer {bad_l[0]} does not exist: the model has layers "
                            f"0-{n_layers - 1}")
    if bad_h:
        raise AnalysisError(f"head {bad_h[0]} does not exist: each layer has heads "
                            f"0-{n_heads - 1}")
    pairs = [(la, h) for la in (layers or range(n_layers)) for h in (heads or range(n_heads))]
    if len(pairs) > MAX_LINES:
        return pairs[:MAX_LINES], (f"Showing the first {MAX_LINES} of {len(pairs)} selected "
                                   "heads; pick layers or heads to see others.")
    return pairs, None


def _direction_rows(svd: CircuitSVD, layer: int, head: int) -> list[dict[str, Any]]:
    return [{"direction": d + 1, "sigma": float(svd.singular_values[layer, head, d]),
             "input_tokens": list(svd.input_tokens[layer][head][d]),
             "input_scores": svd.input_scores[layer, head, d].tolist(),
             "output_tokens": list(svd.output_tokens[layer][head][d]),
             "output_scores": svd.output_scores[layer, head, d].tolist()}
            for d in range(svd.input_ids.shape[2])]


def direction_table(svd: CircuitSVD, layer: int, head: int) -> html.Div:
    """Top tokens of each singular direction of one head (whitespace shown as ·, ↵, →)."""
    def tokens(toks: list[str], scores: list[float]) -> list[Any]:
        return [html.Span([html.Code(t), html.Small(f" {s:.2f}")], className="me-2",
                          title=f"'{t}': {s:.4f}") for t, s in zip(toks, scores)]

    head_row = html.Thead(html.Tr([html.Th("i"), html.Th("σᵢ"),
                                   html.Th(f"input: {svd.input_space}"),
                                   html.Th(f"output: {svd.output_space}")]))
    body = html.Tbody([html.Tr([
        html.Td(r["direction"]), html.Td(f"{r['sigma']:.3f}"),
        html.Td(tokens(r["input_tokens"], r["input_scores"])),
        html.Td(tokens(r["output_tokens"], r["output_scores"])),
    ]) for r in _direction_rows(svd, layer, head)])
    return html.Div([
        html.H5(f"Layer {layer}, head {head}: top tokens of the {svd.circuit} circuit's "
                "singular directions"),
        dbc.Table([head_row, body], size="sm", striped=True, responsive=True,
                  className="al-table"),
    ])


def panels(ctx: P.PageContext, query: dict) -> list:
    """Spectra of the selected heads, norms of every head, one head's singular directions."""
    lm = ctx.model
    svd = ctx.weight(W.circuit_svd(query["circuit"])).top(query["dirs"], query["k"])
    heads, note = selected_heads(svd.n_layers, svd.n_heads, query["layers"], query["heads"])
    if query["layer"] is None and query["head"] is None:
        layer, head = svd.strongest_head()
    else:
        layer, head = query["layer"] or 0, query["head"] or 0
    check_layer_head(lm, layer, head)
    return [
        *[P.Notice(n) for n in (*svd.notes, *([note] if note else []))],
        P.Panel("spectra", singular_values_figure(svd, heads, log=query["scale"] == "log"),
                {"circuit": svd.circuit, "notes": list(svd.notes),
                 "heads": [f"L{la}H{h}" for la, h in heads],
                 "singular_values": [svd.singular_values[la, h] for la, h in heads]}),
        P.Panel("norms", svd_norms_figure(svd), {"circuit": svd.circuit,
                                                 "frobenius": svd.frobenius,
                                                 "sigma_1": svd.singular_values[..., 0]}),
        P.Html("table", direction_table(svd, layer, head)),
        P.Panel("directions", svd_directions_figure(svd, layer, head),
                _direction_rows(svd, layer, head)),
    ]


def first_layer_on_big_models(query: dict, cfg: Any) -> dict:
    """A model with more than MAX_LINES heads starts on its first layer."""
    if not query["layers"] and not query["heads"] and cfg.n_layers * cfg.n_heads > MAX_LINES:
        return {**query, "layers": [0]}
    return query


P.register_page(
    __name__, path="/weights", order=7, name="Weights", title="Weights · Attention Lens",
    description="Singular values of each head's OV / QK circuit and the tokens its top "
                "singular directions read and write.",
    heading="Weights: singular values of each head's circuits",
    lead="How many directions each head uses, and which tokens its strongest directions read "
         "and write. Weight-only: the prompt does not change it.",
    help_md=HELP, panels=panels, graphs=["spectra", "norms", "directions"], extras=["table"],
    prepare=first_layer_on_big_models,
    controls=[
        Choice("circuit", "OV", CIRCUITS, label="circuit"),
        IntList("layers", lambda cfg: cfg.n_layers, label="layers", prefix="layer "),
        IntList("heads", lambda cfg: cfg.n_heads, label="heads", prefix="head "),
        Choice("scale", "log", ("log", "linear"), label="y axis"),
        Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="table layer",
            placeholder="auto"),
        Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head",
            placeholder="auto"),
        Int("dirs", 3, 1, hi=lambda cfg: min(W.SVD_DIRECTIONS, cfg.d_head),
            label="directions"),
        Int("k", 8, 1, W.SVD_TOP_K, label="tokens"),
    ],
    body=lambda parts: [dbc.Row([dbc.Col(parts["spectra"], lg=8),
                                 dbc.Col(parts["norms"], lg=4)]),
                        dcc.Loading(parts["table"], type="dot", delay_show=150),
                        parts["directions"]])
