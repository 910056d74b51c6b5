"""/graph: the exact attribution graph of a target logit, pruned, on a (position, layer) grid."""

from __future__ import annotations

import json
from typing import Any, Optional

import dash_bootstrap_components as dbc
import plotly.graph_objects as go
from dash import Input, Output, State, callback, clientside_callback, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis import declare as D
from ..analysis.errors import AnalysisError
from ..analysis.graph import (
    GRAPH,
    MAX_EDGES,
    ExplainedGraph,
    GraphView,
    default_position,
    largest_position,
)
from ..components import page as P
from ..components import shell
from ..components.controls import Int, control_id
from ..figures.graph import graph_figure, graph_table

PAGE = "graph"
DETAIL, JSON_BTN, JSON_DL, JSON_STATUS = (f"{PAGE}-detail", f"{PAGE}-ct-json",
                                          f"{PAGE}-ct-download", f"{PAGE}-ct-status")

HELP = r"""
**The exact attribution graph.** Hold every attention pattern $A$ and every LayerNorm scale
$\sigma$ at its value on the prompt. The model is then linear in its sources: the tokens
(embedding + position), the bias terms and, where the model has them, each MLP's output
(an opaque source: what the MLP computes from its input is not followed). A head's output at
query $q$ is

$$\begin{aligned}\mathrm{out}_{l,h}(q) &= \textstyle\sum_{k \le q} A_{l,h}[q,k]\,
v(k)\, W_O,\\
v(k) &= J_{l,k}\big(\mathrm{resid}_l(k)\big)\, W_V,\\
J_{l,k}(x) &= (x - \bar x)/\sigma_{l,k} \odot w\end{aligned}$$

($J$ is the identity without LayerNorm); its constant parts $(b_V + b_{LN} W_V) W_O$ and
$b_O$ form the layer's **bias** node at $q$. The target is
$T = \mathrm{LN}_f(\mathrm{resid}(P)) \cdot d$ with $d = W_U[:,u]$ (minus $W_U[:,u']$ for a
logit difference). Expanding every residual stream into its sources writes $T - b_U$ as a
sum of paths token → head → … → logit. With $g(v) = \partial T / \partial \mathrm{out}(v)$
(patterns and scales frozen), **an edge** $u \to v$ carries
$(\text{part of } v\text{'s output due to } u) \cdot g(v)$: the sum of the contributions of
every path through it. So the edges into the logit add up to $\mathrm{logit} - b_U$ exactly
(no error term), and what flows into a node equals what flows out of it (the node's
**value**, its exact contribution to the target). The tests check both, and a forward pass
with one source removed changes the logit by exactly that source's value.

**Pruning** follows circuit-tracer: influence $= \sum_{n \ge 1} w \hat A^n$ on the adjacency
with absolute weights normalised over each node's inputs; keep the nodes that make up the
**node threshold** share of the total influence (tokens and the logit always), then the edges
that make up the **edge threshold** share of the edge influence, then drop nodes left
without outgoing (heads: or incoming) edges. At 100% nothing is pruned.

**Reading it.** Rows: tokens at the bottom, one row per layer, the logit on top; columns:
positions. Width: |edge|, colour: sign (blue +, red −); node size: |value|. Hover a node for
its value and top inputs and outputs; click a head to open its QK attribution (why it
attends where it does) or its OV read-out. "Graph JSON" downloads the pruned graph in
circuit-tracer's graph-file format (heads as feature nodes, biases and MLPs as error-type
nodes, tokens as embeddings, the target as the logit).
"""


class Share:
    """A share in percent (1 to 100) on a slider; the analysis reads it as a fraction."""

    def __init__(self, name: str, default: int, label: str = "") -> None:
        self.name, self.default, self.label = name, default, label

    def parse(self, raw: Any, cfg: Any = None) -> tuple[int, Optional[str]]:
        """Whole percent in [1, 100]; anything else becomes the default with a message."""
        if raw is None or raw == "":
            return self.default, None
        try:
            value = float(str(raw).strip())
        except (TypeError, ValueError):
            return self.default, f"{self.name} must be a percentage, got {str(raw)[:40]!r}"
        if not 0 < value <= 100:
            return self.default, (f"{self.name} must lie in (0, 100] percent (a share of the "
                                  f"total influence), got {str(raw)[:40]}")
        return max(1, int(round(value))), None

    def widget(self, page: str, value: Any, cfg: Any = None) -> html.Div:
        """A labelled slider from 1% to 100% (its value shown on the handle)."""
        return html.Div([
            html.Small(self.label or self.name, className="text-muted"),
            # the value above the handle, the marks below the track: neither covers the other
            html.Div(dcc.Slider(id=control_id(page, self.name), min=1, max=100, step=1,
                                value=value, marks={25: "25%", 50: "50%", 75: "75%"},
                                allow_direct_input=False, updatemode="mouseup",
                                tooltip={"placement": "top", "always_visible": True,
                                         "template": "{value}%"}),
                     style={"paddingTop": "1.9rem"})],
            className="al-control",  # room for the value shown right of a handle at 100%
            style={"minWidth": "14rem", "flex": "1 1 14rem", "paddingRight": "1.5rem"})


def view_of(ctx: P.PageContext, query: dict) -> tuple[ExplainedGraph, list[str]]:
    """The pruned graph for the page's query (a background job on big models)."""
    lm, fp = ctx.model, ctx.forward
    notes = []
    pos = query["pos"]  # the URL's pos: a token pinned on /tokens reaches this page too
    if pos is None:
        reach = largest_position(lm.cfg, fp.n_tokens)
        pos = ctx.registry.per_prompt(fp, ("graph-default-position", reach),
                                      lambda: default_position(fp, reach))
        notes.append(f"Position {pos} {fp.display[pos]!r}: where the model copies the next "
                     "token from earlier in the prompt most confidently (set a position to "
                     "explain another).")
        if reach < fp.n_tokens - 1:
            notes.append(f"Exact graphs of {lm.name} reach position {reach} here (at most "
                         f"{MAX_EDGES / 1e6:.1f} M edges); later positions are refused.")
    if not -fp.n_tokens <= pos < fp.n_tokens:
        raise AnalysisError(f"position {pos} is outside the prompt: it has {fp.n_tokens} tokens")
    return ctx.run(GRAPH, query, position=pos, truncate=True), notes


def drawn(ctx: P.PageContext, query: dict, explained: ExplainedGraph) -> tuple[go.Figure, dict]:
    """The graph's figure and its graph file, built once per prompt, position and query (a
    second visit only copies the figure: the page styles its figures in place)."""
    g = explained.view.graph
    key = ("graph-drawn", g.position, g.target_id, g.contrast_id,
           tuple(sorted((k, repr(v)) for k, v in query.items())))
    figure, data = ctx.registry.per_prompt(
        ctx.forward, key, lambda: (graph_figure(explained.view).to_dict(),
                                   explained.graph_file()))
    return go.Figure(figure), data


def panels(ctx: P.PageContext, query: dict) -> list:
    """The graph figure and the node table."""
    explained, notes = view_of(ctx, query)
    view = explained.view
    g = view.graph
    notes.append(
        f"Explaining the logit of {g.target_display!r}"
        + (f" minus {g.contrast_display!r}" if g.contrast_id is not None else
           " (the model's top prediction)" if not query["target"] else "")
        + f" at position {g.position} {g.display[g.position]!r} (p = {g.probability:.3f}). "
        f"All edges into it sum to logit − b_U = {g.logit - g.bias:+.4f}; the kept ones carry "
        f"{view.kept_target_share:.1%} of it.")
    figure, data = drawn(ctx, query, explained)
    return [P.Panel("graph", figure, data),
            P.Html("nodes", _node_table(view, ctx.state)),
            *[P.Notice(n) for n in notes]]


def head_links(state: dict, layer: int, head: int, pos: int) -> list[Any]:
    """Links from a head node to its QK attribution (at that query) and its OV read-out."""
    return [html.A("QK attribution", href=shell.page_href("/qk", state, layer=layer, head=head,
                                                query=pos)),
            " · ",
            html.A("OV read-out", href=shell.page_href("/weights", state, layer=layer, head=head))]


def _node_table(view: GraphView, state: dict) -> Any:
    rows = graph_table(view, n=30)
    head = html.Thead(html.Tr([html.Th(h) for h in ("node", "value", "influence", "")]))
    body = []
    for r in rows:
        links = head_links(state, r["layer"], r["head"], r["position"]) \
            if r["kind"] == "head" else []
        body.append(html.Tr([html.Td(r["node"]), html.Td(f"{r['value']:+.3f}"),
                             html.Td(f"{r['cumulative influence']:.2f}"),
                             html.Td(links, className="small")]))
    return html.Div([html.H6("Kept nodes by |value|"),
                     dbc.Table([head, html.Tbody(body)], size="sm", striped=True,
                               className="al-table")],
                    style={"maxHeight": "900px", "overflowY": "auto"})


P.register_page(
    __name__, path="/graph", name="Graph", order=13, heading="Attribution graph",
    description="How the prediction is built: every path from the prompt's tokens through "
                "the heads to the target logit, exactly, then pruned.",
    help_md=HELP, panels=panels, graphs=["graph"], extras=["nodes"],
    analysis=GRAPH,
    controls=["target", "contrast",
              Int("pos", None, -4096, lambda cfg: cfg.n_ctx - 1, label="position",
                  placeholder="last"),
              *[Share(p.url_name, p.percent, p.label) for p in GRAPH.params
                if isinstance(p, D.Share)]],
    body=lambda parts: [
        # a clicked node's details: beside the graph, above the table (scrolled into view)
        dbc.Row([dbc.Col(parts["graph"], lg=8),
                 dbc.Col([html.Div(id=DETAIL, className="small al-node-details"),
                          parts["nodes"]], lg=4)]),
        html.Div([dbc.Button("Graph JSON (circuit-tracer format)", id=JSON_BTN, size="sm",
                             color="secondary", outline=True, n_clicks=0),
                  html.Span(id=JSON_STATUS, className="ms-2 small"),
                  dcc.Download(id=JSON_DL)], className="mt-2")],
    title="Attribution graph · Attention Lens")


# ----------------------------------------------------------------- clicks and export
def node_detail(click: Optional[dict], state: Optional[dict]) -> Any:
    """What a click on a node shows: its hover text and, for a head, where to go next."""
    if not click or not click.get("points") or not state:
        raise PreventUpdate
    point = click["points"][0]
    custom = point.get("customdata")
    if not isinstance(custom, (list, tuple)) or len(custom) != 4:
        raise PreventUpdate  # an edge, or a browser that sent no customdata
    kind, layer, head, pos = str(custom[0]), int(custom[1]), int(custom[2]), int(custom[3])
    text = str(point.get("hovertext") or "").split("<br>")
    lines = [html.Div(t.replace("<b>", "").replace("</b>", "")) for t in text if t]
    if kind == "head":
        lines.append(html.Div(["Open: ", *head_links(state, layer, head, pos)]))
    return html.Div(lines, className="al-node-detail border rounded p-2 mt-2")


callback(Output(DETAIL, "children"), Input(P.graph_id(PAGE, "graph"), "clickData"),
         State(shell.STATE, "data"), prevent_initial_call=True)(node_detail)
# the details appear where the reader is looking: scrolled into view when off screen
clientside_callback(
    """function (children) {
        var el = document.getElementById('%s');
        if (el && children) { el.scrollIntoView({block: 'nearest', behavior: 'instant'}); }
        return window.dash_clientside.no_update;
    }""" % DETAIL,
    Output(DETAIL, "title"), Input(DETAIL, "children"), prevent_initial_call=True)


def g_slug(view: GraphView) -> str:
    """A file-name part naming the target: ``pos38-ang``."""
    g = view.graph
    word = "".join(ch for ch in g.target_display if ch.isalnum())[:20] or str(g.target_id)
    return f"pos{g.position}-{word}"


def graph_file(n_clicks: Optional[int], state: Optional[dict], query: Optional[dict]
               ) -> tuple[Any, Any]:
    """The pruned graph as a circuit-tracer graph file."""
    if not n_clicks or not state:
        raise PreventUpdate
    spec = P.spec_of(PAGE)
    try:
        ctx = P.PageContext(state)
        q, _ = spec.query({k: v for k, v in (query or {}).items() if k != P.SOURCE},
                          spec.config(state.get("model")))
        explained, _ = view_of(ctx, q)
        view, data = explained.view, explained.graph_file()
    except W.Missing:
        return no_update, shell.alert("The graph is still being built; try again when it is "
                                      "drawn.", color="warning")
    except AnalysisError as exc:
        return no_update, shell.alert(str(exc))
    name = f"attention-lens-graph-{ctx.model.name}-{g_slug(view)}.json"
    return dcc.send_string(json.dumps(data, ensure_ascii=False), name), ""


callback(Output(JSON_DL, "data"), Output(JSON_STATUS, "children"),
         Input(JSON_BTN, "n_clicks"), State(shell.STATE, "data"),
         State(P.query_id(PAGE), "data"), prevent_initial_call=True)(graph_file)
