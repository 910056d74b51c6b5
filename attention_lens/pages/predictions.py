"""/predictions: the next token's top-k (bar chart and table) and the surprisal of every token."""

from __future__ import annotations

from typing import Any

import dash
import dash_bootstrap_components as dbc
from dash import Output, callback, html

from ..analysis.predictions import next_token, token_predictions
from ..app import registry
from ..components import page as P
from ..figures.predictions import next_token_figure, next_token_table, surprisal_figure
from ..figures.theme import number

PAGE = "predictions"
dash.register_page(__name__, path="/predictions", order=1, name="Predictions",
                   title="Predictions · Attention Lens",
                   description="Top-k next tokens at a position; surprisal of every token.")

CONTROLS = {"k": P.IntParam(10, 1, 100), "pos": P.IntParam(-1)}
TABLE = f"{PAGE}-table"

HELP = r"""
The model reads the prompt up to position $i$ and outputs logits $\ell = x_{L} W_U + b_U$
over the vocabulary; the bars show the $k$ largest probabilities
$p(t) = \mathrm{softmax}(\ell)_t$ with their logits and ranks (1 = most likely).

The second chart shows, for every position $i$, the **surprisal** of the token that
actually came next: $-\ln p(t_{i+1} \mid t_{\le i})$ in nats (natural logarithm; every page
gives surprisal and loss in nats). Low bars on the repeated part
of a prompt are the signature of induction heads (copying what followed the previous
occurrence). Position $-1$ is the last token; pin a position on the Tokens page.
"""


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The top-k bars at the chosen position and the per-position surprisal."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    top = next_token(lm, fp, k=query["k"], position=query["pos"])
    per_pos = token_predictions(lm, fp, k=5)
    return [P.Panel("next-token", next_token_figure(top), top),
            P.Panel("surprisal", surprisal_figure(per_pos), per_pos)]


P.register_panels(PAGE, panels, CONTROLS)


def table(rows: list[dict[str, Any]]) -> dbc.Table:
    """The top-k as a table (token shown with visible whitespace)."""
    head = html.Thead(html.Tr([html.Th(c) for c in ("rank", "token", "id", "probability",
                                                     "logit")]))
    body = html.Tbody([html.Tr([html.Td(r["rank"]), html.Td(html.Code(r["display"])),
                                html.Td(r["token_id"]), html.Td(f"{r['probability']:.4f}"),
                                html.Td(number(r["logit"]))]) for r in rows])
    return dbc.Table([head, body], size="sm", striped=True, hover=True, responsive=True,
                     className="al-table")


def layout(**query: Any) -> html.Div:
    """Controls from the URL (``k``, ``pos``), the two charts and the table."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Next-token predictions",
        description="What the model expects next after reading up to a position, and how "
                    "surprised it was by each token of the prompt.",
        controls=[P.number_control(PAGE, "k", q["k"], "top k", min=1, max=100),
                  P.number_control(PAGE, "pos", q["pos"], "position", step=1,
                                   placeholder="-1 = last")],
        body=[dbc.Row([dbc.Col(P.graph(PAGE, "next-token"), lg=7),
                       dbc.Col(html.Div(id=TABLE), lg=5)]),
              P.graph(PAGE, "surprisal")],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["next-token", "surprisal"], [Output(TABLE, "children")]),
          *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=3)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass, analyse, draw."""
    top, surprisal = panels(state, query)
    return top.figure, surprisal.figure, table(next_token_table(top.data))
