"""/logit-lens: what the residual stream would predict at every stage and position."""

from __future__ import annotations

from typing import Any

import dash
from dash import callback, html

from ..analysis.defaults import chosen_position
from ..analysis.logit_lens import is_large, lens_key, logit_lens
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..figures.logit_lens import logit_lens_figure, logit_lens_target_figure
from ..jobs import Need, cached_or_jobs

PAGE = "logit-lens"
dash.register_page(__name__, path="/logit-lens", order=4, name="Logit lens",
                   title="Logit lens · Attention Lens",
                   description="Top tokens read off the residual stream after every "
                               "layer, and a target token's trajectory.")

CONTROLS = {
    "k": P.IntParam(5, 1, 20),
    "colour": P.ChoiceParam("top", ("top", "actual", "target")),
    "target": P.TextParam(""),
    "pos": P.IntParam(None),
    "stages": P.ChoiceParam("sublayer", ("sublayer", "layer")),
}

HELP = r"""
The **logit lens** (nostalgebraist 2020) decodes the residual stream $x_\ell$ at each stage
as if it were the last: $\mathrm{logits}_\ell = \mathrm{LN_{final}}(x_\ell)\, W_U + b_U$
(without LayerNorm simply $x_\ell W_U + b_U$; with it, LayerNorm is recomputed with
$x_\ell$'s own statistics). The last stage equals the model's real logits exactly.

Each cell shows the top token at that stage (row) and position (column); colour is the
probability of the top token, of the token that actually came next, or of a target
token you type (it must be one token — words inside a sentence usually start with a space,
e.g. ` Granger`). The second chart follows the target (or the actual next token) across
stages at position `pos` (−1 = last, where it follows the model's final top guess). With
no position given, on a prompt that repeats itself the chart follows the token that
actually comes next at a position in the repeated part (where the model gained most from
the earlier copy), so you see at which stage the copied token appears; otherwise the last
position.

Models with **parallel attention and MLP** (GPT-NeoX, Pythia) feed each block's MLP the
stream *before* attention; their "after L attn (parallel)" rows show $x_\ell$ plus the
attention output, a sum the MLP never reads. For **RMSNorm** models (Llama) the final norm
is recomputed the same way, without centring.
"""


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The stage × position grid and the target trajectory."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    pos = chosen_position(fp, query["pos"]).position
    target = query["target"] or None
    if target is None and pos == fp.n_tokens - 1:
        # the last position has no actual next token: follow the model's final top guess
        target = int(fp.logits[pos].argmax())
    key = lens_key(lm, k=query["k"], target=target, granularity=query["stages"])

    def compute(report: Any = None) -> Any:
        return logit_lens(lm, fp, k=key[1], target=key[2], granularity=key[3], progress=report)

    if is_large(lm, fp.n_tokens, key[3]):  # a background job with progress, cached per model
        need = Need((*key, tuple(int(i) for i in fp.token_ids)),
                    lambda _, report: compute(report), "logit lens")
        (lens,) = cached_or_jobs(registry(), lm.name, [need])
    else:
        lens = registry().per_prompt(fp, key, compute)
    colour = query["colour"] if (query["colour"] != "target" or target is not None) else "top"
    return [P.Panel("logit-lens", logit_lens_figure(lens, colour=colour), lens),
            P.Panel("trajectory", logit_lens_target_figure(lens, position=pos), lens)]


P.register_panels(PAGE, panels, CONTROLS)


def layout(**query: Any) -> html.Div:
    """Controls from the URL; the grid and the trajectory."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Logit lens",
        description="What each layer would predict if the model stopped there.",
        controls=[
            P.number_control(PAGE, "k", q["k"], "top k (hover)", min=1, max=20),
            P.select_control(PAGE, "colour", q["colour"],
                             [{"label": "top token", "value": "top"},
                              {"label": "actual next token", "value": "actual"},
                              {"label": "target token", "value": "target"}], "colour by"),
            P.text_control(PAGE, "target", q["target"], "target token",
                           placeholder="e.g. ' Granger'"),
            P.number_control(PAGE, "pos", q["pos"], "position",
                             placeholder="auto (-1 = last)"),
            P.select_control(PAGE, "stages", q["stages"],
                             [{"label": "after attention and MLP", "value": "sublayer"},
                              {"label": "per layer", "value": "layer"}], "stages"),
        ],
        body=[JS.job_strip(PAGE), P.graph(PAGE, "logit-lens"), P.graph(PAGE, "trajectory")],
        help_md=HELP, query=q, problems=problems)


OUTPUTS = P.main_outputs(PAGE, ["logit-lens", "trajectory"], [JS.job_output(PAGE)])


@callback(*OUTPUTS, *P.main_inputs(PAGE, CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=3)
@JS.in_background(2)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass and the lens (a background job when large), draw."""
    return P.figures_of(panels(state, query))


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))
