"""/attribution: direct logit attribution of a token (or a logit difference) to every component."""

from __future__ import annotations

from typing import Any

import dash
import dash_bootstrap_components as dbc
from dash import Output, callback, html

from ..analysis.attribution import LogitAttribution, logit_attribution
from ..analysis.defaults import chosen_position
from ..app import registry
from ..components import page as P
from ..figures.attribution import attribution_components_figure, attribution_heads_figure
from ..figures.tokens import quoted

PAGE = "attribution"
dash.register_page(__name__, path="/attribution", order=5, name="Attribution",
                   title="Attribution · Attention Lens",
                   description="How much each head and component pushes a chosen token's "
                               "logit up or down.")

CONTROLS = {"target": P.TextParam(""), "contrast": P.TextParam(""), "pos": P.IntParam(None)}
CHOICE = f"{PAGE}-choice"

HELP = r"""
The final residual stream is a sum of components $x_L = \sum_k c_k$ (token embedding,
positional embedding, each head's output $z W_O$, each MLP, the biases). **Direct logit
attribution** for a target token $u$ is $\mathrm{attr}_k = c_k \cdot W_U[:, u]$ (for
LayerNorm models, centred and divided by the final LayerNorm scale of the real forward pass);
the attributions sum exactly to $\mathrm{logit}_u - b_U[u]$.

With a **contrast** token $u'$ the page explains the logit difference, using
$W_U[:, u] - W_U[:, u']$. Leave the target empty to explain **the token that actually comes
next** at position `pos` (the model's top prediction at the last position). Leave the
position empty and, on a prompt that repeats itself, the page explains a position in the
repeated part (where the model gained most from the earlier copy: induction at work);
otherwise the last position. A token pinned on the Tokens page carries over. "Direct" means
only the path straight to the unembedding: a head that matters through later heads shows
little here (try the Ablation page).
"""


def attribution(state: dict, query: dict) -> tuple[LogitAttribution, str]:
    """The attribution at the chosen position, and a sentence saying what is explained."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    where = chosen_position(fp, query["pos"])
    target = query["target"] or where.target_id
    result = logit_attribution(lm, fp, target=target, contrast=query["contrast"] or None,
                               position=where.position)
    follows = ("the token you typed" if query["target"] else
               "the token that actually comes next" if where.target_id is not None else
               "the model's top prediction")
    return result, (f"Explaining {quoted(result.target_display)} ({follows}) at "
                    f"{where.reason}.")


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Per-head heatmap and per-component bars."""
    result, _ = attribution(state, query)
    return [P.Panel("heads", attribution_heads_figure(result), result),
            P.Panel("components", attribution_components_figure(result), result)]


P.register_panels(PAGE, panels, CONTROLS)


def layout(**query: Any) -> html.Div:
    """Target, contrast and position from the URL; the two charts."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Direct logit attribution",
        description="Which heads write the predicted token straight into the output.",
        controls=[P.text_control(PAGE, "target", q["target"], "target token",
                                 placeholder="the actual next token"),
                  P.text_control(PAGE, "contrast", q["contrast"], "minus token",
                                 placeholder="optional"),
                  P.number_control(PAGE, "pos", q["pos"], "position",
                                   placeholder="auto (-1 = last)")],
        body=[html.P(id=CHOICE, className="al-choice"),
              dbc.Row([dbc.Col(P.graph(PAGE, "heads"), lg=5),
                       dbc.Col(P.graph(PAGE, "components"), lg=7)])],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["heads", "components"], [Output(CHOICE, "children")]),
          *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=3)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass, analyse, draw."""
    result, text = attribution(state, query)
    return attribution_heads_figure(result), attribution_components_figure(result), text
