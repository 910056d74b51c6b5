"""/qk: why a head attends from a query to a key, as query-component × key-component terms.

Clicking a cell of the attention pattern on /attention opens this page for that cell.
"""

from __future__ import annotations

from typing import Optional

import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, html
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis.errors import AnalysisError
from ..analysis.qk_attribution import QK_ATTRIBUTION, default_cell, strongest_head
from ..components import page as P
from ..components import shell
from ..components.controls import Choice, Int
from ..figures.qk_attribution import (
    qk_dims_figure,
    qk_row_figure,
    qk_terms_figure,
    qk_top_terms_figure,
)

PAGE = "qk"

HELP = r"""
**What it shows.** Head $h$ of layer $l$ attends from query $q$ to key $k$ because of its
pre-softmax score $s = q \cdot k / \sqrt{d_{head}}$. The residual stream the head reads at a
position is a sum of components $c_i$: the token embedding, the positional embedding, every
earlier head's output $z W_O$, every earlier layer's $b_O$ and MLP output. With the LayerNorm
scale $\sigma$ held at its value on the prompt, $\mathrm{LN}(x) = (x - \bar x)/\sigma \cdot w + b$
is linear in the components (centring is linear), so

$$\begin{aligned}s[q,k] &= \textstyle\sum_i \sum_j Q_i \cdot K_j / \sqrt{d_{head}},\\
Q_i &= \mathrm{LN}'(c_i(q))\, W_Q,\\ K_j &= \mathrm{LN}'(c_j(k))\, W_K\end{aligned}$$

plus the bias terms ($b W_Q + b_Q$ on the query side, $b W_K + b_K$ on the key side), which
appear as components of their own. Each cell of the heatmap is one term; the terms add up to
the model's `hook_attn_scores[q, k]` exactly (checked against TransformerLens in the tests).

**Reading it.** A large term "token at the query × output of L0H2 at the key" is
K-composition: an earlier head (here a previous-token head) wrote the *previous* token into
the key's residual stream, and the query's own token matches it: that is an induction head.
**Contrast key** $k'$ explains $s[q,k] - s[q,k']$ (why this key and not that one).
**Split by source** divides each earlier head's output by the position it read from
($A[p,j]\,(x_j W_V + b_V) W_O$ for each $j$). The **per-dimension** view shows
$q_e k_e / \sqrt{d_{head}}$ for each of the head's dimensions (bertviz's "neuron view"); the
**row** view splits every key's score of the query into key-side components.
See the maths reference on /graph for the attribution graph built on the same decomposition.
"""


def panels(ctx: P.PageContext, query: dict) -> list:
    """The term heatmap, the largest terms, the per-dimension view and the whole row."""
    lm, fp = ctx.model, ctx.forward
    notes = []
    layer, head = query["layer"], query["head"]
    if layer is None or head is None:
        probe = ctx.weight(W.probe_head_scores())
        d_layer, d_head = strongest_head(probe.induction)
        layer = d_layer if layer is None else layer
        head = d_head if head is None else head
        notes.append(f"Head L{layer}H{head}: the strongest induction head on the "
                     f"repeated-token probe (score {probe.induction[d_layer, d_head]:.2f}).")
    if not 0 <= layer < lm.cfg.n_layers or not 0 <= head < lm.cfg.n_heads:
        raise AnalysisError(f"head L{layer}H{head} does not exist: the model has "
                            f"{lm.cfg.n_layers} layer(s) of {lm.cfg.n_heads} heads")
    q, k = query["query"], query["key"]
    if q is None:
        q, dk = default_cell(fp, layer, head)
        k = dk if k is None else k
        notes.append(f"Query {q} {fp.display[q]!r} → key {k} {fp.display[k]!r}: the cell this "
                     "head attends most strongly (apart from itself and the first token).")
    elif k is None:
        if q >= fp.n_tokens:
            raise AnalysisError(f"query {q} is outside the prompt (positions 0 to "
                                f"{fp.n_tokens - 1})")
        k = int(fp.cache[f"blocks.{layer}.attn.hook_pattern"][head][q].argmax())
        notes.append(f"Key {k}: where query {q} attends most.")
    # the declared analysis (POST /api/qk-attribution): one cache entry for page and API
    cell = {"layer": layer, "head": head, "query": q, "truncate": bool(fp.truncated)}
    res = ctx.run(QK_ATTRIBUTION, {**cell, "key": k, "contrast_key": query["contrast"],
                                   "split_sources": query["split"] == "yes"})
    row = ctx.run(QK_ATTRIBUTION, {**cell, "row": True})
    notes.append(f"The {res.terms.size} terms sum to {res.total:+.5f}; the model's score is "
                 f"{res.score:+.5f} (difference {abs(res.total - res.score):.1e}).")
    top = [html.Li(f"{res.describe(i, j)} = {v:+.3f}") for i, j, v in res.top_terms(8)]
    links = html.Div([
        html.Ol(top, className="small"),
        html.A("This head's pattern on /attention",
               href=shell.page_href("/attention", ctx.state, layer=layer, head=head)),
    ])
    return [P.Panel("terms", qk_terms_figure(res), res),
            P.Panel("top", qk_top_terms_figure(res), {"terms": res.top_terms(40)}),
            P.Panel("dims", qk_dims_figure(res), {"dims": res.dims}),
            P.Panel("row", qk_row_figure(row), row),
            P.Html("words", links),
            *[P.Notice(n) for n in notes]]


P.register_page(
    __name__, path="/qk", name="QK attribution", order=11, heading="QK attribution",
    description="Why a head attends from one token to another: its score split into "
                "query-side × key-side component terms, exactly.",
    help_md=HELP, panels=panels, graphs=["terms", "top", "dims", "row"], extras=["words"],
    controls=[Int("layer", None, 0, lambda cfg: cfg.n_layers - 1, label="layer",
                  placeholder="auto"),
              Int("head", None, 0, lambda cfg: cfg.n_heads - 1, label="head",
                  placeholder="induction"),
              Int("query", None, 0, lambda cfg: cfg.n_ctx - 1, label="query",
                  placeholder="auto"),
              Int("key", None, 0, lambda cfg: cfg.n_ctx - 1, label="key", placeholder="auto"),
              Int("contrast", None, 0, lambda cfg: cfg.n_ctx - 1, label="contrast key",
                  placeholder="none"),
              Choice("split", "no", ("no", "yes"), label="split heads by source")],
    body=lambda parts: [dbc.Row([dbc.Col(parts["terms"], lg=7),
                                 dbc.Col([parts["top"], parts["words"]], lg=5)]),
                        dbc.Row([dbc.Col(parts["row"], lg=7), dbc.Col(parts["dims"], lg=5)])],
    title="QK attribution · Attention Lens")


# ------------------------------------------------- a click on /attention opens this page
def cell_href(click: Optional[dict], figure: Optional[dict], state: Optional[dict],
              query: Optional[dict] = None) -> str:
    """The /qk link of the attention-pattern cell a click landed on.

    The head is the attention page's chosen one (its query store), or, where that says
    "auto", the one the figure's heatmap carries in its ``meta`` (``{"layer", "head"}``).
    """
    if not click or not click.get("points") or not figure or not state:
        raise PreventUpdate
    point = click["points"][0]
    trace = (figure.get("data") or [{}])[0]
    meta = trace.get("meta") if isinstance(trace.get("meta"), dict) else {}
    chosen = [(query or {}).get(k) for k in ("layer", "head")]
    shown = [meta.get(k) for k in ("layer", "head")]
    if all(isinstance(v, int) for v in chosen):
        layer, head = chosen
    elif all(isinstance(v, int) for v in shown):
        layer, head = shown
    else:
        raise PreventUpdate
    number = point.get("pointNumber")
    if isinstance(number, (list, tuple)) and len(number) == 2:
        q, k = int(number[0]), int(number[1])
    else:
        try:
            q, k = list(trace["y"]).index(point["y"]), list(trace["x"]).index(point["x"])
        except (KeyError, ValueError, TypeError):
            raise PreventUpdate from None
    xs = trace.get("x")
    if k > q or (isinstance(xs, list) and len(xs) <= k):
        raise PreventUpdate  # the masked upper triangle, or a cell of a pooled pattern
    if isinstance(xs, list) and isinstance(trace.get("y"), list) and len(xs) != len(trace["y"]):
        raise PreventUpdate
    return shell.page_href("/qk", state, layer=layer, head=head, query=q, key=k)


callback(Output(shell.LOCATION, "href", allow_duplicate=True),
         Input(P.graph_id("attention", "pattern"), "clickData"),
         State(P.graph_id("attention", "pattern"), "figure"), State(shell.STATE, "data"),
         State(P.query_id("attention"), "data"), prevent_initial_call=True)(cell_href)
