"""/ablation: zero- or mean-ablate chosen heads and compare predictions and loss."""

from __future__ import annotations

from typing import Any

from ..analysis.ablation import ABLATION, HEAD_SWEEP, check_heads
from ..analysis.labels import parse_heads
from ..analysis.defaults import chosen_position, preset_heads, repeated_positions
from ..components import page as P
from ..components.controls import Choice, Text
from ..figures.ablation import ablation_figure, ablation_positions_figure, sweep_figure
from ..figures.tokens import quoted

PRESETS = ("induction", "previous-token")

HELP = r"""
**Zero-ablation** replaces a head's output $z W_O$ by 0 at every position;
**mean-ablation** replaces it by its mean over the prompt's positions. The prompt is then
run again with the chosen heads ablated, and the page compares the top-$k$ next-token
distribution at position `pos`, the logit and probability of a target token, the loss
$-\frac{1}{n}\sum_i \ln p(t_{i+1}\mid t_{\le i})$ in nats (over the whole prompt and over
its **repeated part**: the positions whose next token also followed an earlier copy of the
current token, shaded in the lower chart), and the KL divergence
$\mathrm{KL}(p_{\text{before}}\,\|\,p_{\text{after}})$ per position.

**Which heads**: type heads as `L1H5` or `1.5`, separated by spaces or commas, or leave the
box empty to use a preset: *all induction heads* or *all previous-token heads* of this
prompt (every head scoring at least half the strongest head's score on it, and at least
0.2; scores as on the Induction page). Induction heads come in redundant groups: ablating
one of them barely changes the output, ablating the group does. The **sweep** ablates each
head alone and shows how much the loss on the repeated part (the whole prompt when it does
not repeat itself) rises.

**Defaults**: on a prompt that repeats itself the page opens at a position in the repeated
part (where the model gained most from the earlier copy) and follows the token that
actually comes next there; otherwise at the last position and its top prediction.
"""


def chosen_heads(ctx: P.PageContext, query: dict) -> tuple[list[tuple[int, int]], str]:
    """The heads to ablate (typed, else the preset) and a sentence saying which and why."""
    typed = parse_heads(query["heads"])
    if typed:
        return typed, "the heads you typed"
    return preset_heads(ctx.model, ctx.forward, query["preset"])


def panels(ctx: P.PageContext, query: dict) -> list[Any]:
    """Which heads and where, top-k before/after, the per-position change, the sweep (on a
    big model a background job: None until it is done, the other parts draw meanwhile)."""
    lm, fp = ctx.model, ctx.forward
    heads, which = chosen_heads(ctx, query)
    where = chosen_position(fp, query["pos"])
    target = query["target"] or where.target_id
    part = repeated_positions(fp.token_ids)
    positions = [int(p) for p in part] if part.size else None
    result = ctx.run(ABLATION, query, heads=check_heads(lm, heads), position=where.position,
                     target=target, part=positions)
    sweep = ctx.run(HEAD_SWEEP, query, positions=positions, wait=False)
    names = " ".join(f"L{la}H{h}" for la, h in result.heads)
    follows = ("the token you typed" if query["target"] else
               "the token that actually comes next" if where.target_id is not None else
               "the model's top prediction")
    what = "the repeated part" if result.part.size else "the whole prompt"
    return [P.Html("choice", f"Ablating {which}: {names}. At {where.reason}; following "
                             f"{quoted(result.target_display)}, {follows}."),
            P.Panel("predictions", ablation_figure(result), result),
            P.Panel("positions", ablation_positions_figure(result), result),
            P.Panel("sweep", sweep_figure(sweep, what), sweep) if sweep is not None else
            P.Panel("sweep", P.empty_figure(
                f"Ablating each of the {lm.cfg.n_layers * lm.cfg.n_heads} heads alone: "
                "this chart appears when the sweep is done (progress above)."))]


P.register_page(
    __name__, path="/ablation", order=8, name="Ablation", title="Ablation · Attention Lens",
    description="Switch heads off and see what the model predicts without them.",
    heading="Head ablation", lead="Remove heads from the forward pass and compare.",
    help_md=HELP, panels=panels, graphs=["predictions", "positions", "sweep"],
    extras=[("choice", "al-choice")],
    analysis=ABLATION,
    controls=[Choice("preset", "induction", PRESETS, label="ablate",
                     labels={"induction": "all induction heads",
                             "previous-token": "all previous-token heads"}),
              Text("heads", "", max_len=400, label="or heads", placeholder="e.g. L1H5 L1H0"),
              "method", "k", "pos", "target"],
    body=lambda parts: [parts["choice"], parts["predictions"],
                        parts["positions"], parts["sweep"]])
