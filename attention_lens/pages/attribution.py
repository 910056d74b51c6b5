"""/attribution: direct logit attribution of a token (or a logit difference) to every component."""

from __future__ import annotations

from typing import Any

import dash
import dash_bootstrap_components as dbc
from dash import callback, html

from ..analysis.attribution import logit_attribution
from ..app import registry
from ..components import page as P
from ..figures.attribution import attribution_components_figure, attribution_heads_figure

PAGE = "attribution"
dash.register_page(__name__, path="/attribution", order=5, name="Attribution",
                   title="Attribution · Attention Lens",
                   description="How much each head and component pushes a chosen token's "
                               "logit up or down.")

CONTROLS = {"target": P.TextParam(""), "contrast": P.TextParam(""), "pos": P.IntParam(-1)}

HELP = r"""
The final residual stream is a sum of components $x_L = \sum_k c_k$ (token embedding,
positional embedding, each head's output $z W_O$, each MLP, the biases). **Direct logit
attribution** for a target token $u$ is $\mathrm{attr}_k = c_k \cdot W_U[:, u]$ (for
LayerNorm models, centred and divided by the final LayerNorm scale of the real forward pass);
the attributions sum exactly to $\mathrm{logit}_u - b_U[u]$.

With a **contrast** token $u'$ the page explains the logit difference, using
$W_U[:, u] - W_U[:, u']$. Leave the target empty to explain the model's top prediction at
position `pos` (−1 = last; a token pinned on the Tokens page carries over). "Direct" means
only the path straight to the unembedding: a head that matters through later heads shows
little here (try the Ablation page).
"""


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Per-head heatmap and per-component bars."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    result = logit_attribution(lm, fp, target=query["target"] or None,
                               contrast=query["contrast"] or None, position=query["pos"])
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
                                 placeholder="top prediction"),
                  P.text_control(PAGE, "contrast", q["contrast"], "minus token",
                                 placeholder="optional"),
                  P.number_control(PAGE, "pos", q["pos"], "position",
                                   placeholder="-1 = last")],
        body=[dbc.Row([dbc.Col(P.graph(PAGE, "heads"), lg=5),
                       dbc.Col(P.graph(PAGE, "components"), lg=7)])],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["heads", "components"]), *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=2)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass, analyse, draw."""
    return P.figures_of(panels(state, query))
