"""/ablation: zero- or mean-ablate chosen heads and compare predictions and loss."""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from .. import weight_analyses as W
from ..analysis.ablation import (
    HeadSweep,
    ablate_heads,
    check_heads,
    head_sweep,
    sweep_is_large,
    sweep_key,
)
from ..analysis.defaults import chosen_position, preset_heads, repeated_positions
from ..analysis.errors import AnalysisError
from ..analysis.predictions import token_id
from ..components import page as P
from ..components.controls import Choice, Int, Text
from ..figures.ablation import ablation_figure, ablation_positions_figure, sweep_figure
from ..figures.tokens import quoted

PRESETS = ("induction", "previous-token")
HEAD_RE = re.compile(r"^L?(\d+)\s*[.:Hh]\s*(\d+)$")

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


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"L1H5, 1.0"`` -> ``[(1, 5), (1, 0)]``; a readable error for anything else."""
    pairs = []
    for item in re.split(r"[\s,;]+", text.strip()):
        if not item:
            continue
        m = HEAD_RE.match(item)
        if not m:
            raise AnalysisError(f"cannot read head {item[:20]!r}: write heads as L1H5 or 1.5")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return pairs


def chosen_heads(ctx: P.PageContext, query: dict) -> tuple[list[tuple[int, int]], str]:
    """The heads to ablate (typed, else the preset) and a sentence saying which and why."""
    typed = parse_heads(query["heads"])
    if typed:
        return typed, "the heads you typed"
    return preset_heads(ctx.model, ctx.forward, query["preset"])


def sweep_of(ctx: P.PageContext, method: str, positions: Optional[np.ndarray]
             ) -> Optional[HeadSweep]:
    """Every head ablated alone, cached with the forward pass; on a big model a background
    job the first time (None until it is done: the page's other parts draw meanwhile)."""
    lm, fp = ctx.model, ctx.forward
    if sweep_is_large(lm, fp.n_tokens):
        return ctx.weight_or(W.head_sweep(fp.token_ids, method, positions), lambda: None)
    return ctx.registry.per_prompt(fp, sweep_key(method, positions),
                                   lambda: head_sweep(lm, fp, method, positions))


def panels(ctx: P.PageContext, query: dict) -> list[Any]:
    """Which heads and where, top-k before/after, the per-position change, the sweep."""
    lm, fp = ctx.model, ctx.forward
    heads, which = chosen_heads(ctx, query)
    where = chosen_position(fp, query["pos"])
    target = query["target"] or where.target_id
    part = repeated_positions(fp.token_ids)
    positions = part if part.size else None
    pairs = check_heads(lm, heads)
    tid = None if target is None else token_id(lm, target)
    key = ("ablation", pairs, query["method"], query["k"], where.position, tid,
           sweep_key(query["method"], positions)[2])
    result = ctx.registry.per_prompt(fp, key, lambda: ablate_heads(
        lm, fp, heads=pairs, method=query["method"], k=query["k"], position=where.position,
        target=target, part=positions))
    sweep = sweep_of(ctx, query["method"], positions)
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
    __name__, path="/ablation", order=6, name="Ablation", title="Ablation · Attention Lens",
    description="Switch heads off and see what the model predicts without them.",
    heading="Head ablation", lead="Remove heads from the forward pass and compare.",
    help_md=HELP, panels=panels, graphs=["predictions", "positions", "sweep"],
    extras=[("choice", "al-choice")],
    controls=[Choice("preset", "induction", PRESETS, label="ablate",
                     labels={"induction": "all induction heads",
                             "previous-token": "all previous-token heads"}),
              Text("heads", "", max_len=400, label="or heads", placeholder="e.g. L1H5 L1H0"),
              Choice("method", "zero", ("zero", "mean"), label="ablation",
                     labels={"zero": "zero", "mean": "mean over positions"}),
              Int("k", 10, 1, 50, label="top k"),
              Int("pos", None, label="position", placeholder="auto (-1 = last)"),
              Text("target", "", label="target token", placeholder="the actual next token")],
    body=lambda parts: [parts["choice"], parts["predictions"],
                        parts["positions"], parts["sweep"]])
