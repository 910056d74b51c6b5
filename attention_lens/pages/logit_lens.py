"""/logit-lens: what the residual stream would predict at every stage and position."""

from __future__ import annotations

from ..analysis.defaults import chosen_position
from ..analysis.logit_lens import LOGIT_LENS
from ..components import page as P
from ..components.controls import Choice, Int, control_of
from ..figures.logit_lens import WINDOW, logit_lens_figure, logit_lens_target_figure

HELP = r"""
The **logit lens** (nostalgebraist 2020) decodes the residual stream $x_\ell$ at each stage
as if it were the last: $\mathrm{logits}_\ell = \mathrm{LN_{final}}(x_\ell)\, W_U + b_U$
(without LayerNorm simply $x_\ell W_U + b_U$; with it, LayerNorm is recomputed with
$x_\ell$'s own statistics). The last stage equals the model's real logits exactly.

Each cell shows the top token at that stage (row) and position (column); colour is the
probability of the top token, of the token that actually came next, or of a target
token you type (it must be one token, typed without quotes — words inside a sentence
usually start with a space, e.g. ` the`). The second chart follows the target (or the actual next token) across
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


def panels(ctx: P.PageContext, query: dict) -> list:
    """The stage × position grid and the target trajectory."""
    fp = ctx.forward
    pos = chosen_position(fp, query["pos"]).position
    target = query["target"] or None
    if target is None and pos == fp.n_tokens - 1:
        # the last position has no actual next token: follow the model's final top guess
        target = int(fp.logits[pos].argmax())
    # when the whole lens is a background job, the positions in view at first (and the
    # followed one) are drawn at once
    window = sorted({*range(max(0, fp.n_tokens - WINDOW), fp.n_tokens), pos})
    lens = ctx.run(LOGIT_LENS, query, target=target, preview={"positions": window})
    colour = query["colour"] if (query["colour"] != "target" or target is not None) else "top"
    return [P.Panel("logit-lens", logit_lens_figure(lens, colour=colour), lens),
            P.Panel("trajectory", logit_lens_target_figure(lens, position=pos), lens)]


class StagesChoice(Choice):
    """The stages drop-down, named for the model: attention-only models have no MLP."""

    def widget(self, page: str, value: object, cfg: object = None) -> object:
        if cfg is not None and getattr(cfg, "attn_only", False):
            return Choice(self.name, self.default, self.choices, self.label,
                          {**(self.labels or {}), "sublayer": "after each attention layer"}
                          ).widget(page, value, cfg)
        return super().widget(page, value, cfg)


P.register_page(
    __name__, path="/logit-lens", order=5, name="Logit lens", title="Logit lens · Attention Lens",
    description="Top tokens read off the residual stream after every layer, and a target "
                "token's trajectory.",
    heading="Logit lens", lead="What each layer would predict if the model stopped there.",
    help_md=HELP, panels=panels, graphs=["logit-lens", "trajectory"],
    analysis=LOGIT_LENS,
    controls=[
        "k",
        Choice("colour", "top", ("top", "actual", "target"), label="colour by",
               labels={"top": "top token", "actual": "actual next token",
                       "target": "target token"}),
        "target",
        Int("pos", None, label="position", placeholder="auto (-1 = last)"),
        StagesChoice(**vars(control_of(LOGIT_LENS.params[2]))),
    ])
