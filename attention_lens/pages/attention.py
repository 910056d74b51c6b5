"""/attention: one head's pattern as a heatmap, every head as small multiples, entropy."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, State, callback, clientside_callback, html
from dash.exceptions import PreventUpdate

from ..analysis.attention import attention_pattern, attention_patterns
from ..analysis.defaults import COPY_MIN_ATTENTION, COPY_MIN_PROB, HeadChoice, strongest_head
from ..components import page as P
from ..components import shell
from ..components.controls import Int, parse_all
from ..figures.attention import attention_figure, attention_grid_figure, entropy_figure

PAGE = "attention"
RANK = f"{PAGE}-rank"
SCROLL = f"{PAGE}-scroll"
#: Models with more heads than this show the grid one layer (the selected head's) at a time.
GRID_MAX_HEADS = 48

HELP = r"""
A head's pattern is $A = \mathrm{softmax}\big(\mathrm{mask}(q k^\top / \sqrt{d_{head}})\big)$
with $q = x W_Q + b_Q$ and $k = x W_K + b_K$: row $i$ (the **query**) says how much token
$i$ reads from each earlier token $j$ (the **key**); rows sum to 1 and the upper triangle
is masked (a token cannot see the future). Hover reads "query ← key: weight".

With no layer and head in the link, the page opens on the head that shows what the
prompt shows: on a prompt that repeats itself, the strongest induction head on it (the
induction score averaged over the query rows that have an earlier copy, as on the
Induction page). Otherwise, when the model is confident of its next token
($p \ge P_MIN$), the head whose output at the last position has the largest direct logit
attribution to it (its output $\cdot\, W_U[:, t]$ through the final normalisation's
scale, as on the Attribution page): if the token occurs earlier in the prompt, among the
heads attending there to it with weight $\ge A_MIN$ (a copying head, e.g. a name mover);
else among all heads (on a fact such as "The capital of France is", the head writing the
answer, which often reads the subject). Otherwise the model card's strongest induction
head, else the strongest previous-token head on the prompt. The sentence under the title says which, and the
strongest heads by the same score are listed beside the figure.

The grid shows every head at once (rows: layers, columns: heads); **click a thumbnail**
to open it above (the grid outlines the head shown). A previous-token head lights up the
sub-diagonal $A_{i,i-1}$; an induction head, on a repeated phrase, attends to the token
*after* the earlier copy of the current token. Entropy $H_i = -\sum_j A_{ij}\ln A_{ij}$
per row, averaged over queries, is low for focused heads and $\ln(i+1)$ for uniform attention.
""".replace("P_MIN", f"{COPY_MIN_PROB:g}").replace("A_MIN", f"{COPY_MIN_ATTENTION:g}")

CONTROLS = [Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="layer",
                placeholder="auto"),
            Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head",
                placeholder="auto")]


def chosen_head(best: HeadChoice, query: dict) -> tuple[int, int]:
    """The head asked for; an empty box takes the head this prompt shows best."""
    layer = best.layer if query["layer"] is None else query["layer"]
    head = best.head if query["head"] is None else query["head"]
    return layer, head


def choice_text(best: HeadChoice, query: dict) -> str:
    """The sentence under the title: which head is shown and why."""
    if query["layer"] is not None and query["head"] is not None:
        return f"Showing L{query['layer']}H{query['head']}, the head you chose."
    layer, head = chosen_head(best, query)
    if (layer, head) == (best.layer, best.head):
        return f"Showing {best.reason}."
    return f"Showing L{layer}H{head} (the layer or head you chose)."


def ranking_panel(best: HeadChoice) -> Any:
    """The strongest heads by the score that chose the default, as links to each."""
    if not best.ranking:
        return None
    what = {"induction": "induction", "previous_token": "previous-token",
            "card": "previous-token", "first": "",
            "copying": "copying (direct logit attribution to the predicted token)",
            "writer": "writing (direct logit attribution to the predicted token)"
            }[best.kind]
    items = [html.Li([dbc.Button(f"L{la}H{h}", id={"type": RANK, "layer": la, "head": h},
                                 color="link", size="sm", n_clicks=0,
                                 className="al-rank-link", title=f"Show L{la}H{h}"),
                      html.Span(f"{score:.2f}", className="al-rank-score")])
             for la, h, score in best.ranking]
    return html.Div([html.Div(f"Strongest {what} heads on this prompt",
                              className="al-rank-title"),
                     html.Ol(items, className="al-rank-list")], className="al-rank")


def grid_layers(lm: Any, layer: int) -> Optional[list[int]]:
    """Rows of the all-heads grid: every layer, or the selected head's layer on big models."""
    if lm.cfg.n_layers * lm.cfg.n_heads <= GRID_MAX_HEADS:
        return None
    return [layer]


def panels(ctx: P.PageContext, query: dict) -> list[Any]:
    """Which head and why, its pattern, the grid of every head (the shown one outlined), the
    entropy per head; switching head leaves the entropy as drawn."""
    lm, fp = ctx.model, ctx.forward
    best = ctx.registry.per_prompt(fp, "strongest_head", lambda: strongest_head(lm, fp))
    layer, head = chosen_head(best, query)
    one = attention_pattern(lm, fp, layer=layer, head=head)
    every = ctx.registry.per_prompt(fp, "attention_patterns", lambda: attention_patterns(lm, fp))
    out = [P.Html("choice", choice_text(best, query)), P.Html("ranking", ranking_panel(best)),
           P.Panel("pattern", attention_figure(one), one),
           P.Panel("all-heads", attention_grid_figure(every, grid_layers(lm, layer),
                                                      selected=(layer, head)), every)]
    if ctx.only("layer", "head"):
        return out
    return out + [P.Panel("entropy", entropy_figure(every), {"entropy": every.entropy,
                                                             "display": every.display})]


P.register_page(
    __name__, path="/attention", order=3, name="Attention", title="Attention · Attention Lens",
    description="Attention pattern of any head, every head at a glance, and how focused each "
                "head is.",
    heading="Attention patterns",
    lead="Which earlier tokens each token reads from, head by head.",
    help_md=HELP, panels=panels, graphs=["pattern", "all-heads", "entropy"],
    extras=[("choice", "al-choice"), "ranking"], controls=CONTROLS,
    body=lambda parts: [parts["choice"],
                        dbc.Row([dbc.Col(parts["pattern"], lg=10),
                                 dbc.Col(parts["ranking"], lg=2)]),
                        html.Div(id=SCROLL, hidden=True),
                        dbc.Row([dbc.Col(parts["all-heads"], lg=8),
                                 dbc.Col(parts["entropy"], lg=4)])])


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
    lm = P.model(state["model"])
    row, head = divmod(int(point["curveNumber"]), lm.cfg.n_heads)
    query, _ = parse_all(CONTROLS, {"layer": layer, "head": None}, lm.cfg)
    if query["layer"] is None:
        fp = P.forward(state)
        query["layer"] = P.per_prompt(fp, "strongest_head",
                                      lambda: strongest_head(lm, fp)).layer
    layers = grid_layers(lm, query["layer"])
    return (row if layers is None else layers[row]), head
