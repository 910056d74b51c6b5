"""/patching: activation patching beside attribution patching, and path patching, on a pair."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis import patching as PT
from ..analysis.defaults import answered_pair
from ..analysis.errors import AnalysisError
from ..analysis.labels import head_label, parse_head, parse_head_label
from ..components import page as P
from ..components import shell
from ..components.pair_upload import keep_uploaded_pairs
from ..components.controls import Choice, Int, Text
from ..figures.patching import (
    pair_set_figure,
    patching_figure,
    patching_scatter_figure,
    path_patching_figure,
)
from ..figures.tokens import quoted

PAGE = "patching"
USE_PROMPT = "patching-use-prompt"
UPLOAD, UPLOAD_STATUS = f"{PAGE}-upload", f"{PAGE}-upload-status"

HELP = r"""
A **pair** is a clean prompt $x_c$ and a corrupted prompt $x_r$ of the same token length.
The **metric** $m$ is read on the final logits at one position (default: the last): the
logit difference $LD = \mathrm{logit}[a] - \mathrm{logit}[b]$ between the correct answer
$a$ and the wrong one $b$; normalised, $(LD - LD_r)/(LD_c - LD_r)$ (clean = 1,
corrupted = 0); $\log p(a)$; or $\mathrm{KL}(p_c \,\|\, p)$.

**Activation patching** (Meng et al. 2022; Wang et al. 2022): *denoising* runs $x_r$ and
replaces one activation by its value on $x_c$; *noising* runs $x_c$ with one activation from
$x_r$. Each cell is one patched run; the heatmap shows the change of the metric it causes
(red: towards the metric's increase). The numbers equal TransformerLens'
`patching.get_act_patch_*` on the same weights. A patch at layer $l$ and position $p$
changes nothing before $l$ or before $p$, so each run is recomputed from the patch on only.

**Attribution patching** (Nanda 2023) estimates every cell at once to first order,
$m(\text{patched}) - m \approx (a_{\text{source}} - a_{\text{base}}) \cdot \partial m /
\partial a$, from one forward and one backward pass; the scatter compares it with the exact
cells (equal where $m$ is linear in $a$, e.g. last-layer heads of an attention-only model).

**Path patching** (Wang et al. 2022): the sender head's output, taken from the source run,
reaches one receiver head's query, key or value input only; the network is then recomputed
from the receiver on. Two variants (the "MLPs between" control): **MLPs recomputed** (the
default; Wang et al., as ARENA's IOI code implements it) runs the base prompt with the
sender's output from the source run and every other attention head frozen at its base
value, the MLPs between sender and receiver recomputed on that residual stream, and feeds
the receiver's input from it; **MLPs frozen** adds only the sender's change to the
receiver's input, every other component (the MLPs too) at its base value. They agree on
attention-only models. "Direct to logits" sends the sender's output into the final residual
stream only (through the recomputed MLPs in the first variant).

**The default example** (attn-only-2l): the second half repeats the first; the corrupted
prompt changes the earlier " h" of " holiday" to " and", so no earlier token follows " h"
and the model predicts " house" instead of " holiday" (logit difference 6.9 clean, −3.0
corrupted). Head output × position, denoising, lights up the **previous-token head L0H2 at
position 20** ("olid"), the position after the corrupted token (it writes "the previous token was
' h'" there, which the induction heads' keys look for), and the **induction heads L1H5,
L1H0, L1H6 and L1H10 at the last position**, which copy "olid" from there. Path patching
from L0H2 shows that its effect goes through those heads' **keys**. **Click a head's cell**
to open that head on the Attention page.

Empty boxes are filled for you: the corrupted prompt as the clean one with the earlier copy
of the last token changed; the answers as the clean and the corrupted prompt's top
predictions.
"""


def _sender(text: str, lm: Any) -> Optional[tuple[int, int]]:
    if not text.strip():
        return None
    head = parse_head(text)
    if head is None:
        raise AnalysisError(f"cannot read the sender {text[:20]!r}: write a head as L0H2 or 0.2")
    return head


DEFAULT_SENDER = "L0H2"
#: Above this many heads, per-head × position grids open as one row a layer.
MANY_HEADS = 48
DEFAULTS = (PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED, PT.DEFAULT_CORRECT, PT.DEFAULT_WRONG)


def resolve(lm: Any, query: dict, limit: Optional[int] = None
            ) -> tuple[dict[str, Any], list[str]]:
    """The pair and metric to patch (empty boxes filled) and sentences saying what was filled."""
    notes = []
    clean, corrupted = query["clean"], query["corrupted"]
    untouched = (clean, corrupted, query["correct"], query["wrong"]) == DEFAULTS
    if untouched and not PT.default_fits(lm):
        # the measured example is in the shipped models' tokens: a pair this model answers,
        # else one built in its tokens
        pair = answered_pair(lm, limit)
        if pair is not None:
            clean, corrupted = pair.clean, pair.corrupted
            query = {**query, "correct": pair.correct, "wrong": pair.wrong}
            notes.append(pair.reason)
        else:
            clean, corrupted = PT.short_default(lm)
            query = {**query, "correct": "", "wrong": ""}
            notes.append("The default example does not fit this model (its tokenizer or "
                         "context), so the page uses a sentence followed by its own "
                         "beginning, corrupted at the earlier copy of its last word.")
    if not corrupted.strip():
        corrupted, c, old, new = PT.corrupt_one_token(lm, clean)
        notes.append(f"Corrupted prompt: the clean prompt with token {c} "
                     f"{quoted(lm.tokenizer.display(old))} changed to "
                     f"{quoted(lm.tokenizer.display(new))}.")
    correct, wrong = query["correct"], query["wrong"]
    if not correct or not wrong:
        auto_c, auto_w = PT.default_answers(lm, clean, corrupted, query["position"])
        if not correct:
            correct = auto_c
            notes.append(f"Correct answer: the clean prompt's top prediction "
                         f"{quoted(lm.tokenizer.display(auto_c))}.")
        if not wrong:
            wrong = auto_w
            notes.append(f"Wrong answer: the corrupted prompt's top prediction "
                         f"{quoted(lm.tokenizer.display(auto_w))}.")
    return dict(clean=clean, corrupted=corrupted, correct=correct, wrong=wrong,
                metric=query["metric"], direction=query["direction"],
                position=query["position"]), notes


def _answer(lm: Any, answer: Any) -> str:
    """An answer as the page shows it: its token in quotes."""
    if isinstance(answer, int):
        return quoted(lm.tokenizer.display(answer))
    return quoted(lm.tokenizer.display(lm.tokenizer.encode(str(answer))[0])) \
        if lm.tokenizer.encode(str(answer)) else quoted(str(answer))


def _prompt_line(label: str, ids: list[int], other: list[int], disp: Any) -> Any:
    """One prompt whole, token by token, the tokens where it differs from the other marked."""
    return html.Div([html.Span(label, className="al-pair-label"),
                     html.Span([html.Span(disp(t), className="al-token" + (
                         " al-diff" if t != o else ""), title=f"{i}: {disp(t)!r}")
                                for i, (t, o) in enumerate(zip(ids, other))],
                               className="al-pair-tokens")], className="al-pair-line")


def _answers(lm: Any, args: dict) -> Any:
    """The pair actually computed (both prompts whole, their difference marked), its
    answers in the context of the prompt's last token, and both prompts' top predictions."""
    top_c, top_r = PT.pair_predictions(lm, args["clean"], args["corrupted"], args["position"])
    disp = lm.tokenizer.display
    clean, corrupted = PT.pair_tokens(lm, args["clean"], args["corrupted"])
    pos = args["position"] if args["position"] >= 0 else len(clean) + args["position"]
    at = quoted(disp(clean[pos])) if 0 <= pos < len(clean) else ""
    return html.Div([
        html.Div("Computed on this pair (the tokens that differ are marked):",
                 className="al-rank-title"),
        _prompt_line("clean", clean, corrupted, disp),
        _prompt_line("corrupted", corrupted, clean, disp),
        html.Div([html.Span("Answers after ", className="al-rank-title"),
                  html.Span(f"{at} (position {pos}): "),
                  html.Span("correct ", className="al-rank-title"),
                  html.Span(_answer(lm, args["correct"])),
                  html.Span(" · wrong ", className="al-rank-title"),
                  html.Span(_answer(lm, args["wrong"]))]),
        html.Div([html.Span("Top predictions: clean ", className="al-rank-title"),
                  html.Span(", ".join(quoted(disp(i)) for i in top_c)),
                  html.Span(" · corrupted ", className="al-rank-title"),
                  html.Span(", ".join(quoted(disp(i)) for i in top_r))]),
    ], className="al-choice al-pair")


def _cells_note(lm: Any, grid: PT.PatchingGrid) -> str:
    parts = []
    for index, effect in PT.strongest_cells(grid, 5):
        named = dict(zip(grid.axes, index))
        where = ("L{layer}H{head}" if "head" in named else "L{layer}").format(**named)
        if "pos" in named:
            where += f" at {named['pos']} {quoted(grid.clean_display[named['pos']])}"
        parts.append(f"{where} ({effect:+.2f})")
    return "Strongest cells: " + ", ".join(parts) + "."


def panels(ctx: P.PageContext, query: dict) -> list:
    """Exact and attribution grids, their scatter, path patching from the sender head."""
    lm = ctx.model
    limit = getattr(ctx.registry, "max_tokens", None)
    args, notes = resolve(lm, query, limit)
    n_tokens = len(PT.pair_tokens(lm, args["clean"], args["clean"])[0])
    if limit is not None and n_tokens > limit:
        raise AnalysisError(f"the clean prompt has {n_tokens} tokens; this server analyses at "
                            f"most {limit}")
    # answers the page chose are token ids and stay ints (a digit string would be read as
    # text: '15249' is two tokens); typed answers are text
    wa = {**args, **{k: args[k] if isinstance(args[k], int) else str(args[k])
                     for k in ("correct", "wrong")}}
    pair = PT.PairInput.one(lm, **wa)
    granularity = query["granularity"]
    n_heads = lm.cfg.n_layers * lm.cfg.n_heads
    if granularity == "head_out_by_pos" and query["rows"] == "auto" and n_heads > MANY_HEADS:
        # a layer's attention output is the sum of its heads': one row a layer first
        granularity = "attn_out"
        notes.append(f"{lm.name} has {n_heads} heads: the grids patch each layer's attention "
                     "output (all its heads at once) × position first; choose 'every head' "
                     "in 'head rows' for one row per head.")
    grid = ctx.run(PT.PATCHING, pair=pair, granularity=granularity, attribution=True)
    parts: list[Any] = [P.Panel("exact", patching_figure(grid, "exact"), grid),
                        P.Panel("attribution", patching_figure(grid, "attribution"), grid),
                        P.Panel("scatter", patching_scatter_figure(grid),
                                {"exact": grid.effect, "attribution": grid.attribution_effect,
                                 "correlation": grid.correlation}),
                        P.Html("answers", _answers(lm, args))]
    sender = _sender(query["sender"], lm)
    if sender is not None and query["sender"] == DEFAULT_SENDER and not (
            sender[0] < lm.cfg.n_layers and sender[1] < lm.cfg.n_heads):
        sender = (0, 0)  # the shipped models' previous-token head does not exist here
        notes.append(f"Path patching from L0H0 ({DEFAULT_SENDER} does not exist in {lm.name}).")
    if sender is not None:
        layer, head = sender
        if not (0 <= layer < lm.cfg.n_layers and 0 <= head < lm.cfg.n_heads):
            raise AnalysisError(f"sender L{layer}H{head} does not exist: {lm.name} has "
                                f"{lm.cfg.n_layers} layers of {lm.cfg.n_heads} heads")
        path = ctx.run(PT.PATH_PATCHING, pair=pair, sender=[layer, head],
                       mlps=query["mlps"])
        parts.append(P.Panel("path", path_patching_figure(path), path))
    notes.append(_cells_note(lm, grid))
    if query["pairs"]:
        pairs = PT.PairInput.stored_set(lm, W.stored_pair_set(query["pairs"]), query["pairs"],
                                        metric=query["metric"], direction=query["direction"],
                                        position=query["position"])
        res = ctx.run(PT.PATCHING, pair=pairs, granularity=granularity, attribution=True)
        parts.append(P.Panel("pair-set", pair_set_figure(res), res))
        notes.append(f"The set of pairs: {len(res.grids)} pairs, per-pair grids in its "
                     f"CSV/JSON download.")
    else:
        parts.append(P.Panel("pair-set", P.empty_figure(
            "Upload a set of pairs (above) to see the mean grid over them"), None))
    return parts + [P.Notice(" ".join(notes))]


SPEC = P.register_page(
    __name__, path="/patching", name="Patching", order=14,
    heading="Activation, attribution and path patching",
    title="Patching · Attention Lens",
    description="Does this head matter for this behaviour? Patch activations between a "
                "clean and a corrupted prompt and watch the answer come back.",
    help_md=HELP, panels=panels,
    graphs=["exact", "attribution", "scatter", "path", "pair-set"], extras=["answers"],
    controls=[
        Text("clean", PT.DEFAULT_CLEAN, max_len=4000, label="clean prompt"),
        Text("corrupted", PT.DEFAULT_CORRUPTED, max_len=4000, label="corrupted prompt",
             placeholder="the clean prompt with one token changed"),
        Text("correct", PT.DEFAULT_CORRECT, max_len=40, label="correct answer",
             placeholder="clean top prediction"),
        Text("wrong", PT.DEFAULT_WRONG, max_len=40, label="wrong answer",
             placeholder="corrupted top prediction"),
        Choice("metric", "logit_diff", PT.METRICS, label="metric", labels=PT.METRIC_LABELS),
        Choice("direction", "denoising", PT.DIRECTIONS, label="direction",
               labels={"denoising": "denoising (clean into corrupted)",
                       "noising": "noising (corrupted into clean)"}),
        Choice("granularity", "head_out_by_pos", PT.GRANULARITIES, label="patch",
               labels=PT.GRANULARITY_LABELS),
        Choice("rows", "auto", ("auto", "heads"), label="head rows",
               labels={"auto": f"one a layer first above {MANY_HEADS} heads",
                       "heads": "every head"}),
        Int("position", -1, label="metric position", placeholder="-1 = last"),
        Text("sender", DEFAULT_SENDER, max_len=12, label="path-patching sender",
             placeholder="e.g. L0H2"),
        Choice("mlps", "recomputed", PT.MLP_MODES, label="path patching: MLPs between",
               labels=PT.MLP_MODE_LABELS),
        Text("pairs", "", max_len=64, label="set of pairs",
             placeholder="upload a CSV or JSON below"),
    ],
    body=lambda parts: [html.Div(dbc.Button(
                            "Patch the prompt bar's text", id=USE_PROMPT, size="sm",
                            color="info", outline=True,
                            title="Clean prompt = the text in the prompt bar; the corrupted "
                                  "prompt, the answers: chosen for it"),
                            className="mb-2"),
                        parts["answers"],
                        dbc.Row([dbc.Col(parts["exact"], lg=6),
                                 dbc.Col(parts["attribution"], lg=6)]),
                        dbc.Row([dbc.Col(parts["scatter"], lg=5),
                                 dbc.Col(parts["path"], lg=7)]),
                        html.Div([
                            dcc.Upload(html.Div([
                                "Sets of pairs: drop or ", html.A("choose"),
                                " a CSV (columns clean, corrupted, correct, wrong) or a JSON "
                                f"list of such objects, at most {PT.MAX_PAIRS} pairs"]),
                                id=UPLOAD, multiple=False, className="al-upload"),
                            html.Div(id=UPLOAD_STATUS)]),
                        parts["pair-set"]],
)


@callback(Output(P.control_id(PAGE, "pairs"), "value"), Output(UPLOAD_STATUS, "children"),
          Input(UPLOAD, "contents"), State(UPLOAD, "filename"), prevent_initial_call=True)
def upload_pairs(contents: Optional[str], filename: Optional[str]) -> tuple:
    """Check an uploaded set of pairs, keep it in the shared store, name it in the URL."""
    return keep_uploaded_pairs(contents, filename)


@callback(Output(P.control_id(PAGE, "clean"), "value", allow_duplicate=True),
          Output(P.control_id(PAGE, "corrupted"), "value", allow_duplicate=True),
          Output(P.control_id(PAGE, "correct"), "value", allow_duplicate=True),
          Output(P.control_id(PAGE, "wrong"), "value", allow_duplicate=True),
          Input(USE_PROMPT, "n_clicks"), State(shell.STATE, "data"), prevent_initial_call=True)
def use_prompt(clicks: Optional[int], state: Optional[dict]) -> tuple:
    """The prompt bar's text becomes the clean prompt; the corrupted prompt (one token
    changed) and the answers (the two prompts' top predictions) are left to the page."""
    text = (state or {}).get("text") or ""
    if not clicks or not text.strip():
        raise PreventUpdate
    return text, "", "", ""


@callback(Output(shell.LOCATION, "href", allow_duplicate=True),
          Input(P.graph_id(PAGE, "exact"), "clickData"),
          Input(P.graph_id(PAGE, "attribution"), "clickData"),
          State(shell.STATE, "data"), State(P.control_id(PAGE, "clean"), "value"),
          prevent_initial_call=True)
def open_head(exact: Optional[dict], attribution: Optional[dict], state: Optional[dict],
              clean: Optional[str]) -> Any:
    """A click on a head's cell opens that head on /attention, on the clean prompt."""
    click = attribution if P.triggered_id() == P.graph_id(PAGE, "attribution") else exact
    if not click or not state:
        raise PreventUpdate
    point = click["points"][0]
    head = parse_head_label(point.get("y"))
    if head is None:  # a layer-level grid: the column is the head
        layer = parse_head_label(f"{point.get('y')}{point.get('x')}")
        head = layer
    if head is None:
        return no_update
    return shell.page_href("/attention", {"model": state.get("model", ""),
                                          "text": clean or state.get("text", "")},
                           layer=head[0], head=head[1])


__all__ = ["SPEC", "head_label", "open_head", "panels", "resolve", "upload_pairs", "use_prompt"]
