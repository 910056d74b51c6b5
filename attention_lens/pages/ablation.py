"""/ablation: zero- or mean-ablate chosen heads and compare predictions and loss."""

from __future__ import annotations

import re

from ..analysis.ablation import ablate_heads
from ..analysis.errors import AnalysisError
from ..analysis.heads import card_induction_head
from ..components import page as P
from ..components.controls import Choice, Int, Text
from ..figures.ablation import ablation_figure, ablation_positions_figure

HEAD_RE = re.compile(r"^L?(\d+)\s*[.:Hh]\s*(\d+)$")

HELP = r"""
**Zero-ablation** replaces a head's output $z W_O$ by 0 at every position;
**mean-ablation** replaces it by its mean over the prompt's positions. The prompt is then
run again with the chosen heads ablated, and the page compares the top-$k$ next-token
distribution at position `pos`, the logit and probability of a target token (the top
prediction if empty), the loss $-\frac{1}{n}\sum_i \ln p(t_{i+1}\mid t_{\le i})$, and the
KL divergence $\mathrm{KL}(p_{\text{before}}\,\|\,p_{\text{after}})$ per position.

Heads are written `L1H5` or `1.5`, separated by spaces or commas. Empty: the model's
strongest induction head from its card. Ablating the induction heads of the two-layer model
raises the loss on the repeated half of the default prompt.
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


def panels(ctx: P.PageContext, query: dict) -> list:
    """Top-k before/after and the per-position change."""
    lm = ctx.model
    heads = parse_heads(query["heads"]) or [card_induction_head(lm)
                                            or (lm.cfg.n_layers - 1, 0)]
    result = ablate_heads(lm, ctx.forward, heads=heads, method=query["method"], k=query["k"],
                          position=query["pos"], target=query["target"] or None)
    return [P.Panel("predictions", ablation_figure(result), result),
            P.Panel("positions", ablation_positions_figure(result), result)]


P.register_page(
    __name__, path="/ablation", order=6, name="Ablation", title="Ablation · Attention Lens",
    description="Switch heads off and see what the model predicts without them.",
    heading="Head ablation", lead="Remove heads from the forward pass and compare.",
    help_md=HELP, panels=panels, graphs=["predictions", "positions"],
    controls=[Text("heads", "", max_len=400, label="heads", placeholder="e.g. L1H5 L1H0"),
              Choice("method", "zero", ("zero", "mean"), label="ablation",
                     labels={"zero": "zero", "mean": "mean over positions"}),
              Int("k", 10, 1, 50, label="top k"),
              Int("pos", -1, label="position", placeholder="-1 = last"),
              Text("target", "", label="target token", placeholder="top prediction")])
