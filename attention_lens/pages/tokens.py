"""/tokens: the prompt coloured by the probability of each actual token; click pins a token."""

from __future__ import annotations

from typing import Any, Optional

from dash import Input, Output, State, callback, html, no_update
from dash.exceptions import PreventUpdate

from ..analysis.predictions import token_predictions
from ..components import page as P
from ..components import shell
from ..components.controls import Int
from ..figures.tokens import token_sequence_figure

PAGE = "tokens"
HELP = r"""
Each cell is one token $t_i$ of the prompt (whitespace shown as `·` space, `↵` newline,
`→` tab), coloured by the probability the model gave it after reading everything before it:
$p(t_i \mid t_{<i}) = \mathrm{softmax}(x_{L,i-1} W_U + b_U)_{t_i}$.
Bright cells were expected; dark cells surprised the model. Hover shows the rank, the
surprisal $-\log_2 p$ in bits and the model's top-$k$ alternatives.

**Click a token to pin it**: its position becomes the `pos` used by the other pages
(predictions, logit lens, attribution, ablation) when you follow the navbar links.
"""


def pinned_text(ctx: P.PageContext) -> str:
    """A sentence saying which position is pinned."""
    pos = ctx.state.get("pos")
    if pos is None:
        return "No token pinned: click one to pin it."
    fp = ctx.forward
    tok = fp.display[int(pos)] if -fp.n_tokens <= int(pos) < fp.n_tokens else "?"
    return f"Pinned position {pos} ('{tok}'): the other pages start from it."


def panels(ctx: P.PageContext, query: dict) -> list:
    """The coloured token grid and which position is pinned."""
    result = token_predictions(ctx.model, ctx.forward, k=query["k"])
    return [P.Html("pinned", pinned_text(ctx)),
            P.Panel("tokens", token_sequence_figure(result, per_row=query["per_row"]),
                    result)]


P.register_page(
    __name__, path="/tokens", order=2, name="Tokens", title="Tokens · Attention Lens",
    description="The prompt token by token, coloured by how well the model predicted each "
                "one; click a token to pin it.",
    heading="Tokens",
    lead="The prompt as the model reads it, coloured by p(token | tokens before).",
    help_md=HELP, panels=panels, graphs=["tokens"], extras=["pinned"],
    controls=[Int("k", 5, 1, 20, label="alternatives"),
              Int("per_row", 16, 4, 64, label="tokens per row")],
    body=lambda parts: [html.P(parts["pinned"], className="al-description"),
                        parts["tokens"]])


@callback(Output(shell.STATE, "data", allow_duplicate=True),
          Input(P.graph_id(PAGE, "tokens"), "clickData"), State(shell.STATE, "data"),
          prevent_initial_call=True)
def pin(click: Optional[dict], state: Optional[dict]) -> Any:
    """Clicking a token pins its position in the shared state (and the URL)."""
    if not click or not state:
        raise PreventUpdate
    try:
        pos = int(click["points"][0]["customdata"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise PreventUpdate from None
    if pos < 0 or pos == state.get("pos"):
        return no_update
    return {**state, "pos": pos, "src": "user"}
