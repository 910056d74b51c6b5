"""/induction: previous-token, duplicate-token, induction and copying heads; composition."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Output, callback, html

from ..analysis.circuits import check_head
from ..analysis.composition import KINDS, Composition, composition_scores
from ..analysis.defaults import HeadChoice, strongest_head
from ..analysis.eigen import circuit_eigenvalues
from ..analysis.errors import AnalysisError
from ..analysis.heads import (
    METRICS,
    ROWS,
    ROWS_DESCRIPTION,
    HeadDetection,
    head_detection,
    label_heads,
    probe_head_scores,
)
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..components import shell
from ..figures.heads import (
    composition_figure,
    head_examples_figure,
    head_labels_figure,
    head_scores_figure,
)
from ..jobs import Need, cached_or_jobs

PAGE = "induction"
dash.register_page(__name__, path="/induction", order=7, name="Induction",
                   title="Induction · Attention Lens",
                   description="Previous-token, duplicate-token, induction and copying scores "
                               "of every head, on the prompt and on a repeated random probe; "
                               "head labels; Q/K/V composition.")

EXAMPLE_KINDS = ("induction", "previous_token", "duplicate_token", "self")
CONTROLS = {
    "metric": P.ChoiceParam("mul", METRICS),
    "rows": P.ChoiceParam("target", ROWS),
    "labels": P.ChoiceParam("probe", ("probe", "prompt")),
    "kind": P.ChoiceParam("induction", EXAMPLE_KINDS),
    "layer": P.IntParam(None, 0),
    "head": P.IntParam(None, 0),
    "n": P.IntParam(8, 1, 30),
    "src": P.IntParam(None, 0),
}
NOTE = f"{PAGE}-note"
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


NEEDS = {
    "probe": Need("probe_head_scores", lambda lm, report: probe_head_scores(lm),
                  "repeated-token probe"),
    "eigen": Need("circuit_eigenvalues",
                  lambda lm, report: circuit_eigenvalues(lm, progress=report),
                  "circuit eigenvalues"),
    "composition": Need("composition_scores",
                        lambda lm, report: composition_scores(lm, progress=report),
                        "composition scores"),
}


def _weights(model: str) -> dict[str, Any]:
    """The probe, eigenvalues and composition of ``model``: cached, or background jobs."""
    return dict(zip(NEEDS, cached_or_jobs(registry(), model, list(NEEDS.values()))))


def _probe(model: str) -> Any:
    return _weights(model)["probe"]


def _eigen(model: str) -> Any:
    return _weights(model)["eigen"]


def _composition(model: str) -> Composition:
    return _weights(model)["composition"]


def detection(state: dict, query: dict) -> HeadDetection:
    """Head scores on the prompt (probe and copying scores come from the per-model cache)."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    w = _weights(lm.name)
    return head_detection(lm, fp, metric=query["metric"], n_examples=query["n"],
                          probe=w["probe"], eigen=w["eigen"], rows=query["rows"])


def labels_of(hd: HeadDetection, source: str) -> list[list[str]]:
    """One label per head from the prompt's pattern scores or the probe's."""
    if source == "prompt":
        return hd.labels
    scores = {"induction": hd.probe_induction, "previous_token": hd.probe_previous_token,
              "duplicate_token": np.zeros_like(hd.probe_induction)}
    labels, _ = label_heads(scores, hd.self_attention, hd.entropy, hd.copying)
    return labels


def selected_head(hd: HeadDetection, layer: Optional[int], head: Optional[int],
                  prompt_choice: Optional[HeadChoice] = None) -> tuple[int, int]:
    """The head whose examples are listed: the one asked for, else the strongest induction
    head on this prompt when it repeats itself, else the best inductor on the probe."""
    if layer is None and head is None:
        if prompt_choice is not None and prompt_choice.kind == "induction":
            return prompt_choice.layer, prompt_choice.head
        flat = int(np.argmax(hd.probe_induction))
        return divmod(flat, hd.probe_induction.shape[1])
    return (0 if layer is None else layer), (0 if head is None else head)


def composition_note(comp: Composition, n_layers: int) -> Optional[str]:
    """Why there is nothing to show, or what the scores leave out for this model; or None."""
    if n_layers < 2:
        return ("This model has one layer, so no head can compose with another: Q-, K- and "
                "V-composition need a head in a later layer.")
    return " ".join(comp.notes) or None


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Score grids, labels, the selected head's examples and the composition heatmaps."""
    lm = registry().get(state["model"])
    hd = detection(state, query)
    fp = registry().forward(state["text"], state["model"])
    layer, head = selected_head(hd, query["layer"], query["head"], strongest_head(lm, fp))
    check_head(lm, layer, head)
    src = query["src"]
    if src is not None and not 0 <= src < lm.cfg.n_layers - 1:
        raise AnalysisError(f"source layer must be between 0 and {lm.cfg.n_layers - 2} "
                            "(the last layer has no later head to compose with)"
                            if lm.cfg.n_layers > 1 else "this model has one layer: there "
                            "is no source layer to choose")
    if src is None and (lm.cfg.n_layers - 1) * lm.cfg.n_heads > MAX_COMPOSITION_HEADS:
        src = 0
    labels = labels_of(hd, query["labels"])
    examples = hd.examples(query["kind"], layer, head)
    comp = _composition(lm.name)
    note = composition_note(comp, lm.cfg.n_layers)
    out = [
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


P.register_panels(PAGE, panels, CONTROLS)

GRAPHS = ["scores", "labels", "examples", "composition-Q", "composition-K", "composition-V"]


def layout(**query: Any) -> html.Div:
    """Controls from the URL, the score grids, labels, examples and composition."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Induction and other head types",
        description="Which heads attend to the previous token, to earlier copies of the "
                    "current token, or to the token after an earlier copy (induction), and "
                    "how heads in different layers compose.",
        controls=[
            P.select_control(PAGE, "metric", q["metric"], METRICS, "score"),
            P.select_control(PAGE, "rows", q["rows"],
                             [{"label": "rows with a target", "value": "target"},
                              {"label": "all rows (TransformerLens)", "value": "all"}],
                             "average over"),
            P.select_control(PAGE, "labels", q["labels"],
                             [{"label": "probe", "value": "probe"},
                              {"label": "prompt", "value": "prompt"}], "labels from"),
            P.select_control(PAGE, "kind", q["kind"],
                             [{"label": k.replace("_", "-"), "value": k}
                              for k in EXAMPLE_KINDS], "examples of"),
            P.number_control(PAGE, "layer", q["layer"], "layer", min=0, placeholder="auto"),
            P.number_control(PAGE, "head", q["head"], "head", min=0, placeholder="auto"),
            P.number_control(PAGE, "n", q["n"], "examples", min=1, max=30),
            P.number_control(PAGE, "src", q["src"], "composition from layer", min=0,
                             placeholder="all"),
        ],
        body=[JS.job_strip(PAGE), P.graph(PAGE, "scores"),
              dbc.Row([dbc.Col(P.graph(PAGE, "labels"), lg=7),
                       dbc.Col(P.graph(PAGE, "examples"), lg=5)]),
              html.Div(id=NOTE),
              dbc.Row([dbc.Col(P.graph(PAGE, f"composition-{k}"), lg=4) for k in KINDS])],
        help_md=HELP, query=q, problems=problems)


OUTPUTS = P.main_outputs(PAGE, GRAPHS, [Output(NOTE, "children"), JS.job_output(PAGE)])


@callback(*OUTPUTS,
          *P.main_inputs(PAGE, CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=len(GRAPHS) + 2)
@JS.in_background(len(GRAPHS) + 1)
def update(state: dict, query: dict) -> tuple:
    """Fetch the forward pass and weight analyses (background jobs at first), score, draw."""
    out = panels(state, query)
    lm = registry().get(state["model"])
    note = composition_note(_composition(lm.name), lm.cfg.n_layers)
    return (*P.figures_of(out), shell.alert(note, color="info") if note else None)


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))
