"""/circuit: edge-level circuit discovery (EAP, EAP-IG, exact edge patching) on a pair, with
the circuit's faithfulness beside random circuits."""

from __future__ import annotations

import os
import json
from typing import Any, Optional
from urllib.parse import quote

import numpy as np
from dash import Input, Output, State, callback, clientside_callback, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis import patching as PT
from ..analysis.circuit import ABLATION_LABELS, ABLATIONS, METHOD_LABELS, METHODS
from ..analysis.circuit.declared import CIRCUIT
from ..analysis.circuit.declared import DEFAULT_THRESHOLD as ACDC_THRESHOLD
from ..analysis.circuit.discovery import (
    CURVE_INLINE_FLOP,
    DEFAULT_K,
    DEFAULT_RANDOM,
    DEFAULT_SIZES,
    EDGES_PER_KEPT,
    MOVER_MIN_ATTENTION,
    SEARCHES,
    curve_csv,
    curve_json,
    curve_runs,
    curve_size,
    default_k,
)
from ..analysis.defaults import answered_pair
from ..analysis.circuit.graph import edge_graph
from ..analysis.circuit.scores import MAX_STEPS
from ..analysis.errors import AnalysisError
from ..analysis.predictions import token_id
from ..components import page as P
from ..components import job_strip, shell
from ..components.pair_upload import keep_uploaded_pairs
from ..components.controls import Choice, Int, Text
from ..figures.circuit import circuit_figure, edge_scores_figure, faithfulness_figure
from ..figures.tokens import quoted

PAGE = "circuit"
UPLOAD, UPLOAD_STATUS = f"{PAGE}-upload", f"{PAGE}-upload-status"
#: Largest export offered as a direct download link (bytes of text).
LINK_BYTES = 2_000_000
SEARCH_LABELS = {"top_k": "top k edges by |score|",
                 "acdc": "ACDC: greedy removal below a threshold"}
#: The faithfulness figure's marker of a curve still to compute: "next" (the circuit's job
#: has ended; the page starts the curve's job), "running" (its job is under way).
CURVE_PENDING = "al-curve-pending"
CURVE_WATCH = f"{PAGE}-curve-watch"
#: The threshold box's default: the declaration's (metric units), so the page and the API
#: run ACDC alike.
DEFAULT_THRESHOLD = f"{ACDC_THRESHOLD:g}"

HELP = r"""
The model as a graph of **edges**: every component that writes into the residual stream
(the input embedding, each head's output $z W_O$, each MLP) sends an edge to every later
component that reads it: each head's **query, key and value input** separately
(TransformerLens' `use_split_qkv_input`), each MLP's input and the logits. A receiver's input
is the sum of its senders' outputs, and an edge is one term of that sum.

**Edge scores** on a clean/corrupted pair (the same pairs, answers and metric $m$ as
/patching), each an estimate of $m(\text{edge ablated}) - m(\text{clean})$, where ablating the
edge $u \to v$ replaces $u$'s term in $v$'s input by its ablated value $\bar a_u$ (by default
$u$'s activation on the corrupted prompt):
- **EAP** (Syed et al. 2023): $(\bar a_u - a_u(x_c)) \cdot \partial m / \partial
  \mathrm{in}_v$, the gradient taken on the **clean** run; one forward and one backward pass.
- **EAP-IG** (Hanna et al. 2024): the gradient averaged over the points
  $x' + \tfrac{k}{K}(x_c - x')$, $k = 1..K$, on the line from the ablated input embedding
  $x'$ to the clean one ($K$ = steps; one step is EAP).
- **Exact edge patching**: each edge ablated alone, every other edge at its clean value, the
  network recomputed: the ground truth the estimates are drawn against (small models only).

**The circuit**: the $k$ edges of largest $|\text{score}|$, pruned to the edges on a path from
the input to the logits; or **ACDC** (Conmy et al. 2023): from the logits back, each edge is
ablated for good when that moves the circuit's metric by less than the threshold (in the
metric's units), then the rest is pruned the same way (one run per edge: slower).
**Faithfulness** (Wang et al. 2022; Miller et al. 2024): the clean
run with every edge outside the circuit ablated,
$(m(C) - m(\varnothing)) / (m(\text{full}) - m(\varnothing))$: 1 with every edge, 0 with none.
It depends on the ablation (zero; mean over the set's prompts, position by position; resample
= the corrupted prompt), so the curve shows all three, each beside 20 random circuits of the
same number of edges (band: 5–95 %).

**The default example** (attn-only-2l, the /patching pair): the circuit found is the induction
circuit: the previous-token head **L0H2** (reading the input through its value) feeds the
**keys** of the layer-1 induction heads L1H5, L1H6, L1H0 and L1H10, which write the answer to
the logits. The drawing is position by position (EAP and EAP-IG split each edge's score by
the position of the term it changes): the previous-token head reads the earlier copy's first
token through its value, writes at the next position, and the induction heads read it there
through their keys. Click a head in the drawing to open it on /attention, or use the list's
links to /attention, /qk or /patching.
"""


def _n_edges(cfg: Any) -> Optional[int]:
    return edge_graph(cfg).n_edges if cfg is not None else None


def resolve(lm: Any, query: dict, limit: Optional[int] = None
            ) -> tuple[dict[str, Any], list[str]]:
    """The pair and answers to analyse (empty boxes filled as /patching fills them) and
    sentences saying what was filled."""
    notes = []
    clean, corrupted = query["clean"], query["corrupted"]
    defaults = (PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED, PT.DEFAULT_CORRECT, PT.DEFAULT_WRONG)
    correct, wrong = query["correct"], query["wrong"]
    if (clean, corrupted, correct, wrong) == defaults and not PT.default_fits(lm):
        chosen = answered_pair(lm, limit)
        if chosen is not None:  # a pair this model answers (the IOI pair on real models)
            clean, corrupted = chosen.clean, chosen.corrupted
            correct, wrong = chosen.correct, chosen.wrong
            notes.append(chosen.reason)
        else:
            clean, corrupted = PT.short_default(lm)
            correct = wrong = ""
            notes.append("The default example does not fit this model, so the page uses a "
                         "sentence followed by its own beginning, corrupted at the earlier "
                         "copy of its last word.")
    if not clean.strip():
        raise AnalysisError("type a clean prompt")
    if not corrupted.strip():
        corrupted, c, old, new = PT.corrupt_one_token(lm, clean)
        notes.append(f"Corrupted prompt: the clean prompt with token {c} "
                     f"{quoted(lm.tokenizer.display(old))} changed to "
                     f"{quoted(lm.tokenizer.display(new))}.")
    if not correct or (not wrong and query["metric"] in ("logit_diff", "normalized")):
        auto_c, auto_w = PT.default_answers(lm, clean, corrupted, query["position"])
        if not correct:
            correct = auto_c
            notes.append(f"Correct answer: the clean prompt's top prediction "
                         f"{quoted(lm.tokenizer.display(auto_c))}.")
        if not wrong:
            wrong = auto_w
            notes.append(f"Wrong answer: the corrupted prompt's top prediction "
                         f"{quoted(lm.tokenizer.display(auto_w))}.")
    return dict(clean=clean, corrupted=corrupted, correct=correct, wrong=wrong), notes


def threshold(query: dict) -> float:
    """The ACDC threshold typed in the box, checked."""
    raw = str(query.get("threshold") or "").strip() or DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise AnalysisError(f"the ACDC threshold must be a number >= 0 (in the metric's "
                            f"units), got {raw[:40]!r}")
    return value


def pair_input(lm: Any, query: dict, pair: dict) -> PT.PairInput:
    """What the declared circuit discovery reads: the page's pair (its boxes, filled), or
    the uploaded set of pairs the URL names (from the shared store; a job's request carries
    its content hash, not its text)."""
    if not query["pairs"]:
        return PT.PairInput.one(lm, pair["clean"], pair["corrupted"], pair["correct"],
                                pair["wrong"] if pair["wrong"] != "" else None,
                                metric=query["metric"], position=query["position"])
    return PT.PairInput.stored_set(lm, W.stored_pair_set(query["pairs"]), query["pairs"],
                                   metric=query["metric"], position=query["position"])


def circuit_values(query: dict, sizes: tuple[int, int], curve: bool = True) -> dict:
    """The declared circuit discovery's parameters (:data:`CIRCUIT`) the page's controls
    give, with a faithfulness curve of ``sizes`` (sizes, random circuits per size) when
    ``curve``."""
    acdc = query.get("search") == "acdc"
    return CIRCUIT.values(dict(
        method=query["method"], ablation=query["ablation"], steps=query["steps"],
        k=query["k"], n_sizes=int(sizes[0]), n_random=int(sizes[1]), curve=bool(curve),
        search="acdc" if acdc else "top_k", threshold=threshold(query) if acdc else 0.0))


def curve_request(lm: Any, pair: PT.PairInput, values: dict) -> W.Request:
    """The store's request of the curve's own job: the circuit of ``values`` without its
    curve (from the store), then its curve."""
    return W.request("circuit_curve", pair=pair.to_json(), params=CIRCUIT.stored_params(values),
                     n_sizes=int(values["n_sizes"]), n_random=int(values["n_random"]))


def curve_plan(lm: Any, query: dict, n_tokens: Optional[int]) -> tuple[int, int, float, bool]:
    """The faithfulness curve's sizes and random circuits per size, sized from the model's
    cost (estimated floating-point work), and whether it runs in the circuit's own job."""
    n = n_tokens if n_tokens is not None else min(lm.cfg.n_ctx, 64)
    if query["position"] >= 0:
        n = min(n, query["position"] + 1)
    sizes, rand, work = curve_size(lm.cfg, [n])
    full = (sizes, rand) == (DEFAULT_SIZES, DEFAULT_RANDOM)
    inline = float(os.environ.get("ATTENTION_LENS_CIRCUIT_INLINE_FLOP", CURVE_INLINE_FLOP))
    return sizes, rand, work, full and work <= inline


def head_links(state: dict, pair: dict, layer: int, head: int, position: int) -> list[Any]:
    """Links from a circuit head to /attention and /qk (on the clean prompt) and /patching
    (this pair, path patching from the head)."""
    on_clean = {**state, "text": pair["clean"], "tid": None}
    return [html.A("attention", href=shell.page_href("/attention", on_clean, layer=layer, head=head)),
            " · ",
            html.A("QK", href=shell.page_href("/qk", on_clean, layer=layer, head=head, query=position)),
            " · ",
            html.A("path patching", href=shell.page_href(
                "/patching", state, clean=pair["clean"], corrupted=pair["corrupted"],
                correct=str(pair["correct"]), wrong=str(pair["wrong"]),
                sender=f"L{layer}H{head}"))]


def curve_pending_figure(state: str, sizes: int, rand: int, runs: int) -> Any:
    """The faithfulness panel while its curve is computed: what it will hold, and a marker
    (``layout.meta``) that starts its job once the circuit's has ended."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=f"The faithfulness curve ({sizes} sizes x {rand} random circuits "
                            f"per size, {len(ABLATIONS)} ablations: {runs} masked runs) is "
                            f"being computed as a job of its own.",
                       showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(height=200, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      meta={CURVE_PENDING: state}, title="faithfulness curve")
    return fig


def curve_due(drawn: Any) -> bool:
    """Whether a drawing of this page (see ``PageSpec.render``) ended the circuit's job with
    the curve's still to start (the browser starts it at once)."""
    fig = drawn.figures.get("faithfulness")
    meta = getattr(getattr(fig, "layout", None), "meta", None)
    return isinstance(meta, dict) and meta.get(CURVE_PENDING) == "next"


def _download(label: str, text: str, filename: str, mime: str) -> Any:
    if len(text) > LINK_BYTES:
        return html.Span(f"{label}: too large for a link ({len(text):,} characters); use the "
                         f"API", className="me-3")
    return html.A(label, href=f"data:{mime};charset=utf-8,{quote(text)}", download=filename,
                  className="me-3")


def _movers(ctx: P.PageContext, disc: Any, pair: dict) -> Any:
    """The circuit's heads that attend from the metric's position to the correct answer's
    earlier copies and write toward it (the name movers on the IOI pair)."""
    if not disc.movers:
        return html.P(f"No head of this circuit attends {MOVER_MIN_ATTENTION:g} or more from "
                      f"the metric's position to an earlier copy of the correct answer.",
                      className="small")
    n = len(disc.clean_display)
    answer = disc.clean_display[disc.movers[0].positions[0]]
    rows = [html.Tr([html.Td(m.name), html.Td(f"{m.attention:.2f}"), html.Td(f"{m.dla:+.2f}"),
                     html.Td("writes the answer" if m.dla > 0 else "writes against it"),
                     html.Td(head_links(ctx.state, pair, m.layer, m.head, n - 1))])
            for m in disc.movers]
    head = html.Thead(html.Tr([html.Th(h) for h in (
        "head", f"attention to {answer!r}", "direct logit attribution", "", "open")]))
    return html.Div([
        html.Div([html.Span("Heads that move the answer: ", className="al-rank-title"),
                  f"circuit heads attending {MOVER_MIN_ATTENTION:g} or more from the last "
                  f"position to {answer!r} (name movers on an IOI pair, induction heads on a "
                  f"repeated sequence), by their direct logit attribution (correct minus "
                  f"wrong answer)"], className="small mb-1"),
        html.Table([head, html.Tbody(rows)], className="table table-sm al-table")],
        className="mb-2")


def _heads_list(ctx: P.PageContext, disc: Any, pair: dict) -> Any:
    g = disc.scores.graph
    s = disc.scores.scores
    rows = []
    n = len(disc.clean_display)
    for layer, head in disc.heads():
        name = f"L{layer}H{head}"
        sender = g.head_sender(layer, head)
        out = s[disc.kept & (g.src == sender)]
        into = [r for r in range(len(g.receivers)) if g.receivers[r].startswith(name + ".")]
        inputs = sorted({g.receivers[r].split(".")[1]
                         for r in np.unique(g.dst[disc.kept & np.isin(g.dst, into)])})
        rows.append(html.Tr([
            html.Td(name), html.Td(", ".join(inputs) or "—"),
            html.Td(f"{len(out)} ({abs(out).sum():.3f})"),
            html.Td(head_links(ctx.state, pair, layer, head, n - 1))]))
    slug = f"{ctx.model.name}-circuit"
    settings = json.dumps(disc.to_json(), indent=1)
    downloads = html.Div([
        html.Span("Downloads: ", className="al-rank-title"),
        _download("circuit (JSON)", settings, f"{slug}.json", "application/json"),
        _download("edge scores (CSV)", disc.edge_csv(), f"{slug}-edges.csv", "text/csv")
        if g.n_edges * 24 <= LINK_BYTES else  # each row takes 24 characters or more
        html.Span(f"edge scores (CSV): {g.n_edges:,} edges, too large for a link; use the "
                  f"page's export or the API", className="me-3"),
        *([_download("faithfulness curves (CSV)", curve_csv(disc.curve), f"{slug}-curves.csv",
                     "text/csv")] if disc.curve is not None else [])], className="mb-2")
    head = html.Thead(html.Tr([html.Th(h) for h in ("head", "inputs in the circuit",
                                                   "edges out (Σ|score|)", "open")]))
    table = html.Table([head, html.Tbody(rows)], className="table table-sm al-table") \
        if rows else html.P("No head in this circuit.")
    return html.Div([downloads, _movers(ctx, disc, pair), table])


def panels(ctx: P.PageContext, query: dict) -> list:
    """The circuit, its faithfulness curve, its strongest edges and its heads."""
    lm = ctx.model
    limit = getattr(ctx.registry, "max_tokens", None)
    pair, notes = resolve(lm, query, limit) if not query["pairs"] else (
        dict(clean="", corrupted="", correct="", wrong=""), [])
    if not query["pairs"]:
        n_tokens = len(PT.pair_tokens(lm, pair["clean"], pair["corrupted"])[0])
        if limit is not None and n_tokens > limit:
            raise AnalysisError(f"the clean prompt has {n_tokens} tokens; this server analyses "
                                f"at most {limit}")
        # bad answers or position are an alert at once, not at the end of a job
        PT._check_position(query["position"], n_tokens)
        for key in ("correct", "wrong"):
            if pair[key] not in ("", None):
                try:
                    token_id(lm, pair[key])
                except AnalysisError as exc:
                    raise AnalysisError(f"{key} answer: {exc}") from None
    if query["method"] == "exact" and not query["pairs"]:
        from ..analysis.circuit.scores import check_exact_size

        check_exact_size(lm, edge_graph(lm.cfg).n_edges, [n_tokens])  # before any job
    if query.get("search") == "acdc":
        threshold(query)  # a bad threshold is an alert at once
    pair = {k: (v if isinstance(v, int) else str(v)) for k, v in pair.items()}
    n_edges = edge_graph(lm.cfg).n_edges
    if query["k"] == DEFAULT_K and default_k(n_edges) != DEFAULT_K:
        query = {**query, "k": default_k(n_edges)}
        notes.append(f"Edges taken by |score|: {query['k']} (by default one edge in "
                     f"{EDGES_PER_KEPT} of this model's {n_edges:,}, at least {DEFAULT_K}).")
    sizes, rand, work, inline = curve_plan(lm, query, None if query["pairs"] else n_tokens)
    pending = None
    pin = pair_input(lm, query, pair)
    values = circuit_values(query, (sizes, rand))
    if inline:
        disc = ctx.run(CIRCUIT, pair=pin, **values)
    else:
        # a big model: the circuit first (scores, circuit, its faithfulness), drawn at once;
        # then the curve's job (started by the browser, see CURVE_WATCH)
        first = {**values, "curve": False}
        job = W.declared(CIRCUIT, lm, pin, first)  # None: the circuit runs inline
        computed = True
        if job is not None and ctx.compute:
            try:
                W.store().get(lm, job)
            except W.Missing:
                computed = False  # computed by this job: the curve gets a job of its own
        disc = ctx.run(CIRCUIT, pair=pin, **first)
        full = None
        if computed:
            full = ctx.weight_or(curve_request(lm, pin, values), lambda: None)
        if full is None:
            pending = "running" if computed else "next"
        else:
            disc = full
    curve = disc.curve
    f = disc.faithfulness
    how = (f"ACDC, threshold {disc.settings['threshold']:g}: " if disc.settings.get("search")
           == "acdc" else "")
    notes.append(
        f"{how}{disc.n_kept} edges of {disc.scores.graph.n_edges} kept; faithfulness "
        + ", ".join(f"{a} {f[a]:.2f}" for a in ABLATIONS)
        + f". Clean metric {disc.scores.clean_metric:+.3f}, corrupted "
        f"{disc.scores.corrupted_metric:+.3f}"
        + (f" (mean over {disc.scores.n_pairs} pairs)." if disc.scores.n_pairs > 1 else "."))
    runs = curve_runs(sizes, rand)
    if (sizes, rand) != (DEFAULT_SIZES, DEFAULT_RANDOM):
        notes.append(f"Faithfulness curve sized from the model's cost: {sizes} sizes x "
                     f"{rand} random circuits per size under {len(ABLATIONS)} ablations "
                     f"({runs} masked runs, about {work / 1e12:.2f} TFLOP estimated; the "
                     f"default {DEFAULT_SIZES} x {DEFAULT_RANDOM} would take "
                     f"{curve_runs(DEFAULT_SIZES, DEFAULT_RANDOM)} runs)"
                     + (", computed next as its own job." if pending else "."))
    if curve is not None:
        a = curve.ablations.index(query["ablation"])
        reach = curve.edges_to_reach(0.8, query["ablation"])
        rand = curve.edges_to_reach(0.8, query["ablation"], random=True)
        notes.append(f"Under {query['ablation']} ablation, {reach} edges reach 80 % of the "
                     f"metric" if reach is not None else
                     f"Under {query['ablation']} ablation no circuit on the curve reaches 80 %")
        notes[-1] += (f"; random circuits need {rand}." if rand is not None else
                      "; random circuits of the same sizes do not (except all edges)."
                      if curve.faithfulness[a, -1] >= 0.8 else ".")
    return [P.Panel("circuit", circuit_figure(disc), disc.to_json()),
            P.Panel("faithfulness", faithfulness_figure(curve, (
                        disc.n_kept, disc.faithfulness,
                        "this ACDC circuit" if disc.settings.get("search") == "acdc"
                        else f"this circuit (top {disc.k})")) if curve is not None else
                    curve_pending_figure(pending or "running", sizes, rand, runs),
                    curve_json(curve) if curve is not None else None),
            P.Panel("edges", edge_scores_figure(disc),
                    {"edges": disc.scores.graph.edge_labels(),
                     "scores": disc.scores.scores, "in_circuit": disc.kept}),
            P.Html("heads", _heads_list(ctx, disc, pair if not query["pairs"] else {
                **pair, "clean": ctx.state.get("text", "")})),
            P.Notice(" ".join(notes))]


SPEC = P.register_page(
    __name__, path="/circuit", name="Circuit", order=15,
    heading="Circuit discovery: edge attribution and faithfulness",
    title="Circuit · Attention Lens",
    description="Which edges between heads carry the behaviour? Score every edge (EAP, "
                "EAP-IG or exact edge patching), keep the strongest, and check how much of "
                "the metric the circuit alone keeps, beside random circuits.",
    help_md=HELP, panels=panels,
    graphs=["circuit", "faithfulness", "edges"], extras=["heads"],
    controls=[
        Text("clean", PT.DEFAULT_CLEAN, max_len=4000, label="clean prompt"),
        Text("corrupted", PT.DEFAULT_CORRUPTED, max_len=4000, label="corrupted prompt",
             placeholder="the clean prompt with one token changed"),
        Text("correct", PT.DEFAULT_CORRECT, max_len=40, label="correct answer",
             placeholder="clean top prediction"),
        Text("wrong", PT.DEFAULT_WRONG, max_len=40, label="wrong answer",
             placeholder="corrupted top prediction"),
        Choice("metric", "logit_diff", PT.METRICS, label="metric", labels=PT.METRIC_LABELS),
        Int("position", -1, label="metric position", placeholder="-1 = last"),
        Choice("method", "eap", METHODS, label="edge scores", labels=METHOD_LABELS),
        Int("steps", 5, lo=1, hi=MAX_STEPS, label="EAP-IG steps"),
        Choice("ablation", "resample", ABLATIONS, label="ablation", labels=ABLATION_LABELS),
        Choice("search", "top_k", SEARCHES, label="circuit", labels=SEARCH_LABELS),
        Int("k", DEFAULT_K, lo=0, hi=_n_edges, label="edges kept (top k)"),
        Text("threshold", DEFAULT_THRESHOLD, max_len=40, label="ACDC threshold",
             placeholder="metric change, e.g. 0.05"),
        Text("pairs", "", max_len=64, label="set of pairs",
             placeholder="upload a CSV or JSON below"),
    ],
    body=lambda parts: [parts["circuit"],
                        html.Div([
                            dcc.Upload(html.Div([
                                "Sets of pairs: drop or ", html.A("choose"),
                                " a CSV (columns clean, corrupted, correct, wrong) or a JSON "
                                f"list of such objects, at most {PT.MAX_PAIRS} pairs; scores "
                                "are averaged over them"]),
                                id=UPLOAD, multiple=False, className="al-upload"),
                            html.Div(id=UPLOAD_STATUS),
                            dcc.Interval(id=CURVE_WATCH, interval=1000)]),
                        parts["heads"], parts["faithfulness"], parts["edges"]],
)


@callback(Output(P.control_id(PAGE, "pairs"), "value"), Output(UPLOAD_STATUS, "children"),
          Input(UPLOAD, "contents"), State(UPLOAD, "filename"), prevent_initial_call=True)
def upload_pairs(contents: Optional[str], filename: Optional[str]) -> tuple:
    """Check an uploaded set of pairs, keep it in the shared store, name it in the URL."""
    return keep_uploaded_pairs(contents, filename)


# Once the circuit's job has drawn the circuit with the curve still to compute (its figure's
# marker says "next"), the browser starts the curve's job by pressing the strip's Run again:
# the page's main callback runs again, the circuit comes from the store and the curve is
# missing. A watch in the browser (no server round trip) rather than a callback on the
# figure: a figure written by a background job does not trigger callbacks that read it.
clientside_callback(
    f"""function(n, figure, clicks) {{
        const meta = figure && figure.layout && figure.layout.meta;
        if (!meta || meta["{CURVE_PENDING}"] !== "next") {{
            return window.dash_clientside.no_update;
        }}
        const now = Date.now();
        if (window.alCurveNext && now - window.alCurveNext < 30000) {{
            return window.dash_clientside.no_update;
        }}
        window.alCurveNext = now;
        return (clicks || 0) + 1;
    }}""",
    Output(job_strip.ids(PAGE)["rerun"], "n_clicks", allow_duplicate=True),
    Input(CURVE_WATCH, "n_intervals"), State(P.graph_id(PAGE, "faithfulness"), "figure"),
    State(job_strip.ids(PAGE)["rerun"], "n_clicks"), prevent_initial_call=True)


@callback(Output(shell.LOCATION, "href", allow_duplicate=True),
          Input(P.graph_id(PAGE, "circuit"), "clickData"),
          State(shell.STATE, "data"), State(P.control_id(PAGE, "clean"), "value"),
          State(P.control_id(PAGE, "pairs"), "value"),
          prevent_initial_call=True)
def open_head(click: Optional[dict], state: Optional[dict], clean: Optional[str],
              pairs: Optional[str]) -> Any:
    """A click on a head in the circuit drawing opens it on /attention, on the clean prompt
    (the prompt bar's text when a set of pairs is analysed)."""
    if not click or not state:
        raise PreventUpdate
    data = click["points"][0].get("customdata")
    if not isinstance(data, list) or len(data) < 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in data[:2]):
        return no_update
    text = state.get("text", "") if pairs else (clean or state.get("text", ""))
    return shell.page_href("/attention", {**state, "text": text, "tid": None},
                           layer=data[0], head=data[1])


__all__ = ["SPEC", "circuit_values", "curve_due", "curve_pending_figure", "curve_request",
           "head_links", "open_head", "pair_input", "panels", "resolve", "threshold",
           "upload_pairs"]
