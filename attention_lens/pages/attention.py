"""/attention: one head's pattern as a heatmap, every head as small multiples, entropy."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback
from dash.exceptions import PreventUpdate

from ..analysis.attention import attention_pattern, attention_patterns
from ..analysis.heads import card_induction_head
from ..components import page as P
from ..components import shell
from ..components.controls import Int, parse_all
from ..figures.attention import attention_figure, attention_grid_figure, entropy_figure

PAGE = "attention"
#: Models with more heads than this show the grid one layer (the selected head's) at a time.
GRID_MAX_HEADS = 48

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

CONTROLS = [Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="layer",
                placeholder="auto"),
            Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head",
                placeholder="strongest induction head")]


def chosen_head(lm: Any, query: dict) -> tuple[int, int]:
    """The head asked for; empty boxes take the card's strongest induction head (else 0)."""
    default = card_induction_head(lm) or (0, 0)
    layer = default[0] if query["layer"] is None else query["layer"]
    head = default[1] if query["head"] is None else query["head"]
    return layer, head


def grid_layers(lm: Any, query: dict) -> Optional[list[int]]:
    """Rows of the all-heads grid: every layer, or the selected head's layer on big models."""
    if lm.cfg.n_layers * lm.cfg.n_heads <= GRID_MAX_HEADS:
        return None
    return [chosen_head(lm, query)[0]]


def panels(ctx: P.PageContext, query: dict) -> list:
    """The chosen head, the grid of every head, and the entropy per head.

    Switching head keeps the grid (and on small models switching layer too).
    """
    lm, fp = ctx.model, ctx.forward
    layer, head = chosen_head(lm, query)
    one = attention_pattern(lm, fp, layer=layer, head=head)
    out = [P.Panel("pattern", attention_figure(one), one)]
    layers = grid_layers(lm, query)
    if ctx.only("head") or (layers is None and ctx.only("head", "layer")):
        return out
    every = attention_patterns(lm, fp)
    return out + [P.Panel("all-heads", attention_grid_figure(every, layers), every),
                  P.Panel("entropy", entropy_figure(every), {"entropy": every.entropy,
                                                             "display": every.display})]


P.register_page(
    __name__, path="/attention", order=3, name="Attention", title="Attention · Attention Lens",
    description="Attention pattern of any head, every head at a glance, and how focused each "
                "head is.",
    heading="Attention patterns",
    lead="Which earlier tokens each token reads from, head by head.",
    help_md=HELP, panels=panels, graphs=["pattern", "all-heads", "entropy"],
    controls=CONTROLS,
    body=lambda parts: [parts["pattern"],
                        dbc.Row([dbc.Col(parts["all-heads"], lg=8),
                                 dbc.Col(parts["entropy"], lg=4)])])


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
    lm = P.model(state["model"])
    row, head = divmod(int(point["curveNumber"]), lm.cfg.n_heads)
    query, _ = parse_all(CONTROLS, {"layer": layer, "head": None}, lm.cfg)
    layers = grid_layers(lm, query)
    return (row if layers is None else layers[row]), head
