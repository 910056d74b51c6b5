"""/predictions: the next token's top-k (bar chart and table) and the surprisal of every token."""

from __future__ import annotations

from typing import Any

import dash_bootstrap_components as dbc
from dash import html

from ..analysis.predictions import NEXT_TOKEN, TOKEN_PREDICTIONS
from ..components import page as P
from ..figures.predictions import next_token_figure, next_token_table, surprisal_figure
from ..figures.theme import number

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


def table(rows: list[dict[str, Any]]) -> dbc.Table:
    """The top-k as a table (token shown with visible whitespace)."""
    head = html.Thead(html.Tr([html.Th(c) for c in ("rank", "token", "id", "probability",
                                                     "logit")]))
    body = html.Tbody([html.Tr([html.Td(r["rank"]), html.Td(html.Code(r["display"])),
                                html.Td(r["token_id"]), html.Td(f"{r['probability']:.4f}"),
                                html.Td(number(r["logit"]))]) for r in rows])
    return dbc.Table([head, body], size="sm", striped=True, hover=True, responsive=True,
                     className="al-table")


def panels(ctx: P.PageContext, query: dict) -> list:
    """The top-k bars at the chosen position, its table, and the per-position surprisal."""
    top = ctx.run(NEXT_TOKEN, query)
    per_pos = ctx.run(TOKEN_PREDICTIONS, top_k=5)
    return [P.Panel("next-token", next_token_figure(top), top),
            P.Html("table", table(next_token_table(top))),
            P.Panel("surprisal", surprisal_figure(per_pos), per_pos)]


P.register_page(
    __name__, path="/predictions", order=1, name="Predictions",
    title="Predictions · Attention Lens",
    description="Top-k next tokens at a position; surprisal of every token.",
    heading="Next-token predictions",
    lead="What the model expects next after reading up to a position, and how surprised it "
         "was by each token of the prompt.",
    help_md=HELP, panels=panels, graphs=["next-token", "surprisal"], extras=["table"],
    analysis=NEXT_TOKEN,
    body=lambda parts: [dbc.Row([dbc.Col(parts["next-token"], lg=7),
                                 dbc.Col(parts["table"], lg=5)]),
                        parts["surprisal"]])
