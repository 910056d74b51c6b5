"""/tokens: the prompt coloured by the probability of each actual token; click pins a token."""

from __future__ import annotations

from typing import Any, Optional

import dash
from dash import Input, Output, State, callback, html, no_update
from dash.exceptions import PreventUpdate

from ..analysis.predictions import token_predictions
from ..app import registry
from ..components import page as P
from ..components import shell
from ..figures.tokens import cell_position, token_sequence_figure

PAGE = "tokens"
dash.register_page(__name__, path="/tokens", order=2, name="Tokens",
                   title="Tokens · Attention Lens",
                   description="The prompt token by token, coloured by how well the model "
                               "predicted each one; click a token to pin it.")

CONTROLS = {"k": P.IntParam(5, 1, 20), "per_row": P.IntParam(16, 4, 64)}
PINNED = f"{PAGE}-pinned"

HELP = r"""
Each cell is one token $t_i$ of the prompt (whitespace shown as `·` space, `↵` newline,
`→` tab), coloured by the probability the model gave it after reading everything before it:
$p(t_i \mid t_{<i}) = \mathrm{softmax}(x_{L,i-1} W_U + b_U)_{t_i}$.
Bright cells were expected; dark cells surprised the model. Hover shows the rank, the
surprisal $-\ln p$ in nats (the unit of surprisal and loss on every page) and the model's
top-$k$ alternatives.

**Click a token to pin it**: its position becomes the `pos` used by the other pages
(predictions, logit lens, attribution, ablation) when you follow the navbar links.
"""


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The coloured token grid."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    result = token_predictions(lm, fp, k=query["k"])
    pinned = state.get("pos")
    pinned = pinned + fp.n_tokens if isinstance(pinned, int) and pinned < 0 else pinned
    return [P.Panel("tokens", token_sequence_figure(result, per_row=query["per_row"],
                                                    pinned=pinned), result)]


P.register_panels(PAGE, panels, CONTROLS)


def pinned_text(state: Optional[dict]) -> str:
    """A sentence saying which position is pinned."""
    if not state or state.get("pos") is None:
        return "No token pinned: click one to pin it."
    try:
        fp = registry().forward(state["text"], state["model"])
        pos = int(state["pos"])
        tok = fp.display[pos] if -fp.n_tokens <= pos < fp.n_tokens else "?"
    except Exception:  # noqa: BLE001 - only a label
        tok = "?"
    return f"Pinned position {state['pos']} ('{tok}'): the other pages start from it."


def layout(**query: Any) -> html.Div:
    """Controls (``k``, ``per_row``) and the token grid."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Tokens",
        description="The prompt as the model reads it, coloured by p(token | tokens before).",
        controls=[P.number_control(PAGE, "k", q["k"], "alternatives", min=1, max=20),
                  P.number_control(PAGE, "per_row", q["per_row"], "tokens per row", min=4,
                                   max=64)],
        body=[html.P(id=PINNED, className="al-description"), P.graph(PAGE, "tokens")],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["tokens"], [Output(PINNED, "children")]),
          *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=2)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass, analyse, draw."""
    (grid,) = panels(state, query)
    return grid.figure, pinned_text(state)


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
    width, _ = CONTROLS["per_row"].parse("per_row", per_row)
    try:
        n = registry().forward(state["text"], state["model"]).n_tokens
    except Exception:  # noqa: BLE001 - a click on a stale figure pins nothing
        raise PreventUpdate from None
    pos = cell_position(point.get("x"), point.get("y"), width, n)
    if pos is None or pos == state.get("pos"):
        return no_update
    return {**state, "pos": pos, "src": "user"}
