"""/compare: two prompts, or two models with one tokenizer, side by side and as differences."""

from __future__ import annotations

from typing import Any

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, html
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis.compare import (
    Comparison,
    IclView,
    compare,
    icl_score,
    loss_by_position,
    probe_halves,
    same_tokenizer,
)
from ..analysis.datasets import MAX_WINDOWS, SHIPPED, dataset_windows, load_dataset
from ..analysis.errors import AnalysisError
from ..analysis.head_metrics import windows_key
from ..analysis.heads import probe_head_scores
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..components import shell
from ..figures.compare import (
    attention_compare_figure,
    dla_compare_figure,
    icl_figure,
    lens_compare_figure,
    loss_compare_figure,
    predictions_compare_figure,
)
from ..jobs import JobPending, Need, cached_or_jobs

PAGE = "compare"
dash.register_page(__name__, path="/compare", order=15, name="Compare",
                   title="Compare · Attention Lens",
                   description="Two prompts, or two models, side by side and as differences; "
                               "in-context-learning curves.")

CONTROLS = {
    "text_b": P.TextParam("", 2000),
    "model_b": P.TextParam("", 120),
    "layer": P.IntParam(None, 0),
    "head": P.IntParam(None, 0),
    "position": P.IntParam(-1),
    "target": P.TextParam("", 40),
    "k": P.IntParam(10, 1, 50),
    "windows": P.IntParam(200, 1, MAX_WINDOWS),
}
ICL_CONTROLS = {k: CONTROLS[k] for k in ("text_b", "model_b", "windows")}
GRAPHS = ["loss", "predictions", "attention", "lens", "dla"]
NOTE, ICL_NOTE, ICL_ALERTS, ICL_QUERY = (f"{PAGE}-note", f"{PAGE}-icl-note",
                                         f"{PAGE}-icl-alerts", f"{PAGE}-icl-query")
ICL_PAGE = f"{PAGE}-icl"

HELP = r"""
**A** is the prompt and model of the prompt bar; **B** is the prompt typed here (empty: the
same prompt) on the model chosen here (empty: another model with the same tokenizer when
the prompts are the same, else the same model). Models with different tokenizers cannot be
compared token by token and are refused with the reason. Differences are always
**B − A**: per-token loss $-\ln p(t_{k+1} \mid t_{\le k})$ over the positions both prompts
have; next-token probabilities of every token in either top-$k$ at the chosen position
(−1: each prompt's last token); the chosen head's pattern (same length only); the logit
lens (probability of the target after each layer, LayerNorm recomputed per stage) and
the direct logit attribution of the target, over the stages and components both models
have. The target is A's top prediction unless one is typed.

**In-context learning** (Olsson et al. 2022): mean loss against position over windows of
the shipped validation text and over the repeated-random-token probe $[r; r]$ ($T = 50$,
batch 10, seeded). The in-context-learning score is the mean loss at a late position minus
the mean loss at an early one (dotted lines; 12 and 125 for 128-token windows, Olsson et
al.'s 50th and 500th tokens of 512 scaled): more negative, more learning from the context.
On the probe, a model with induction heads predicts the repeated half far better than the
first half.
"""


def models_of(state: dict, query: dict) -> tuple[Any, Any, str]:
    """Models A and B and B's prompt (defaults as the help text says)."""
    reg = registry()
    lm_a = reg.get(state["model"])
    text_b = query["text_b"] if query["text_b"].strip() else state["text"]
    name_b = query["model_b"].strip()
    if not name_b:
        name_b = lm_a.name
        if text_b == state["text"]:  # one prompt: compare with another model that fits
            for other in reg.names():
                if other != lm_a.name and not same_tokenizer(lm_a, reg.get(other)):
                    name_b = other
                    break
    return lm_a, reg.get(name_b), text_b


def default_head(lm_a: Any, lm_b: Any) -> tuple[int, int]:
    """The deeper model's strongest probe induction head from its card, else L0H0."""
    deeper = lm_b if lm_b.cfg.n_layers > lm_a.cfg.n_layers else lm_a
    probe = ((deeper.card or {}).get("evaluation", {}) or {}).get("induction_probe", {}) or {}
    if isinstance(probe.get("max_layer"), int) and isinstance(probe.get("max_head"), int):
        return probe["max_layer"], probe["max_head"]
    return 0, 0


def comparison(state: dict, query: dict) -> Comparison:
    """The comparison of A and B for the page's controls."""
    lm_a, lm_b, text_b = models_of(state, query)
    reason = same_tokenizer(lm_a, lm_b)
    if reason:
        raise AnalysisError(reason)
    d_layer, d_head = default_head(lm_a, lm_b)
    layer = d_layer if query["layer"] is None else query["layer"]
    head = d_head if query["head"] is None else query["head"]
    fp_a = registry().forward(state["text"], lm_a.name)
    fp_b = registry().forward(text_b, lm_b.name)
    return compare(lm_a, fp_a, lm_b, fp_b, layer=layer, head=head, position=query["position"],
                   k=query["k"], target=query["target"] or None)


def icl(state: dict, query: dict) -> IclView:
    """Loss-by-position curves of A (and B) over the validation windows and the probe.

    The dataset curves are cached per model weights and windows (background jobs at first).
    """
    lm_a, lm_b, _ = models_of(state, query)
    models = [lm_a] if lm_b is lm_a else [lm_a, lm_b]
    reason = same_tokenizer(lm_a, lm_b)
    if reason:
        raise AnalysisError(reason)
    windows = dataset_windows(lm_a, load_dataset(SHIPPED), max_windows=query["windows"])
    label = f"validation text: {windows.n_windows} windows of {windows.length} tokens"
    curves, pending = [], []
    for lm in models:
        key = ("loss_by_position", W.weight_hash(lm), *windows_key(windows))
        need = Need(key, lambda m, report: loss_by_position(m, windows.tokens, label,
                                                            progress=report),
                    f"loss by position of {lm.name} over {windows.n_windows} windows")
        try:
            curves.append(cached_or_jobs(registry(), lm.name, [need])[0])
        except JobPending as exc:
            pending += exc.jobs
    if pending:
        raise JobPending(pending)
    probe = cached_or_jobs(registry(), lm_a.name, [Need(
        "probe_head_scores", lambda m, report: probe_head_scores(m),
        "repeated-token probe")])[0]
    probes = [loss_by_position(lm, probe.tokens, f"probe [r ; r], T = {probe.seq_len}")
              for lm in models]
    return IclView(dataset=tuple(curves), probe=tuple(probes),
                   scores=tuple(icl_score(c) for c in curves), probe_len=probe.seq_len,
                   probe_halves={c.model: probe_halves(c, probe.seq_len, probe.bos is not None)
                                 for c in probes})


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The five side-by-side views and the in-context-learning curves."""
    c = comparison(state, query)
    out = [P.Panel("loss", loss_compare_figure(c),
                   {"a": c.a.loss, "b": c.b.loss, "b_minus_a": c.loss_diff}),
           P.Panel("predictions", predictions_compare_figure(c),
                   {"tokens": c.prob_display, "a": c.prob_a, "b": c.prob_b,
                    "b_minus_a": c.prob_diff}),
           P.Panel("attention", attention_compare_figure(c),
                   {"layer": c.layer, "head": c.head, "a": c.a.pattern, "b": c.b.pattern,
                    "b_minus_a": c.pattern_diff}),
           P.Panel("lens", lens_compare_figure(c),
                   {"target": c.target_display, "stages": c.lens_labels,
                    "a": c.a.lens_probs, "b": c.b.lens_probs, "b_minus_a": c.lens_diff}),
           P.Panel("dla", dla_compare_figure(c),
                   {"target": c.target_display, "components": c.dla_labels,
                    "b_minus_a": c.dla_diff})]
    return out + icl_panels(state, query)


def icl_panels(state: dict, query: dict) -> list[P.Panel]:
    """The in-context-learning figure and its data."""
    v = icl(state, query)
    return [P.Panel("icl", icl_figure(v.dataset, v.probe, v.scores, v.probe_len),
                    {"scores": v.scores, "probe_halves": v.probe_halves,
                     "dataset": v.dataset, "probe": v.probe})]


P.register_panels(PAGE, panels, CONTROLS)


def describe(c: Comparison) -> list[Any]:
    """What is compared, and what could not be."""
    what = {"prompts": f"two prompts on {c.a.model}",
            "models": f"{c.a.model} (A) and {c.b.model} (B) on one prompt",
            "both": f"{c.a.model} on prompt A and {c.b.model} on prompt B"}[c.mode]
    lines = [html.Span(f"Comparing {what}: head L{c.layer}H{c.head}, target "
                       f"'{c.target_display}', A at position {c.a.position}, B at "
                       f"{c.b.position}. Mean loss A {c.a.mean_loss:.3f}, B "
                       f"{c.b.mean_loss:.3f} nats.")]
    return lines + [shell.alert(n, color="info") for n in c.notes]


def icl_note(v: IclView) -> str:
    """The numbers of the in-context-learning view, in words."""
    parts = [f"{s.model}: loss at {s.late} − loss at {s.early} = {s.score:+.3f} nats "
             f"({s.loss_late:.3f} − {s.loss_early:.3f})" for s in v.scores]
    probe = [f"{m}: first half {a:.2f}, repeated half {b:.2f} nats (gap {a - b:.2f})"
             for m, (a, b) in v.probe_halves.items()]
    return ("In-context-learning score on the validation windows — " + "; ".join(parts)
            + ". Probe — " + "; ".join(probe) + ".")


# ------------------------------------------------------------------------------ layout
def layout(**query: Any) -> html.Div:
    """Prompt B, model B, head, position and target from the URL; five views; ICL curves."""
    q, problems = P.parse_query(CONTROLS, query)
    names = registry().names()
    options = [{"label": "auto (see help)", "value": ""}] + [{"label": n, "value": n}
                                                            for n in names]
    if q["model_b"] and q["model_b"] not in names:
        options.append({"label": q["model_b"], "value": q["model_b"]})
    return P.page_layout(
        PAGE, "Compare",
        description="A clean and a corrupted prompt, the one-layer and the two-layer model: "
                    "side by side and as differences (B − A).",
        controls=[
            P.text_control(PAGE, "text_b", q["text_b"], "prompt B",
                           placeholder="empty: the same prompt as A"),
            P.select_control(PAGE, "model_b", q["model_b"], options, "model B"),
            P.number_control(PAGE, "layer", q["layer"], "layer", min=0, placeholder="auto"),
            P.number_control(PAGE, "head", q["head"], "head", min=0, placeholder="auto"),
            P.number_control(PAGE, "position", q["position"], "position"),
            P.text_control(PAGE, "target", q["target"], "target",
                           placeholder="A's top prediction"),
            P.number_control(PAGE, "k", q["k"], "top k", min=1, max=50),
            P.number_control(PAGE, "windows", q["windows"], "ICL windows", min=1,
                             max=MAX_WINDOWS),
        ],
        body=[html.Div(id=NOTE, className="small mb-2"),
              dbc.Row([dbc.Col(P.graph(PAGE, "loss"), lg=6),
                       dbc.Col(P.graph(PAGE, "predictions"), lg=6)]),
              P.graph(PAGE, "attention"),
              dbc.Row([dbc.Col(P.graph(PAGE, "lens"), lg=5),
                       dbc.Col(P.graph(PAGE, "dla"), lg=7)]),
              html.H4("In-context learning", className="mt-4"),
              JS.job_strip(PAGE),
              html.Div(id=ICL_ALERTS),
              html.Div(id=ICL_NOTE, className="small mb-2"),
              dcc.Store(id=ICL_QUERY),
              P.graph(PAGE, "icl")],
        help_md=HELP, query=q, problems=problems)


# ----------------------------------------------------------------------------- callbacks
@callback(*P.main_outputs(PAGE, GRAPHS, [Output(NOTE, "children")]),
          *P.main_inputs(PAGE, CONTROLS))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=len(GRAPHS) + 1)
def update(state: dict, query: dict) -> tuple:
    """Forward both sides (cached), compare, draw the five views."""
    c = comparison(state, query)
    figs = (loss_compare_figure(c), predictions_compare_figure(c), attention_compare_figure(c),
            lens_compare_figure(c), dla_compare_figure(c))
    return (*figs, describe(c))


@callback(Output(P.control_id(PAGE, "position"), "value"),
          Input(P.graph_id(PAGE, "loss"), "clickData"), prevent_initial_call=True)
def select_position(click: Any) -> int:
    """Clicking the loss of the token at position k shows the predictions made at k − 1."""
    point = (click or {}).get("points", [{}])[0]
    x = point.get("x")
    if not isinstance(x, (int, float)) or x < 1:
        raise PreventUpdate
    return int(x) - 1


ICL_OUTPUTS = [Output(P.graph_id(PAGE, "icl"), "figure"), Output(ICL_NOTE, "children"),
               JS.job_output(PAGE), Output(ICL_ALERTS, "children"),
               Output(ICL_QUERY, "data")]


@callback(*ICL_OUTPUTS, *P.main_inputs(PAGE, ICL_CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(ICL_PAGE, ICL_CONTROLS, n_outputs=3)
@JS.in_background(2)
def update_icl(state: dict, query: dict) -> tuple:
    """The in-context-learning curves (background jobs the first time for each model)."""
    v = icl(state, query)
    return (icl_figure(v.dataset, v.probe, v.scores, v.probe_len), icl_note(v))


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update_icl, ICL_OUTPUTS, list(ICL_CONTROLS))
