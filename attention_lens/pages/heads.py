"""/heads: every head's metrics over a dataset, a head finder, top examples; all heads at once."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import (
    Input,
    Output,
    State,
    callback,
    clientside_callback,
    dash_table,
    dcc,
    html,
    no_update,
)
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis.attention import attention_patterns
from ..analysis.datasets import (
    DEFAULT_LENGTH,
    DEFAULT_WINDOWS,
    MAX_UPLOAD_BYTES,
    DatasetInput,
    MAX_WINDOWS,
    SHIPPED,
    check_window_args,
    dataset_names,
    parse_upload,
    remember_upload,
)
from ..analysis.errors import AnalysisError
from ..analysis.head_metrics import (
    ALL_METRICS,
    HEAD_METRICS,
    PATTERN_METRICS,
    HeadExample,
    HeadMetrics,
    head_examples,
    head_table,
)
from ..components import page as P
from ..components import shell
from ..components.controls import Choice, Int
from ..figures.heads_dashboard import (
    HEIGHTS,
    LABELS,
    all_heads_query_figure,
    head_finder_figure,
    head_values_figure,
    prompt_tokens_figure,
)
from ..figures.theme import styled

PAGE = "heads"
TABLE, UPLOAD, UPLOADED, UPLOAD_STATUS = (f"{PAGE}-table-grid", f"{PAGE}-upload",
                                          f"{PAGE}-uploaded", f"{PAGE}-upload-status")
TOKEN_ALERTS, PROMPT, ALL_HEADS = (f"{PAGE}-token-alerts", f"{PAGE}-prompt-graph",
                                   f"{PAGE}-all-heads-graph")
N_EXAMPLES = 5
METRIC_LABELS = {m: LABELS[m] for m in ALL_METRICS}


class DatasetChoice:
    """The dataset control: the shipped set, files of the datasets folders, uploads.

    (A plain class: Dash imports page modules outside ``sys.modules``, where a dataclass
    cannot be built.)
    """

    name, default, label = "dataset", SHIPPED, "dataset"

    def parse(self, raw: Any, cfg: Any = None) -> tuple[str, Optional[str]]:
        """A dataset name (checked when the page loads it)."""
        if raw is None or raw == "":
            return self.default, None
        text = str(raw)
        if len(text) > 120:
            return self.default, "dataset: the name is too long"
        return text, None

    def widget(self, page: str, value: Any, cfg: Any = None) -> dbc.InputGroup:
        """A labelled drop-down of the datasets this server has."""
        names = dataset_names()
        if value not in names:
            names.append(value)
        options = [{"label": "validation split (shipped)" if n == SHIPPED else
                    (f"uploaded file {n[7:15]}…" if n.startswith("upload:") else n), "value": n}
                   for n in names]
        return dbc.InputGroup([dbc.InputGroupText(self.label),
                               dbc.Select(id=P.control_id(page, self.name), options=options,
                                          value=value)], size="sm", className="al-control")


CONTROLS = [
    DatasetChoice(),
    Int("windows", DEFAULT_WINDOWS, 1, MAX_WINDOWS, label="windows"),
    Int("length", None, 4, hi=lambda cfg: cfg.n_ctx, label="tokens",
        placeholder="min(context, 128)"),
    Int("stride", None, 1, 100_000, label="stride", placeholder="= tokens"),
    Choice("x", "previous_token", ALL_METRICS, label="x", labels=METRIC_LABELS),
    Choice("y", "induction", ALL_METRICS, label="y", labels=METRIC_LABELS),
    Choice("metric", "induction", PATTERN_METRICS, label="examples by", labels=METRIC_LABELS),
    Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="layer", placeholder="auto"),
    Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head", placeholder="auto"),
    Int("query", None, 0, label="token", placeholder="last"),
]

HELP = r"""
Over windows of a dataset (a window: $n$ tokens of the dataset's token stream, one starting
every *stride* tokens; documents are joined by the end-of-text token), every head's pattern
$A$ on window tokens $t$ is averaged over queries $i \ge 1$ (position 0 can only attend to
itself), every query of every window weighing the same:

| metric | per query $i$ | queries |
|---|---|---|
| previous-token | $A[i, i-1]$ | all |
| induction | $\sum_{j:\,t_{j-1}=t_i,\,1\le j\le i} A[i,j]$ | $t_i$ seen before |
| duplicate-token | $\sum_{j < i:\ t_j = t_i} A[i, j]$ | $t_i$ seen before |
| first-token (sink) | $A[i, 0]$ | all |
| self | $A[i, i]$ | all |
| entropy | $-\sum_j A[i, j] \ln A[i, j]$ (nats) | all |
| copying (OV) | $\mathrm{Re}(\sum\lambda)/\sum\lvert\lambda\rvert$ of $W_E W_{OV} W_U$ | weights |

**Head finder**: any two metrics on the axes, one colour per layer; click a point (or a table
row) to select the head. **Examples**: the windows where the selected head's metric (the
window's mean over its queries) is largest, then windows at the 10th … 90th percentile; each
shows the head's attention from the window's query where the metric is largest (outlined),
the metric's target tokens underlined. **All heads at once**: hover a token of the prompt
to see every head's attention from it (rows: heads, columns: earlier tokens); click pins it.
Runs are cached per model weights and dataset content.
"""

UPLOAD_CHECK = """
function(contents, filename) {
    const dc = window.dash_clientside;
    if (!contents) { return [dc.no_update, dc.no_update]; }
    const b64 = contents.split(',')[1] || '';
    const bytes = Math.floor(b64.length * 3 / 4);
    if (bytes > %d) {
        return [null, 'The file ' + filename + ' is ' + Math.round(bytes / 1024) +
                ' KiB; at most %d KiB can be uploaded (cut it, or put it in a datasets ' +
                'folder on the server).'];
    }
    return [{contents: contents, filename: filename}, 'Reading ' + filename + '…'];
}
""" % (MAX_UPLOAD_BYTES, MAX_UPLOAD_BYTES // 1024)


# ------------------------------------------------------------------------------ analysis
def dataset_input(lm: Any, query: dict) -> DatasetInput:
    """What the page's run reads: the dataset (by its identity: name and content hash) and
    how it is cut into windows."""
    ds = W.load_dataset(query["dataset"])
    length = query["length"] or min(lm.cfg.n_ctx, DEFAULT_LENGTH)
    stride = query["stride"] or length
    check_window_args(lm, length, stride, query["windows"])
    return DatasetInput(ds.name, ds.sha256, length, stride, query["windows"], ds)


def selected(hm: HeadMetrics, query: dict) -> tuple[int, int]:
    """The head asked for, else the head with the largest value of the examples' metric."""
    layer, head = query["layer"], query["head"]
    if layer is None or head is None:
        best_l, best_h, _ = hm.ranking(query["metric"], 1)[0]
        layer = best_l if layer is None else layer
        head = best_h if head is None else head
    return layer, head


def table(hm: HeadMetrics) -> dash_table.DataTable:
    """Every head with every metric, sortable by any column."""
    rows = [{**r, "id": r["head"]} for r in head_table(hm)]
    cols = [{"name": "head", "id": "head"}] + [
        {"name": LABELS[m], "id": m, "type": "numeric", "format": {"specifier": ".3f"}}
        for m in hm.metrics]
    return dash_table.DataTable(
        id=TABLE, data=rows, columns=cols, sort_action="native", page_size=12,
        sort_by=[{"column_id": "induction", "direction": "desc"}],
        style_table={"overflowX": "auto"},
        style_header={"backgroundColor": "#303030", "color": "#dee2e6", "fontWeight": "bold",
                      "whiteSpace": "normal", "height": "auto"},
        style_cell={"backgroundColor": "#222222", "color": "#dee2e6", "border": "1px solid #444",
                    "fontFamily": "Menlo, Consolas, monospace", "fontSize": "12px",
                    "minWidth": "4.5rem", "padding": "2px 6px"},
        style_data_conditional=[{"if": {"state": "active"}, "backgroundColor": "#375a7f",
                                 "border": "1px solid #ffffff"}])


#: Above this share of the largest weight, a token's orange highlight (over the dark page)
#: is bright enough that black text contrasts with it more than white does.
STRONG = 0.61


def _token(j: int, tok: str, ex: HeadExample, top: float) -> html.Span:
    weight = float(ex.attention[j])
    style: dict[str, Any] = {"padding": "0 1px", "whiteSpace": "pre", "borderRadius": "2px"}
    if j <= ex.query:
        alpha = min(1.0, weight / top)
        style["backgroundColor"] = f"rgba(230, 159, 0, {alpha:.3f})"
        if alpha > STRONG:  # black text where white would fade into the orange
            style["color"] = "#000000"
    else:  # after the query: fainter, still readable (>= 4.5:1 on either theme)
        style["opacity"] = 0.7
    if j == ex.query:
        style["outline"] = "2px solid #ffffff"
    if ex.targets[j]:
        style["textDecoration"] = "underline"
    title = f"{j}: '{tok}'" + (f" ← {weight:.3f}" if j <= ex.query else " (after the query)")
    return html.Span(tok, title=title, style=style, className="al-token")


def example_view(ex: HeadExample) -> html.Div:
    """One window as text, coloured by the head's attention from the outlined query."""
    top = max(float(ex.attention[: ex.query + 1].max()), 1e-9)
    lead = (f"{ex.percentile}th percentile" if ex.percentile is not None else "top")
    head = (f"{lead}: window {ex.window} (stream offset {ex.start}), query {ex.query} "
            f"'{ex.display[ex.query]}', window {LABELS[ex.metric]} {ex.value:.3f}, "
            f"largest weight {top:.3f}")
    return html.Div([html.Div(head, className="small text-muted"),
                     html.Div([_token(j, t, ex, top) for j, t in enumerate(ex.display)],
                              style={"lineHeight": "1.7", "wordBreak": "break-word"},
                              className="al-example-text")],
                    className="al-example mb-2", **{"data-window": str(ex.window)})


def examples_of(registry: Any, lm: Any, hm: HeadMetrics, metric: str, layer: int, head: int
                ) -> tuple[list, list]:
    """A head's top examples and deciles (:func:`head_examples`: a forward pass of their
    windows each), kept with the model's weight analyses under the dataset's hash, so that
    a second visit does not run them again."""
    w = hm.windows
    return registry.weights(
        lm.name, ("head-examples", w.sha256, w.describe(), metric, layer, head, N_EXAMPLES),
        lambda m: (head_examples(m, hm, metric, layer, head, n=N_EXAMPLES),
                   head_examples(m, hm, metric, layer, head, deciles=True)))


def examples_view(top: list, dec: list, metric: str, layer: int, head: int) -> list[Any]:
    """The top examples then the deciles of a head."""
    if not top:
        return [html.P(f"No window has a query for {LABELS[metric]} (e.g. no repeated "
                       "token).")]
    return [html.H5(f"L{layer}H{head}: top {len(top)} windows by {LABELS[metric]}"),
            *[example_view(e) for e in top],
            html.H5("Deciles"), *[example_view(e) for e in dec]]


def links(state: dict, layer: int, head: int) -> list[Any]:
    """Links to the selected head on the per-prompt pages."""
    def link(path: str, label: str, extra: dict) -> Any:
        href = shell.page_href(path, state, **extra)
        return dbc.Button(label, href=href, size="sm", color="secondary", outline=True,
                          className="me-2", external_link=False)

    return [html.Span(f"L{layer}H{head} on this prompt: ", className="me-2"),
            link("/attention", "attention pattern", {"layer": layer, "head": head}),
            link("/weights", "OV/QK weights", {"layer": layer, "head": head}),
            link("/patching", "path patching from it", {"sender": f"L{layer}H{head}"})]


def panels(ctx: P.PageContext, query: dict) -> list:
    """Table, head finder, the selected head's distribution and examples, links, a note."""
    lm = ctx.model
    hm = ctx.run(HEAD_METRICS, data=dataset_input(lm, query))
    layer, head = selected(hm, query)
    w = hm.windows
    note = (f"{lm.name} on {w.describe()} (sha256 {w.sha256[:12]}…); induction and "
            f"duplicate-token average over {hm.n_queries['induction']:,} queries with an "
            f"earlier copy, the others over {hm.n_queries['previous_token']:,} queries.")
    return [P.Panel("finder", head_finder_figure(hm, query["x"], query["y"], (layer, head)),
                    {"rows": head_table(hm), "x": query["x"], "y": query["y"],
                     "windows": w.describe(), "sha256": w.sha256}),
            P.Panel("values", head_values_figure(hm, query["metric"], layer, head),
                    {"layer": layer, "head": head, "metric": query["metric"],
                     "deciles": hm.deciles(query["metric"], layer, head),
                     "top": hm.examples(query["metric"], layer, head, N_EXAMPLES)}),
            P.Html("table", table(hm)),
            P.Html("examples", examples_view(*examples_of(ctx.registry, lm, hm, query["metric"],
                                                          layer, head),
                                             query["metric"], layer, head)),
            P.Html("links", links(ctx.state, layer, head)),
            P.Notice(note)]


def body(parts: dict) -> list:
    """Upload box, table beside the head finder, the head's examples, all heads at once."""
    return [
        html.Div([
            dcc.Upload(html.Div(["Drop or ", html.A("choose"), " a .txt or .jsonl file "
                                 f"(at most {MAX_UPLOAD_BYTES // 1024} KiB) to use as the "
                                 "dataset"]),
                       id=UPLOAD, multiple=False, className="al-upload",
                       style={"border": "1px dashed #777", "borderRadius": "4px",
                              "padding": "6px 10px", "textAlign": "center",
                              "cursor": "pointer"}),
            dcc.Store(id=UPLOADED),
            html.Div(id=UPLOAD_STATUS, className="small mt-1", **{"aria-live": "polite"}),
        ], className="mb-2"),
        dbc.Row([dbc.Col(parts["table"], lg=6, className="mb-3"),
                 dbc.Col(parts["finder"], lg=6)]),
        html.Div(parts["links"], className="my-2"),
        dbc.Row([dbc.Col(parts["values"], lg=5),
                 dbc.Col(html.Div(parts["examples"], className="al-examples",
                                  style={"maxHeight": "640px", "overflowY": "auto"}), lg=7)]),
        html.H4("All heads at once", className="mt-4"),
        html.Div(id=TOKEN_ALERTS),
        html.Div(dcc.Graph(id=PROMPT, figure=P.empty_figure(), config=P.graph_config(
            "heads-prompt"), className="al-graph-plot"), className="al-graph"),
        html.Div(dcc.Graph(id=ALL_HEADS, figure=P.empty_figure(), config=P.graph_config(
            "heads-all-heads"), className="al-graph-plot"), className="al-graph"),
    ]


P.register_page(
    __name__, path="/heads", name="Heads", order=16, heading="Heads over a dataset",
    title="Heads · Attention Lens",
    description="Every head's behaviour over many windows of text, not one prompt: find heads "
                "by their metrics, read their strongest and typical examples.",
    help_md=HELP, panels=panels, graphs=["finder", "values"],
    extras=["table", "examples", "links"], controls=CONTROLS, body=body,
    graph_options={name: {"height": h} for name, h in HEIGHTS.items()})


# ----------------------------------------------------------------------------- callbacks
def token_panels(state: dict, pinned: Optional[int]) -> tuple[Any, Any]:
    """The prompt as tokens, and every head's attention from token ``pinned`` (last: None)."""
    lm, fp = P.model(state.get("model")), P.forward(state)
    pos = fp.n_tokens - 1 if pinned is None else pinned
    if not 0 <= pos < fp.n_tokens:
        raise AnalysisError(f"token {pos} is outside the prompt ({fp.n_tokens} tokens)")
    every = attention_patterns(lm, fp)
    return (prompt_tokens_figure(fp.display, pos),
            all_heads_query_figure(every.patterns, fp.display, pos))


@callback(Output(PROMPT, "figure"), Output(ALL_HEADS, "figure"), Output(PROMPT, "style"),
          Output(ALL_HEADS, "style"), Output(TOKEN_ALERTS, "children"),
          Input(shell.STATE, "data"), Input(P.control_id(PAGE, "query"), "value"),
          Input(PROMPT, "hoverData"))
def token_view(state: Optional[dict], query: Any = None, hover: Optional[dict] = None) -> tuple:
    """The prompt as tokens and every head's attention from the hovered (or pinned) token."""
    if not state or not state.get("text"):
        raise PreventUpdate
    try:
        pinned, problem = CONTROLS[-1].parse(query)
        if problem:
            raise AnalysisError(problem)
        if P.triggered_id() == PROMPT:
            point = (hover or {}).get("points", [{}])[0]
            hovered = point.get("customdata")
            if not isinstance(hovered, int) or hovered < 0:
                raise PreventUpdate
            pinned = hovered
        figs = tuple(styled(f, state.get("theme")) for f in token_panels(state, pinned))
        # the boxes get the figures' heights: a box left to size itself can stay 0 px high
        return (*figs, *({"height": f"{f.layout.height}px"} for f in figs), [])
    except AnalysisError as exc:
        return no_update, no_update, no_update, no_update, shell.alert(str(exc))


@callback(Output(P.control_id(PAGE, "query"), "value"),
          Input(PROMPT, "clickData"), prevent_initial_call=True)
def pin_token(click: Optional[dict]) -> int:
    """Clicking a token pins the all-heads view to it (and writes it into the URL)."""
    point = (click or {}).get("points", [{}])[0]
    pos = point.get("customdata")
    if not isinstance(pos, int) or pos < 0:
        raise PreventUpdate
    return pos


@callback(Output(P.control_id(PAGE, "layer"), "value"),
          Output(P.control_id(PAGE, "head"), "value"),
          Input(P.graph_id(PAGE, "finder"), "clickData"), Input(TABLE, "active_cell"),
          prevent_initial_call=True)
def select_head(click: Optional[dict], cell: Optional[dict]) -> tuple[int, int]:
    """A click on a head-finder point or a table row selects that head."""
    if P.triggered_id() == TABLE:
        row = (cell or {}).get("row_id")
        if not isinstance(row, str) or not row.startswith("L") or "H" not in row:
            raise PreventUpdate
        layer, head = row[1:].split("H")
        return int(layer), int(head)
    point = (click or {}).get("points", [{}])[0]
    custom = point.get("customdata")
    if not isinstance(custom, list) or len(custom) != 2:
        raise PreventUpdate
    return int(custom[0]), int(custom[1])


clientside_callback(UPLOAD_CHECK, Output(UPLOADED, "data"), Output(UPLOAD_STATUS, "children"),
                    Input(UPLOAD, "contents"), State(UPLOAD, "filename"),
                    prevent_initial_call=True)


@callback(Output(P.control_id(PAGE, "dataset"), "options"),
          Output(P.control_id(PAGE, "dataset"), "value"),
          Output(UPLOAD_STATUS, "children", allow_duplicate=True),
          Input(UPLOADED, "data"), State(P.control_id(PAGE, "dataset"), "options"),
          prevent_initial_call=True)
def read_upload(data: Optional[dict], options: Optional[list]) -> tuple:
    """Check an uploaded file and make it the page's dataset (or say why it cannot be)."""
    if not data or not data.get("contents"):
        raise PreventUpdate
    name = str(data.get("filename") or "upload")
    try:
        raw = base64.b64decode(str(data["contents"]).split(",", 1)[-1], validate=True)
        ds = parse_upload(raw, name)
    except (binascii.Error, ValueError) as exc:
        message = str(exc) if isinstance(exc, AnalysisError) else \
            f"the file {name!r} could not be read"
        return no_update, no_update, shell.alert(message, color="warning")
    try:
        key = W.keep_upload(ds)
    except W.store_errors() as exc:
        return no_update, no_update, shell.alert(
            f"The file {name!r} was read but the server's store cannot keep it right now "
            f"({type(exc).__name__}): try the upload again in a moment.", color="warning")
    remember_upload(ds)
    opts = [o for o in (options or []) if o.get("value") != key]
    opts.append({"label": f"{name} (uploaded, {len(ds.documents)} documents)", "value": key})
    return opts, key, shell.alert(f"Using {name}: {len(ds.documents)} documents, "
                                  f"{ds.n_chars:,} characters.", color="success")
