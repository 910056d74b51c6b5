"""/weights: singular-value spectra of every head's OV (or QK) circuit and the tokens it reads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Output, callback, dcc, html

from ..analysis.circuits import CIRCUITS, CircuitSVD, check_head, circuit_svd
from ..analysis.errors import AnalysisError
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..figures.weights import singular_values_figure, svd_directions_figure, svd_norms_figure
from ..jobs import Need, cached_or_jobs

PAGE = "weights"
dash.register_page(__name__, path="/weights", order=5, name="Weights",
                   title="Weights · Attention Lens",
                   description="Singular values of each head's OV / QK circuit and the tokens "
                               "its top singular directions read and write.")

#: At most this many spectra are drawn at once (a model with 100+ heads is paged by layer).
MAX_LINES = 48
#: Most singular directions and tokens per direction in the table.
MAX_DIRECTIONS, MAX_TOP_K = 8, 30


class IntListParam:
    """A list of whole numbers (a multi-select; ``"0,2"`` in the URL); empty means all."""

    def parse(self, name: str, raw: Any) -> tuple[list[int], Optional[str]]:
        """The list of ints in ``raw`` (a list or comma-separated text), and a problem or None."""
        if raw is None or raw == "" or raw == []:
            return [], None
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        out: list[int] = []
        for item in items:
            try:
                out.append(int(str(item).strip()))
            except (TypeError, ValueError):
                return [], (f"{name} must be whole numbers separated by commas, "
                            f"got {str(raw)[:40]!r}")
        return sorted(set(out)), None


CONTROLS = {
    "circuit": P.ChoiceParam("OV", CIRCUITS),
    "layers": IntListParam(),
    "heads": IntListParam(),
    "scale": P.ChoiceParam("log", ("log", "linear")),
    "layer": P.IntParam(None, 0),
    "head": P.IntParam(None, 0),
    "dirs": P.IntParam(3, 1, MAX_DIRECTIONS),
    "k": P.IntParam(8, 1, MAX_TOP_K),
}
TABLE = f"{PAGE}-table"
NOTE = f"{PAGE}-note"

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


def _svd(model: str, circuit: str, dirs: int, k: int) -> CircuitSVD:
    """The circuit SVD of every head (computed once per model and circuit), cut to dirs x k."""
    (full,) = cached_or_jobs(registry(), model, [Need(
        ("circuit_svd", circuit, MAX_DIRECTIONS, MAX_TOP_K),
        lambda lm, report: circuit_svd(lm, circuit, min(MAX_DIRECTIONS, lm.cfg.d_head),
                                       min(MAX_TOP_K, lm.cfg.d_vocab), progress=report),
        f"{circuit} circuit SVD")])
    if dirs > full.input_ids.shape[2]:
        raise AnalysisError(f"at most {full.input_ids.shape[2]} directions (d_head of {model} "
                            f"is {full.singular_values.shape[2]})")
    k = min(k, full.input_ids.shape[3])

    def cut(a: np.ndarray) -> np.ndarray:
        return a[:, :, :dirs, :k]

    def cut_nested(t: list) -> list:
        return [[[d[:k] for d in h[:dirs]] for h in layer] for layer in t]

    return replace(full, input_ids=cut(full.input_ids), input_scores=cut(full.input_scores),
                   output_ids=cut(full.output_ids), output_scores=cut(full.output_scores),
                   input_tokens=cut_nested(full.input_tokens),
                   output_tokens=cut_nested(full.output_tokens))


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


def table_head(svd: Any, layer: Optional[int], head: Optional[int]) -> tuple[int, int]:
    """The head the direction table shows: the one asked for, else the largest σ_1."""
    if layer is None and head is None:
        flat = int(np.argmax(svd.singular_values[..., 0]))
        return divmod(flat, svd.n_heads)
    return (0 if layer is None else layer), (0 if head is None else head)


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Spectra of the selected heads, norms of every head, one head's singular directions."""
    lm = registry().get(state["model"])
    svd = _svd(lm.name, query["circuit"], query["dirs"], query["k"])
    heads, _ = selected_heads(svd.n_layers, svd.n_heads, query["layers"], query["heads"])
    layer, head = table_head(svd, query["layer"], query["head"])
    check_head(lm, layer, head)
    return [
        P.Panel("spectra", singular_values_figure(svd, heads, log=query["scale"] == "log"),
                {"circuit": svd.circuit, "notes": list(svd.notes),
                 "heads": [f"L{la}H{h}" for la, h in heads],
                 "singular_values": [svd.singular_values[la, h] for la, h in heads]}),
        P.Panel("norms", svd_norms_figure(svd), {"circuit": svd.circuit,
                                                 "frobenius": svd.frobenius,
                                                 "sigma_1": svd.singular_values[..., 0]}),
        P.Panel("directions", svd_directions_figure(svd, layer, head),
                _direction_rows(svd, layer, head)),
    ]


P.register_panels(PAGE, panels, CONTROLS)


def _direction_rows(svd: Any, layer: int, head: int) -> list[dict[str, Any]]:
    rows = []
    for d in range(svd.input_ids.shape[2]):
        rows.append({
            "direction": d + 1, "sigma": float(svd.singular_values[layer, head, d]),
            "input_tokens": list(svd.input_tokens[layer][head][d]),
            "input_scores": svd.input_scores[layer, head, d].tolist(),
            "output_tokens": list(svd.output_tokens[layer][head][d]),
            "output_scores": svd.output_scores[layer, head, d].tolist(),
        })
    return rows


def direction_table(svd: Any, layer: int, head: int) -> dbc.Table:
    """Top tokens of each singular direction of one head (whitespace shown as ·, ↵, →)."""
    rows = _direction_rows(svd, layer, head)

    def tokens(toks: list[str], scores: list[float]) -> list[Any]:
        return [html.Span([html.Code(t), html.Small(f" {s:.2f}")], className="me-2",
                          title=f"'{t}': {s:.4f}") for t, s in zip(toks, scores)]

    head_row = html.Thead(html.Tr([html.Th("i"), html.Th("σ_i"),
                                   html.Th(f"input: {svd.input_space}"),
                                   html.Th(f"output: {svd.output_space}")]))
    body = html.Tbody([html.Tr([
        html.Td(r["direction"]), html.Td(f"{r['sigma']:.3f}"),
        html.Td(tokens(r["input_tokens"], r["input_scores"])),
        html.Td(tokens(r["output_tokens"], r["output_scores"])),
    ]) for r in rows])
    return html.Div([
        html.H5(f"Layer {layer}, head {head}: top tokens of the {svd.circuit} circuit's "
                "singular directions"),
        dbc.Table([head_row, body], size="sm", striped=True, responsive=True,
                  className="al-table"),
    ])


def _multi(name: str, label: str, value: list[int], n: int, prefix: str) -> dbc.InputGroup:
    return dbc.InputGroup([
        dbc.InputGroupText(label),
        html.Div(dcc.Dropdown(id=P.control_id(PAGE, name), multi=True, value=value,
                              options=[{"label": f"{prefix}{i}", "value": i} for i in range(n)],
                              placeholder="all", className="al-dropdown"),
                 style={"minWidth": "12rem", "flex": "1 1 auto"}),
    ], size="sm", className="al-control")


def layout(**query: Any) -> html.Div:
    """Controls from the URL, the spectra, the norms heatmap and the direction table."""
    q, problems = P.parse_query(CONTROLS, query)
    try:
        cfg = registry().get(query.get("model") or registry().default).cfg
        n_layers, n_heads, d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
    except AnalysisError:
        n_layers, n_heads, d_head = 1, 1, MAX_DIRECTIONS
    if not q["layers"] and not q["heads"] and n_layers * n_heads > MAX_LINES:
        q["layers"] = [0]  # a big model starts on its first layer
    return P.page_layout(
        PAGE, "Weights: singular values of each head's circuits",
        description="How many directions each head uses, and which tokens its strongest "
                    "directions read and write. Weight-only: the prompt does not change it.",
        controls=[
            P.select_control(PAGE, "circuit", q["circuit"], CIRCUITS, "circuit"),
            _multi("layers", "layers", q["layers"], n_layers, "layer "),
            _multi("heads", "heads", q["heads"], n_heads, "head "),
            P.select_control(PAGE, "scale", q["scale"], ("log", "linear"), "y axis"),
            P.number_control(PAGE, "layer", q["layer"], "table layer", min=0,
                             max=n_layers - 1, placeholder="auto"),
            P.number_control(PAGE, "head", q["head"], "head", min=0, max=n_heads - 1,
                             placeholder="auto"),
            P.number_control(PAGE, "dirs", q["dirs"], "directions", min=1,
                             max=min(MAX_DIRECTIONS, d_head)),
            P.number_control(PAGE, "k", q["k"], "tokens", min=1, max=MAX_TOP_K),
        ],
        body=[JS.job_strip(PAGE), html.Div(id=NOTE),
              dbc.Row([dbc.Col(P.graph(PAGE, "spectra"), lg=8),
                       dbc.Col(P.graph(PAGE, "norms"), lg=4)]),
              dcc.Loading(html.Div(id=TABLE), type="dot", delay_show=150),
              P.graph(PAGE, "directions")],
        help_md=HELP, query=q, problems=problems)


OUTPUTS = P.main_outputs(PAGE, ["spectra", "norms", "directions"],
                          [Output(TABLE, "children"), Output(NOTE, "children"),
                           JS.job_output(PAGE)])


@callback(*OUTPUTS,
          *P.main_inputs(PAGE, CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=6)
@JS.in_background(5)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached circuit SVD (a background job on first visit), pick the heads, draw."""
    lm = registry().get(state["model"])
    spectra, norms, directions = panels(state, query)
    svd = _svd(lm.name, query["circuit"], query["dirs"], query["k"])
    _, note = selected_heads(svd.n_layers, svd.n_heads, query["layers"], query["heads"])
    layer, head = table_head(svd, query["layer"], query["head"])
    notes = [*svd.notes, *([note] if note else [])]
    return (spectra.figure, norms.figure, directions.figure, direction_table(svd, layer, head),
            [P.shell.alert(n, color="info") for n in notes] or None)


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))
