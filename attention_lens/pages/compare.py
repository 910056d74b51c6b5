"""/compare: two prompts, or two models with one tokenizer, side by side and as differences."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import Input, Output, callback, html
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis.compare import (
    Comparison,
    IclView,
    compare,
    icl_from_curves,
    same_tokenizer,
)
from ..analysis.datasets import DEFAULT_LENGTH, MAX_WINDOWS, SHIPPED
from ..analysis.defaults import card_head
from ..analysis.errors import AnalysisError
from ..components import page as P
from ..components import shell
from ..components.controls import Int, Text
from ..figures.compare import (
    HEIGHTS,
    attention_compare_figure,
    dla_compare_figure,
    icl_figure,
    lens_compare_figure,
    loss_compare_figure,
    predictions_compare_figure,
)

PAGE = "compare"


class ModelChoice:
    """Model B: any model of the registry, or "auto" (see the help).

    (A plain class: Dash imports page modules outside ``sys.modules``.)
    """

    name, default, label = "model_b", "", "model B"

    def parse(self, raw: Any, cfg: Any = None) -> tuple[str, Optional[str]]:
        """A model name, or "" for auto (an unknown name is reported when loaded)."""
        text = "" if raw is None or raw == AUTO else str(raw)
        if len(text) > 120:
            return "", "model_b: the name is too long"
        return text, None

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled drop-down of the registry's models."""
        return dbc.InputGroup([dbc.InputGroupText(self.label),
                               dbc.Select(id=P.control_id(page, self.name),
                                          options=model_b_options(value),
                                          value=value or AUTO)],
                              size="sm", className="al-control")


#: The drop-down's value for "choose model B for me" ("" in the URL and the API).
AUTO = "auto"


def model_b_options(value: Any, auto_name: Optional[str] = None) -> list[dict]:
    """The drop-down's options: "auto" (naming the model it picked, once known), then every
    model of the registry (and an unknown typed name, reported when loaded)."""
    names = P.model_names()
    auto = f"auto: {auto_name}" if auto_name else "auto (see help)"
    options = [{"label": auto, "value": AUTO}] + [{"label": n, "value": n} for n in names]
    if value and value != AUTO and value not in names:
        options.append({"label": str(value), "value": str(value)})
    return options


CONTROLS = [
    Text("text_b", "", 2000, label="prompt B", placeholder="empty: the same prompt as A"),
    ModelChoice(),
    Int("layer", None, 0, label="layer", placeholder="auto"),
    Int("head", None, 0, label="head", placeholder="auto"),
    Int("position", -1, label="position"),
    Text("target", "", 40, label="target", placeholder="A's top prediction"),
    Int("k", 10, 1, 50, label="top k"),
    Int("windows", 64, 1, MAX_WINDOWS, label="ICL windows"),
]

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


def auto_model_b(state: dict, query: dict) -> str:
    """The name of model B the page compares with (auto: as the help text says)."""
    lm_a = P.model(state.get("model"))
    text_b = query["text_b"] if query["text_b"].strip() else state["text"]
    name_b = query["model_b"].strip()
    if not name_b:
        name_b = lm_a.name
        if text_b == state["text"]:  # one prompt: compare with another model that fits
            for other in P.model_names():
                if other != lm_a.name and not same_tokenizer(lm_a, P.model(other)):
                    name_b = other
                    break
    return name_b


def models_of(state: dict, query: dict) -> tuple[Any, Any, str]:
    """Models A and B and B's prompt (defaults as the help text says)."""
    lm_a = P.model(state.get("model"))
    text_b = query["text_b"] if query["text_b"].strip() else state["text"]
    lm_b = P.model(auto_model_b(state, query))
    reason = same_tokenizer(lm_a, lm_b)
    if reason:
        raise AnalysisError(reason)
    return lm_a, lm_b, text_b


def default_head(lm_a: Any, lm_b: Any) -> tuple[int, int]:
    """The deeper model's strongest probe induction head from its card, else L0H0."""
    deeper = lm_b if lm_b.cfg.n_layers > lm_a.cfg.n_layers else lm_a
    return card_head(deeper) or (0, 0)


def comparison(state: dict, query: dict) -> Comparison:
    """The comparison of A and B for the page's controls."""
    lm_a, lm_b, text_b = models_of(state, query)
    d_layer, d_head = default_head(lm_a, lm_b)
    layer = d_layer if query["layer"] is None else query["layer"]
    head = d_head if query["head"] is None else query["head"]
    fp_a = P.forward_of(state["text"], lm_a.name)
    fp_b = P.forward_of(text_b, lm_b.name)
    return compare(lm_a, fp_a, lm_b, fp_b, layer=layer, head=head, position=query["position"],
                   k=query["k"], target=query["target"] or None)


def icl(ctx: P.PageContext, state: dict, query: dict) -> IclView:
    """Loss-by-position curves of A (and B) over the validation windows and the probe.

    The dataset curves are weight-and-dataset analyses (background jobs the first time).
    """
    lm_a, lm_b, _ = models_of(state, query)
    models = [lm_a] if lm_b is lm_a else [lm_a, lm_b]
    ds = W.load_dataset(SHIPPED)
    length = min(lm_a.cfg.n_ctx, DEFAULT_LENGTH)
    req = W.loss_by_position(ds.name, ds.sha256, length, length, query["windows"])
    store = W.store()
    if ctx.compute:
        curves = [ctx.weight(req)] + [store.compute(lm, req) for lm in models[1:]]
    else:
        missing = []
        for lm in models:
            try:
                store.get(lm, req)
            except W.Missing as exc:
                missing.append((lm.name, exc))
        if missing:
            raise missing[0][1]
        curves = [store.get(lm, req)[0] for lm in models]
    probe = ctx.weight(W.probe_head_scores())
    probes = [ctx.weight(W.probe_loss())] + [
        store.compute(lm, W.probe_loss()) if ctx.compute else store.get(lm, W.probe_loss())[0]
        for lm in models[1:]]
    return icl_from_curves(curves, probes, probe.seq_len, probe.bos is not None)


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



def panels(ctx: P.PageContext, query: dict) -> list:
    """The five side-by-side views, what is compared, and the in-context-learning curves."""
    c = comparison(ctx.state, query)
    v = icl(ctx, ctx.state, query)
    return [P.Panel("loss", loss_compare_figure(c),
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
                     "b_minus_a": c.dla_diff}),
            P.Panel("icl", icl_figure(v.dataset, v.probe, v.scores, v.probe_len),
                    {"scores": v.scores, "probe_halves": v.probe_halves,
                     "dataset": v.dataset, "probe": v.probe}),
            P.Html("what", describe(c)),
            P.Html("icl-note", icl_note(v))]


def body(parts: dict) -> list:
    """What is compared, the five views, then the in-context-learning curves."""
    return [html.Div(parts["what"], className="small mb-2"),
            dbc.Row([dbc.Col(parts["loss"], lg=6), dbc.Col(parts["predictions"], lg=6)]),
            parts["attention"],
            dbc.Row([dbc.Col(parts["lens"], lg=5), dbc.Col(parts["dla"], lg=7)]),
            html.H4("In-context learning", className="mt-4"),
            html.Div(parts["icl-note"], className="small mb-2"),
            parts["icl"]]


P.register_page(
    __name__, path="/compare", name="Compare", order=17, heading="Compare",
    title="Compare · Attention Lens",
    description="A clean and a corrupted prompt, the one-layer and the two-layer model: side "
                "by side and as differences (B − A); in-context-learning curves.",
    help_md=HELP, panels=panels, graphs=["loss", "predictions", "attention", "lens", "dla", "icl"],
    extras=["what", "icl-note"], controls=CONTROLS, body=body,
    graph_options={name: {"height": h} for name, h in HEIGHTS.items()})


@callback(Output(P.control_id(PAGE, "position"), "value"),
          Input(P.graph_id(PAGE, "loss"), "clickData"), prevent_initial_call=True)
def select_position(click: Any) -> int:
    """Clicking the loss of the token at position k shows the predictions made at k − 1."""
    point = (click or {}).get("points", [{}])[0]
    x = point.get("x")
    if not isinstance(x, (int, float)) or x < 1:
        raise PreventUpdate
    return int(x) - 1


@callback(Output(P.control_id(PAGE, "model_b"), "options"),
          Input(shell.STATE, "data"), Input(P.query_id(PAGE), "data"))
def name_auto_model(state: Optional[dict], query: Optional[dict]) -> list[dict]:
    """The drop-down names the model "auto" compares with (it is never blank)."""
    if not state or not state.get("text"):
        raise PreventUpdate
    q = {"text_b": "", "model_b": "", **(query or {})}
    value = q.get("model_b") or AUTO
    try:
        name = auto_model_b(state, {"text_b": str(q["text_b"] or ""),
                                    "model_b": "" if value == AUTO else str(value)})
    except (AnalysisError, KeyError, ValueError):
        name = None
    return model_b_options(value, name if value == AUTO else None)
