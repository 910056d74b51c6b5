"""/ablation: zero- or mean-ablate chosen heads and compare predictions and loss."""

from __future__ import annotations

import re
from typing import Any

import dash
from dash import callback, html

from ..analysis.ablation import ablate_heads
from ..analysis.errors import AnalysisError
from ..app import registry
from ..components import page as P
from ..figures.ablation import ablation_figure, ablation_positions_figure

PAGE = "ablation"
dash.register_page(__name__, path="/ablation", order=6, name="Ablation",
                   title="Ablation · Attention Lens",
                   description="Switch heads off and see what the model predicts without "
                               "them.")

CONTROLS = {
    "heads": P.TextParam("", max_len=400),
    "method": P.ChoiceParam("zero", ("zero", "mean")),
    "k": P.IntParam(10, 1, 50),
    "pos": P.IntParam(-1),
    "target": P.TextParam(""),
}
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


def default_heads(model: str) -> list[tuple[int, int]]:
    """The model card's strongest induction head, else the last layer's head 0."""
    lm = registry().get(model)
    probe = ((lm.card or {}).get("evaluation", {}) or {}).get("induction_probe", {}) or {}
    if isinstance(probe.get("max_layer"), int) and isinstance(probe.get("max_head"), int):
        return [(probe["max_layer"], probe["max_head"])]
    return [(lm.cfg.n_layers - 1, 0)]


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Top-k before/after and the per-position change."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    heads = parse_heads(query["heads"]) or default_heads(state["model"])
    result = ablate_heads(lm, fp, heads=heads, method=query["method"], k=query["k"],
                          position=query["pos"], target=query["target"] or None)
    return [P.Panel("predictions", ablation_figure(result), result),
            P.Panel("positions", ablation_positions_figure(result), result)]


P.register_panels(PAGE, panels, CONTROLS)


def layout(**query: Any) -> html.Div:
    """Heads, method and settings from the URL; the two charts."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Head ablation",
        description="Remove heads from the forward pass and compare.",
        controls=[P.text_control(PAGE, "heads", q["heads"], "heads",
                                 placeholder="e.g. L1H5 L1H0"),
                  P.select_control(PAGE, "method", q["method"],
                                   [{"label": "zero", "value": "zero"},
                                    {"label": "mean over positions", "value": "mean"}],
                                   "ablation"),
                  P.number_control(PAGE, "k", q["k"], "top k", min=1, max=50),
                  P.number_control(PAGE, "pos", q["pos"], "position", placeholder="-1 = last"),
                  P.text_control(PAGE, "target", q["target"], "target token",
                                 placeholder="top prediction")],
        body=[P.graph(PAGE, "predictions"), P.graph(PAGE, "positions")],
        help_md=HELP, query=q, problems=problems)


@callback(*P.main_outputs(PAGE, ["predictions", "positions"]), *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=2)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass, analyse (one extra hooked run), draw."""
    return P.figures_of(panels(state, query))
