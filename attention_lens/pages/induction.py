"""/induction: previous-token, duplicate-token, induction and copying heads; composition."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
import numpy as np

from .. import weight_analyses as W
from ..analysis.checks import check_layer_head
from ..analysis.composition import KINDS, Composition
from ..analysis.defaults import strongest_head
from ..analysis.errors import AnalysisError
from ..analysis.heads import HEAD_DETECTION, ROWS_DESCRIPTION, HeadDetection, label_heads
from ..components import page as P
from ..components.controls import Choice, Int
from ..figures.heads import (
    composition_figure,
    head_examples_figure,
    head_labels_figure,
    head_scores_figure,
)

EXAMPLE_KINDS = ("induction", "previous_token", "duplicate_token", "self")
#: Composition heatmaps with more source heads than this show one source layer at a time.
MAX_COMPOSITION_HEADS = 256

HELP = r"""
Each grid is layers × heads. On the **prompt** $t$, a head's pattern $A$ (rows: queries)
is compared with a detection pattern $P$: previous-token $P[i, i-1] = 1$; duplicate-token
$P[i, j] = 1$ iff $t_i = t_j,\ j < i$; induction $P[i, j] = 1$ iff $t_{j-1} = t_i,\ 1 \le j
\le i$. Score "mul" $= \sum A \odot P / \sum A$, "abs" $= 1 - \mathrm{mean}_i \sum_j |A - P|$.
A prompt without repeats has no induction or duplicate targets, and its first half dilutes
the score, so the **probe** is the standard test: random tokens $r$ of length $T = 50$
repeated, $x = [r; r]$, batch 10, seeded; induction score $=$ mean of
$A[i, i - (T - 1)]$ over the second half (Olsson et al. 2022), previous-token $=$ mean of
$A[i, i-1]$. Prompt scores **average over the query rows that have a target** by default
(rows with no earlier copy of their token have nothing to find and are left out, as in
the field's dataset metrics); "all rows" is TransformerLens' `head_detector` exactly, where
the first half of a repeated prompt halves every induction score. With "abs", the BOS
column and the diagonal, when excluded, are left out of $|A - P|$ as in TransformerLens.
**Copying** is the full OV circuit's $\mathrm{Re}(\sum \lambda) / \sum
|\lambda|$ of $W_E W_{OV} W_U$, in $[-1, 1]$.

**Labels** (thresholds: pattern score $\ge 0.4$, self $\ge 0.5$, copying $\ge 0.7$,
normalised entropy $\ge 0.75$ for diffuse) use the probe's induction and previous-token
scores ("probe") or the prompt's ("prompt"). **Examples** list the strongest
"query ← key: weight" entries of $A \odot P$ for the selected head (empty boxes: the
strongest induction head on this prompt when it repeats itself, else the head with the
highest probe induction score).

**Composition** of an earlier head $h_1$ ($L = W_{OV}^{h_1}$) into a later head $h_2$:
Q: $\lVert L\, W_{QK}^{h_2} \rVert_F / (\lVert L \rVert_F \lVert W_{QK}^{h_2} \rVert_F)$,
K: the same with $W_{QK}^{h_2\top}$, V: with $W_{OV}^{h_2}$ (Elhage et al. 2021), computed
from factors. Compare with the random baseline in each title (mean score of random
matrices of the same shapes); an induction head's K-composition with a previous-token
head stands out.
"""


def labels_of(hd: HeadDetection, source: str) -> list[list[str]]:
    """One label per head from the prompt's pattern scores or the probe's."""
    if source == "prompt":
        return hd.labels
    scores = {"induction": hd.probe_induction, "previous_token": hd.probe_previous_token,
              "duplicate_token": np.zeros_like(hd.probe_induction)}
    labels, _ = label_heads(scores, hd.self_attention, hd.entropy, hd.copying)
    return labels


def composition_note(comp: Composition, n_layers: int) -> Optional[str]:
    """Why there is nothing to show, or what the scores leave out for this model; or None."""
    if n_layers < 2:
        return ("This model has one layer, so no head can compose with another: Q-, K- and "
                "V-composition need a head in a later layer.")
    return " ".join(comp.notes) or None


def source_layer(lm: Any, src: Optional[int]) -> Optional[int]:
    """The composition heatmaps' source layer: the one asked for, or all (layer 0 when a
    model has too many heads to show at once)."""
    n_layers = lm.cfg.n_layers
    if src is not None and not 0 <= src < n_layers - 1:
        raise AnalysisError(f"source layer must be between 0 and {n_layers - 2} (the last "
                            "layer has no later head to compose with)" if n_layers > 1 else
                            "this model has one layer: there is no source layer to choose")
    if src is None and (n_layers - 1) * lm.cfg.n_heads > MAX_COMPOSITION_HEADS:
        return 0
    return src


def panels(ctx: P.PageContext, query: dict) -> list:
    """Score grids, labels, the selected head's examples and the composition heatmaps."""
    lm = ctx.model
    *_, comp = ctx.weights(*W.needs(HEAD_DETECTION), W.composition_scores())
    fp = ctx.forward
    hd = ctx.run(HEAD_DETECTION, query)
    if query["layer"] is None and query["head"] is None:
        # the strongest induction head on this prompt when it repeats itself, else the
        # strongest on the probe
        choice = ctx.registry.per_prompt(fp, "strongest_head", lambda: strongest_head(lm, fp))
        layer, head = ((choice.layer, choice.head) if choice.kind == "induction"
                       else hd.strongest_induction_head())
    else:
        layer, head = query["layer"] or 0, query["head"] or 0
    check_layer_head(lm, layer, head)
    src = source_layer(lm, query["src"])
    labels = labels_of(hd, query["labels"])
    examples = hd.examples(query["kind"], layer, head)
    note = composition_note(comp, lm.cfg.n_layers)
    out = [
        *([P.Notice(note)] if note else []),
        P.Panel("scores", head_scores_figure(hd),
                {"scores": hd.scores, "metric": hd.metric, "rows": hd.rows,
                 "rows_meaning": ROWS_DESCRIPTION[hd.rows],
                 "probe_induction": hd.probe_induction,
                 "probe_previous_token": hd.probe_previous_token, "copying": hd.copying,
                 "probe_settings": hd.probe_settings}),
        P.Panel("labels", head_labels_figure(hd, labels, source=query["labels"]),
                {"labels": labels, "source": query["labels"], "tags": hd.tags,
                 "thresholds": hd.thresholds}),
        P.Panel("examples", head_examples_figure(examples, layer, head, query["kind"]),
                {"layer": layer, "head": head, "kind": query["kind"], "examples": examples}),
    ]
    for kind in KINDS:
        out.append(P.Panel(f"composition-{kind}",
                           composition_figure(comp, kind, source_layer=src, note=note),
                           {"kind": kind, "scores": comp.scores(kind),
                            "baseline": comp.baseline[kind],
                            "baseline_std": comp.baseline_std[kind],
                            "top_pairs": comp.top_pairs(kind, 10), "note": note}))
    return out


P.register_page(
    __name__, path="/induction", order=10, name="Induction", title="Induction · Attention Lens",
    description="Previous-token, duplicate-token, induction and copying scores of every head, "
                "on the prompt and on a repeated random probe; head labels; Q/K/V composition.",
    heading="Induction and other head types",
    lead="Which heads attend to the previous token, to earlier copies of the current token, "
         "or to the token after an earlier copy (induction), and how heads in different "
         "layers compose.",
    help_md=HELP, panels=panels,
    graphs=["scores", "labels", "examples", *[f"composition-{k}" for k in KINDS]],
    analysis=HEAD_DETECTION,
    controls=[
        "metric", "rows",
        Choice("labels", "probe", ("probe", "prompt"), label="labels from"),
        Choice("kind", "induction", EXAMPLE_KINDS, label="examples of",
               labels={k: k.replace("_", "-") for k in EXAMPLE_KINDS}),
        Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="layer",
            placeholder="auto"),
        Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head", placeholder="auto"),
        "n",
        Int("src", None, 0, label="composition from layer", placeholder="all"),
    ],
    body=lambda parts: [parts["scores"],
                        dbc.Row([dbc.Col(parts["labels"], lg=7),
                                 dbc.Col(parts["examples"], lg=5)]),
                        dbc.Row([dbc.Col(parts[f"composition-{k}"], lg=4) for k in KINDS])])
