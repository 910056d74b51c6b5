"""/logit-lens: what the residual stream would predict at every stage and position."""

from __future__ import annotations

from .. import weight_analyses as W
from ..analysis.defaults import chosen_position
from ..analysis.logit_lens import is_large, lens_key, logit_lens
from ..components import page as P
from ..components.controls import Choice, Int, Text
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
    key = lens_key(ctx.model, k=query["k"], target=target, granularity=query["stages"])
    if is_large(ctx.model, fp.n_tokens, key[3]):
        # the positions in view at first (and the followed one) are drawn at once; the whole
        # lens is a background job with progress the first time, then read from the store
        window = sorted({*range(max(0, fp.n_tokens - WINDOW), fp.n_tokens), pos})
        lens = ctx.weight_or(
            W.logit_lens(fp.token_ids, key[1], key[2], key[3]),
            lambda: ctx.registry.per_prompt(fp, (*key, "window", *window), lambda: logit_lens(
                ctx.model, fp, k=key[1], target=key[2], granularity=key[3], positions=window)))
    else:
        lens = ctx.registry.per_prompt(fp, key, lambda: logit_lens(
            ctx.model, fp, k=key[1], target=key[2], granularity=key[3]))
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
    __name__, path="/logit-lens", order=4, name="Logit lens", title="Logit lens · Attention Lens",
    description="Top tokens read off the residual stream after every layer, and a target "
                "token's trajectory.",
    heading="Logit lens", lead="What each layer would predict if the model stopped there.",
    help_md=HELP, panels=panels, graphs=["logit-lens", "trajectory"],
    controls=[
        Int("k", 5, 1, 20, label="top k (hover)"),
        Choice("colour", "top", ("top", "actual", "target"), label="colour by",
               labels={"top": "top token", "actual": "actual next token",
                       "target": "target token"}),
        Text("target", "", label="target token", placeholder="one token, e.g. the"),
        Int("pos", None, label="position", placeholder="auto (-1 = last)"),
        StagesChoice("stages", "sublayer", ("sublayer", "layer"), label="stages",
                     labels={"sublayer": "after attention and MLP", "layer": "per layer"}),
    ])
