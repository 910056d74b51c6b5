"""/attention: one head's pattern as a heatmap, every head as small multiples, entropy."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, html, no_update
from dash.exceptions import PreventUpdate

from ..analysis.attention import attention_pattern, attention_patterns
from ..analysis.errors import AnalysisError
from ..app import registry
from ..components import page as P
from ..components import shell
from ..figures.attention import attention_figure, attention_grid_figure, entropy_figure

PAGE = "attention"
dash.register_page(__name__, path="/attention", order=3, name="Attention",
                   title="Attention · Attention Lens",
                   description="Attention pattern of any head, every head at a glance, "
                               "and how focused each head is.")

CONTROLS = {"layer": P.IntParam(None, label="layer"), "head": P.IntParam(None, label="head")}
ALL_ALERTS = f"{PAGE}-grid-alerts"

HELP = r"""
A head's pattern is $A = \mathrm{softmax}\big(\mathrm{mask}(q k^\top / \sqrt{d_{head}})\big)$
with $q = x W_Q + b_Q$ and $k = x W_K + b_K$: row $i$ (the **query**) says how much token
$i$ reads from each earlier token $j$ (the **key**); rows sum to 1 and the upper triangle
is masked (a token cannot see the future). Hover reads "query ← key: weight".

The grid shows every head at once (rows: layers, columns: heads); **click a thumbnail**
to open it above. A previous-token head lights up the sub-diagonal $A_{i,i-1}$; an
induction head, on a repeated phrase, attends to the token *after* the earlier copy of
the current token. Entropy $H_i = -\sum_j A_{ij}\ln A_{ij}$ per row, averaged over
queries, is low for focused heads and $\ln(i+1)$ for uniform attention.
"""


def default_head(model: str) -> tuple[int, int]:
    """The head to show first: the card's strongest induction head, else L0H0."""
    probe = ((registry().get(model).card or {}).get("evaluation", {}) or {}).get(
        "induction_probe", {}) or {}
    if isinstance(probe.get("max_layer"), int) and isinstance(probe.get("max_head"), int):
        return probe["max_layer"], probe["max_head"]
    return 0, 0


def _resolve(state: dict, query: dict) -> tuple[int, int]:
    layer, head = query["layer"], query["head"]
    if layer is None or head is None:
        d_layer, d_head = default_head(state["model"])
        layer = d_layer if layer is None else layer
        head = d_head if head is None else head
    return layer, head


#: Models with more heads than this show the grid one layer (the selected head's) at a time.
GRID_MAX_HEADS = 48


def grid_layers(state: dict, query: dict) -> Optional[list[int]]:
    """Rows of the all-heads grid: every layer, or the selected head's layer on big models."""
    cfg = registry().get(state["model"]).cfg
    if cfg.n_layers * cfg.n_heads <= GRID_MAX_HEADS:
        return None
    layer = _resolve(state, query)[0]
    return [layer if 0 <= layer < cfg.n_layers else default_head(state["model"])[0]]


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The chosen head, the grid of every head, and the entropy per head."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    layer, head = _resolve(state, query)
    one = attention_pattern(lm, fp, layer=layer, head=head)
    every = attention_patterns(lm, fp)
    return [P.Panel("pattern", attention_figure(one), one),
            P.Panel("all-heads", attention_grid_figure(every, grid_layers(state, query)), every),
            P.Panel("entropy", entropy_figure(every), {"entropy": every.entropy,
                                                       "display": every.display})]


P.register_panels(PAGE, panels, CONTROLS)


def layout(**query: Any) -> html.Div:
    """Layer and head from the URL; the chosen head, then the grid and entropy."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Attention patterns",
        description="Which earlier tokens each token reads from, head by head.",
        controls=[P.number_control(PAGE, "layer", q["layer"], "layer", min=0,
                                   placeholder="auto"),
                  P.number_control(PAGE, "head", q["head"], "head", min=0,
                                   placeholder="strongest induction head")],
        body=[P.graph(PAGE, "pattern"),
              html.Div(id=ALL_ALERTS),
              dbc.Row([dbc.Col(P.graph(PAGE, "all-heads"), lg=8),
                       dbc.Col(P.graph(PAGE, "entropy"), lg=4)])],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["pattern"]), *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=1)
def update(state: dict, query: dict) -> tuple:
    """The chosen head only: switching head reuses the cached forward pass and the grid."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    layer, head = _resolve(state, query)
    return (attention_figure(attention_pattern(lm, fp, layer=layer, head=head)),)


@callback(Output(P.graph_id(PAGE, "all-heads"), "figure"),
          Output(P.graph_id(PAGE, "entropy"), "figure"), Output(ALL_ALERTS, "children"),
          Input(shell.STATE, "data"), Input(P.control_id(PAGE, "layer"), "value"))
def update_grid(state: Optional[dict], layer: Any = None) -> tuple:
    """Every head's pattern and entropy (redrawn when the prompt or model changes; on models
    with many heads also when the layer changes, as the grid then shows one layer)."""
    if not state:
        raise PreventUpdate
    try:
        lm = registry().get(state["model"])
        big = lm.cfg.n_layers * lm.cfg.n_heads > GRID_MAX_HEADS
        if not big and P.triggered_id() == P.control_id(PAGE, "layer"):
            raise PreventUpdate
        layers = None
        if big:
            q, _ = P.parse_query(CONTROLS, {"layer": layer})
            layers = grid_layers(state, q)
        every = attention_patterns(lm, registry().forward(state["text"], state["model"]))
        return attention_grid_figure(every, layers), entropy_figure(every), []
    except AnalysisError as exc:
        return no_update, no_update, shell.alert(str(exc))


@callback(Output(P.control_id(PAGE, "layer"), "value"),
          Output(P.control_id(PAGE, "head"), "value"),
          Input(P.graph_id(PAGE, "all-heads"), "clickData"),
          Input(P.graph_id(PAGE, "entropy"), "clickData"), State(shell.STATE, "data"),
          State(P.control_id(PAGE, "layer"), "value"), prevent_initial_call=True)
def select_head(grid_click: Optional[dict], entropy_click: Optional[dict],
                state: Optional[dict], layer: Any = None) -> tuple[int, int]:
    """Clicking a thumbnail (or an entropy cell) selects that head."""
    trigger = P.triggered_id()
    click = entropy_click if trigger == P.graph_id(PAGE, "entropy") else grid_click
    if not click or not state:
        raise PreventUpdate
    point = click["points"][0]
    if trigger == P.graph_id(PAGE, "entropy"):
        return int(str(point["y"]).lstrip("L")), int(str(point["x"]).lstrip("H"))
    cfg = registry().get(state["model"]).cfg
    row, head = divmod(int(point["curveNumber"]), cfg.n_heads)
    layers = grid_layers(state, P.parse_query(CONTROLS, {"layer": layer})[0])
    return (row if layers is None else layers[row]), head
