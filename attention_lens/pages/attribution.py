"""/attribution: direct logit attribution of a token (or a logit difference) to every component."""

from __future__ import annotations

import dash_bootstrap_components as dbc

from ..analysis.attribution import logit_attribution
from ..components import page as P
from ..components.controls import Int, Text
from ..figures.attribution import attribution_components_figure, attribution_heads_figure

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


def panels(ctx: P.PageContext, query: dict) -> list:
    """Per-head heatmap and per-component bars."""
    result = logit_attribution(ctx.model, ctx.forward, target=query["target"] or None,
                               contrast=query["contrast"] or None, position=query["pos"])
    return [P.Panel("heads", attribution_heads_figure(result), result),
            P.Panel("components", attribution_components_figure(result), result)]


P.register_page(
    __name__, path="/attribution", order=5, name="Attribution",
    title="Attribution · Attention Lens",
    description="How much each head and component pushes a chosen token's logit up or down.",
    heading="Direct logit attribution",
    lead="Which heads write the predicted token straight into the output.",
    help_md=HELP, panels=panels, graphs=["heads", "components"],
    controls=[Text("target", "", label="target token", placeholder="top prediction"),
              Text("contrast", "", label="minus token", placeholder="optional"),
              Int("pos", -1, label="position", placeholder="-1 = last")],
    body=lambda parts: [dbc.Row([dbc.Col(parts["heads"], lg=5),
                                 dbc.Col(parts["components"], lg=7)])])
