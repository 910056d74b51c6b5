"""/attribution: direct logit attribution of a token (or a logit difference) to every component."""

from __future__ import annotations

from typing import Any

import dash_bootstrap_components as dbc

from ..analysis.attribution import ATTRIBUTION
from ..analysis.defaults import chosen_position
from ..components import page as P
from ..figures.attribution import attribution_components_figure, attribution_heads_figure
from ..figures.tokens import quoted

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


def panels(ctx: P.PageContext, query: dict) -> list[Any]:
    """What is explained where, the per-head heatmap and the per-component bars."""
    fp = ctx.forward
    where = chosen_position(fp, query["pos"])
    target = query["target"] or where.target_id
    result = ctx.run(ATTRIBUTION, query, target=target, position=where.position)
    follows = ("the token you typed" if query["target"] else
               "the token that actually comes next" if where.target_id is not None else
               "the model's top prediction")
    return [P.Html("choice", f"Explaining {quoted(result.target_display)} ({follows}) at "
                             f"{where.reason}."),
            P.Panel("heads", attribution_heads_figure(result), result),
            P.Panel("components", attribution_components_figure(result), result)]


P.register_page(
    __name__, path="/attribution", order=6, name="Attribution",
    title="Attribution · Attention Lens",
    description="How much each head and component pushes a chosen token's logit up or down.",
    heading="Direct logit attribution",
    lead="Which heads write the predicted token straight into the output.",
    help_md=HELP, panels=panels, graphs=["heads", "components"],
    extras=[("choice", "al-choice")],
    analysis=ATTRIBUTION,
    body=lambda parts: [parts["choice"],
                        dbc.Row([dbc.Col(parts["heads"], lg=5),
                                 dbc.Col(parts["components"], lg=7)])])
