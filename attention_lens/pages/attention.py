"""/attention: one head's pattern as a heatmap, every head as small multiples, entropy."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, State, callback, clientside_callback, html, no_update
from dash.exceptions import PreventUpdate

from ..analysis.attention import attention_pattern, attention_patterns
from ..analysis.defaults import HeadChoice, card_head, strongest_head
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
CHOICE = f"{PAGE}-choice"
RANKING = f"{PAGE}-ranking"
SCROLL = f"{PAGE}-scroll"
RANK = f"{PAGE}-rank"

HELP = r"""
A head's pattern is $A = \mathrm{softmax}\big(\mathrm{mask}(q k^\top / \sqrt{d_{head}})\big)$
with $q = x W_Q + b_Q$ and $k = x W_K + b_K$: row $i$ (the **query**) says how much token
$i$ reads from each earlier token $j$ (the **key**); rows sum to 1 and the upper triangle
is masked (a token cannot see the future). Hover reads "query ← key: weight".

With no layer and head in the link, the page opens on the head that shows what the
prompt shows: on a prompt that repeats itself, the strongest induction head on it (the
induction score averaged over the query rows that have an earlier copy, as on the
Induction page); otherwise the model card's strongest induction head. The sentence under
the title says which, and the strongest heads are listed beside the figure.

The grid shows every head at once (rows: layers, columns: heads); **click a thumbnail**
to open it above (the grid outlines the head shown). A previous-token head lights up the
sub-diagonal $A_{i,i-1}$; an induction head, on a repeated phrase, attends to the token
*after* the earlier copy of the current token. Entropy $H_i = -\sum_j A_{ij}\ln A_{ij}$
per row, averaged over queries, is low for focused heads and $\ln(i+1)$ for uniform attention.
"""


def default_head(model: str) -> tuple[int, int]:
    """The card's strongest induction head, else L0H0 (when no prompt is at hand)."""
    return card_head(registry().get(model)) or (0, 0)


def choice(state: dict) -> HeadChoice:
    """The head this prompt shows best, with the reason and the ranking."""
    lm = registry().get(state["model"])
    return strongest_head(lm, registry().forward(state["text"], state["model"]))


def _resolve(state: dict, query: dict) -> tuple[int, int]:
    layer, head = query["layer"], query["head"]
    if layer is None or head is None:
        best = choice(state)
        layer = best.layer if layer is None else layer
        head = best.head if head is None else head
    return layer, head


def choice_text(state: dict, query: dict) -> str:
    """The sentence under the title: which head is shown and why."""
    if query["layer"] is not None and query["head"] is not None:
        return f"Showing L{query['layer']}H{query['head']}, the head you chose."
    best = choice(state)
    layer, head = _resolve(state, query)
    if (layer, head) == (best.layer, best.head):
        return f"Showing {best.reason}."
    return f"Showing L{layer}H{head} (the layer or head you chose)."


def ranking_panel(state: dict) -> Any:
    """The strongest heads by the score that chose the default, as links to each."""
    best = choice(state)
    if not best.ranking:
        return None
    what = {"induction": "induction", "previous_token": "previous-token",
            "card": "previous-token", "first": ""}[best.kind]
    items = [html.Li([dbc.Button(f"L{la}H{h}", id={"type": RANK, "layer": la, "head": h},
                                 color="link", size="sm", n_clicks=0,
                                 className="al-rank-link", title=f"Show L{la}H{h}"),
                      html.Span(f"{score:.2f}", className="al-rank-score")])
             for la, h, score in best.ranking]
    return html.Div([html.Div(f"Strongest {what} heads on this prompt",
                              className="al-rank-title"),
                     html.Ol(items, className="al-rank-list")], className="al-rank")


#: Models with more heads than this show the grid one layer (the selected head's) at a time.
GRID_MAX_HEADS = 48


def grid_layers(state: dict, query: dict) -> Optional[list[int]]:
    """Rows of the all-heads grid: every layer, or the selected head's layer on big models."""
    cfg = registry().get(state["model"]).cfg
    if cfg.n_layers * cfg.n_heads <= GRID_MAX_HEADS:
        return None
    layer = _resolve(state, query)[0]
    return [layer if 0 <= layer < cfg.n_layers else choice(state).layer]


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The chosen head, the grid of every head, and the entropy per head."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    layer, head = _resolve(state, query)
    one = attention_pattern(lm, fp, layer=layer, head=head)
    every = attention_patterns(lm, fp)
    return [P.Panel("pattern", attention_figure(one), one),
            P.Panel("all-heads", attention_grid_figure(every, grid_layers(state, query),
                                                       selected=(layer, head)), every),
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
        body=[html.P(id=CHOICE, className="al-choice"),
              dbc.Row([dbc.Col(P.graph(PAGE, "pattern"), lg=10),
                       dbc.Col(html.Div(id=RANKING), lg=2)]),
              html.Div(id=SCROLL, hidden=True),
              html.Div(id=ALL_ALERTS),
              dbc.Row([dbc.Col(P.graph(PAGE, "all-heads"), lg=8),
                       dbc.Col(P.graph(PAGE, "entropy"), lg=4)])],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["pattern"], [Output(CHOICE, "children"),
                                              Output(RANKING, "children")]),
          *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=3)
def update(state: dict, query: dict) -> tuple:
    """The chosen head only: switching head reuses the cached forward pass and the grid."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    layer, head = _resolve(state, query)
    return (attention_figure(attention_pattern(lm, fp, layer=layer, head=head)),
            choice_text(state, query), ranking_panel(state))


@callback(Output(P.graph_id(PAGE, "all-heads"), "figure"),
          Output(P.graph_id(PAGE, "entropy"), "figure"), Output(ALL_ALERTS, "children"),
          Input(shell.STATE, "data"), Input(P.control_id(PAGE, "layer"), "value"),
          Input(P.control_id(PAGE, "head"), "value"))
def update_grid(state: Optional[dict], layer: Any = None, head: Any = None) -> tuple:
    """Every head's pattern, the shown head outlined, and every head's entropy."""
    if not state:
        raise PreventUpdate
    try:
        lm = registry().get(state["model"])
        q, _ = P.parse_query(CONTROLS, {"layer": layer, "head": head})
        big = lm.cfg.n_layers * lm.cfg.n_heads > GRID_MAX_HEADS
        layers = grid_layers(state, q) if big else None
        every = attention_patterns(lm, registry().forward(state["text"], state["model"]))
        grid = attention_grid_figure(every, layers, selected=_resolve(state, q))
        if P.triggered_id() in (P.control_id(PAGE, "layer"), P.control_id(PAGE, "head")):
            return (*P.themed((grid,), state), no_update, [])
        return (*P.themed((grid, entropy_figure(every)), state), [])
    except AnalysisError as exc:
        return no_update, no_update, shell.alert(str(exc))


# A click on a thumbnail brings the main figure into view (it sits above the grid).
clientside_callback(
    """
    function(grid, entropy) {
        const el = document.getElementById('attention-choice');
        if (el && el.scrollIntoView) { el.scrollIntoView({block: 'start'}); }
        return Date.now();
    }
    """,
    Output(SCROLL, "children"),
    Input(P.graph_id(PAGE, "all-heads"), "clickData"),
    Input(P.graph_id(PAGE, "entropy"), "clickData"), prevent_initial_call=True)


@callback(Output(P.control_id(PAGE, "layer"), "value"),
          Output(P.control_id(PAGE, "head"), "value"),
          Input(P.graph_id(PAGE, "all-heads"), "clickData"),
          Input(P.graph_id(PAGE, "entropy"), "clickData"), State(shell.STATE, "data"),
          State(P.control_id(PAGE, "layer"), "value"),
          Input({"type": RANK, "layer": ALL, "head": ALL}, "n_clicks"),
          prevent_initial_call=True)
def select_head(grid_click: Optional[dict], entropy_click: Optional[dict],
                state: Optional[dict], layer: Any = None,
                rank_clicks: Optional[list] = None) -> tuple[int, int]:
    """Clicking a thumbnail, an entropy cell or a ranked head selects that head."""
    trigger = P.triggered_id()
    if isinstance(trigger, dict) and trigger.get("type") == RANK:
        if not any(rank_clicks or []):
            raise PreventUpdate
        return int(trigger["layer"]), int(trigger["head"])
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
