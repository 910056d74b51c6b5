"""/tokens: the prompt coloured by the probability of each actual token; click pins a token."""

from __future__ import annotations

from typing import Any, Optional

from dash import Input, Output, State, callback, html, no_update
from dash.exceptions import PreventUpdate

from ..analysis.predictions import TOKEN_PREDICTIONS
from ..components import page as P
from ..components import shell
from ..components.controls import Int
from ..figures.tokens import cell_position, token_sequence_figure

PAGE = "tokens"
PER_ROW = Int("per_row", 16, 4, 64, label="tokens per row")
HELP = r"""
Each cell is one token $t_i$ of the prompt (whitespace shown as `·` space, `↵` newline,
`→` tab), coloured by the probability the model gave it after reading everything before it:
$p(t_i \mid t_{<i}) = \mathrm{softmax}(x_{L,i-1} W_U + b_U)_{t_i}$.
Bright cells were expected; dark cells surprised the model. Hover shows the rank, the
surprisal $-\ln p$ in nats (the unit of surprisal and loss on every page) and the model's
top-$k$ alternatives.

**Click a token to pin it**: its position becomes the `pos` used by the other pages
(predictions, logit lens, attribution, ablation, graph) when you follow the navbar links.
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
    fp = ctx.forward
    result = ctx.run(TOKEN_PREDICTIONS, top_k=query["k"])  # /predictions' entry too
    pinned = ctx.state.get("pos")
    pinned = pinned + fp.n_tokens if isinstance(pinned, int) and pinned < 0 else pinned
    return [P.Html("pinned", pinned_text(ctx)),
            P.Panel("tokens", token_sequence_figure(result, per_row=query["per_row"],
                                                    pinned=pinned), result)]


P.register_page(
    __name__, path="/tokens", order=2, name="Tokens", title="Tokens · Attention Lens",
    description="The prompt token by token, coloured by how well the model predicted each "
                "one; click a token to pin it.",
    heading="Tokens",
    lead="The prompt as the model reads it, coloured by p(token | tokens before).",
    help_md=HELP, panels=panels, graphs=["tokens"], extras=["pinned"],
    controls=[Int("k", 5, 1, 20, label="alternatives"), PER_ROW],
    body=lambda parts: [html.P(parts["pinned"], className="al-description"),
                        parts["tokens"]])


@callback(Output(shell.STATE, "data", allow_duplicate=True),
          Input(P.graph_id(PAGE, "tokens"), "clickData"), State(shell.STATE, "data"),
          State(P.control_id(PAGE, "per_row"), "value"), prevent_initial_call=True)
def pin(click: Optional[dict], state: Optional[dict], per_row: Any = None) -> Any:
    """Clicking a token pins its position in the shared state (and the URL).

    The position comes from the clicked cell's x (column) and y (row): that is what a
    browser's click event carries.
    """
    if not click or not state or not click.get("points"):
        raise PreventUpdate
    point = click["points"][0]
    width, _ = PER_ROW.parse(per_row)
    try:
        n = P.forward(state).n_tokens
    except Exception:  # noqa: BLE001 - a click on a stale figure pins nothing
        raise PreventUpdate from None
    pos = cell_position(point.get("x"), point.get("y"), width, n)
    if pos is None or pos == state.get("pos"):
        return no_update
    return {**state, "pos": pos, "src": "user"}
