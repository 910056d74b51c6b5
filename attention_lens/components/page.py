"""Page scaffolding: query parameters, controls, graphs with export buttons, help, alerts.

Component ids are plain strings prefixed by the page (``"attention-layer"``) for a page's
own controls, and dicts for the widgets the shell handles on every page:
``{"type": "al-graph", "page": p, "name": n}`` (graphs), ``{"type": "al-query", "page": p}``
(the page's validated controls, written into the URL), ``{"type": "al-export", "page": p}``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import dash
import dash_bootstrap_components as dbc
import plotly.graph_objects as go
from dash import ALL, MATCH, Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import background
from .. import registry as registry_module
from .. import weight_analyses as W
from ..analysis.errors import AnalysisError
from ..figures.theme import TEMPLATE, styled
from . import job_strip, shell
from .controls import Control, parse_all

log = logging.getLogger(__name__)

GRAPH, QUERY, EXPORT, EXPORT_STATUS = "al-graph", "al-query", "al-export", "al-export-status"
IMAGE_BTN, DATA_BTN = "al-img", "al-data"


# ------------------------------------------------------------------------------ ids
def graph_id(page: str, name: str) -> dict[str, str]:
    """Id of a page's graph ``name``."""
    return {"type": GRAPH, "page": page, "name": name}


def query_id(page: str) -> dict[str, str]:
    """Id of the store holding a page's validated controls."""
    return {"type": QUERY, "page": page}


def alerts_id(page: str) -> str:
    """Id of the alert area the page's main callback writes."""
    return f"{page}-alerts"


def control_id(page: str, name: str) -> str:
    """Id of a page's control ``name``."""
    return f"{page}-{name}"


# ------------------------------------------------------------------- query parameters
@dataclass(frozen=True)
class IntParam:
    """An integer URL/control parameter with a default and optional bounds."""

    default: Optional[int]
    lo: Optional[int] = None
    hi: Optional[int] = None
    label: str = ""

    def parse(self, name: str, raw: Any) -> tuple[Optional[int], Optional[str]]:
        """The value of ``raw`` (text from the URL or a control value), and a problem or None."""
        if raw is None or raw == "":
            return self.default, None
        try:
            value = int(str(raw).strip())
        except (TypeError, ValueError):
            return self.default, f"{name} must be a whole number, got {str(raw)[:40]!r}"
        if self.lo is not None and value < self.lo:
            return self.lo, f"{name} {value} is below the smallest allowed value {self.lo}"
        if self.hi is not None and value > self.hi:
            return self.hi, f"{name} {value} is above the largest allowed value {self.hi}"
        return value, None


@dataclass(frozen=True)
class ChoiceParam:
    """A parameter taking one of a fixed set of strings."""

    default: str
    choices: tuple[str, ...]
    label: str = ""

    def parse(self, name: str, raw: Any) -> tuple[str, Optional[str]]:
        """The value of ``raw`` if it is one of ``choices``, else the default and a problem."""
        if raw is None or raw == "":
            return self.default, None
        if str(raw) in self.choices:
            return str(raw), None
        return self.default, (f"{name} must be one of {', '.join(self.choices)}, "
                              f"got {str(raw)[:40]!r}")


@dataclass(frozen=True)
class TextParam:
    """A free-text parameter (a target token, a list of heads, ...)."""

    default: str = ""
    max_len: int = 200
    label: str = ""

    def parse(self, name: str, raw: Any) -> tuple[str, Optional[str]]:
        """``raw`` as text, cut to ``max_len`` characters."""
        if raw is None:
            return self.default, None
        text = str(raw)
        if len(text) > self.max_len:
            return text[: self.max_len], f"{name} was cut to {self.max_len} characters"
        return text, None


Param = Any  # IntParam | ChoiceParam | TextParam


def parse_query(controls: dict[str, Param], raw: dict[str, Any]) -> tuple[dict[str, Any],
                                                                       list[str]]:
    """Validate a page's parameters: the values to use, and what was wrong with the input."""
    values, problems = {}, []
    for name, param in controls.items():
        value, problem = param.parse(name, raw.get(name))
        values[name] = value
        if problem:
            problems.append(problem)
    return values, problems


# ---------------------------------------------------------------------------- panels
@dataclass
class Panel:
    """One figure of a page with the data behind it (exported as CSV/JSON and in the zip)."""

    name: str
    figure: go.Figure
    data: Any = None


PanelsFn = Callable[[dict, dict], list[Panel]]
_PANELS: dict[str, PanelsFn] = {}
_CONTROLS: dict[str, dict[str, Param]] = {}


def register_panels(page: str, fn: PanelsFn, controls: Optional[dict[str, Param]] = None
                    ) -> PanelsFn:
    """Declare how to build a page's panels from (state, query); used by export and downloads."""
    _PANELS[page] = fn
    _CONTROLS[page] = dict(controls or {})
    return fn


def page_panels(page: str, state: dict, query: Optional[dict], compute: bool = False
                ) -> list[Panel]:
    """Build the figure panels of ``page`` (raises AnalysisError for bad input)."""
    spec = spec_of(page)
    if spec is not None:
        return spec.figure_panels(state, query, compute=compute)
    if page not in _PANELS:
        raise AnalysisError(f"the {page} page has no figures to export")
    values, _ = parse_query(_CONTROLS.get(page, {}), {k: v for k, v in (query or {}).items()
                                                       if k != "src"})
    panels = _PANELS[page](state, values)
    for p in panels:
        styled(p.figure, (state or {}).get("theme"))
    return panels


def themed(outputs: Sequence[Any], state: Optional[dict]) -> tuple[Any, ...]:
    """``outputs`` with every figure given the state's theme and the finishing layout pass."""
    theme = (state or {}).get("theme")
    return tuple(styled(o, theme) if isinstance(o, go.Figure) else o for o in outputs)


def figures_of(panels: Sequence[Panel]) -> tuple[go.Figure, ...]:
    """The figures of ``panels``, in order (a page's main callback returns these)."""
    return tuple(p.figure for p in panels)


#: Height (px) of the blank figure a graph shows before its first analysis.
EMPTY_HEIGHT = 320


def empty_figure(message: str = "") -> go.Figure:
    """A blank themed figure (shown before the first analysis or after an error)."""
    fig = go.Figure(layout=dict(template=TEMPLATE, xaxis=dict(visible=False),
                                yaxis=dict(visible=False), height=EMPTY_HEIGHT))
    if message:
        fig.add_annotation(text=message, showarrow=False, font=dict(size=14))
    return fig


# ------------------------------------------------------------------------ components
def graph_config(filename: str = "attention-lens") -> dict[str, Any]:
    """Plotly config: high-resolution PNG from the camera button, no cloud, no logo."""
    return {
        "displaylogo": False,
        "showSendToCloud": False,
        "showEditInChartStudio": False,
        "responsive": True,
        "toImageButtonOptions": {"format": "png", "scale": 3, "filename": filename},
    }


def graph(page: str, name: str, *, height: Optional[int] = None, **kwargs: Any) -> html.Div:
    """A graph with a loading indicator and PNG / SVG / CSV / JSON download buttons.

    The graph's box always has its figure's size: it starts at the blank figure's height
    and :data:`GRAPH_BOX` resizes it to each new figure's ``layout.height`` (and
    ``layout.width`` for figures wider than the page, which then scroll inside their box).
    The figure fills its box (``responsive``), so it follows the box's width.
    """
    style = {"height": f"{height or EMPTY_HEIGHT}px"}

    def button(label: str, kind: str, fmt: str) -> dbc.Button:
        return dbc.Button(label, id={"type": kind, "page": page, "name": name, "fmt": fmt},
                          size="sm", color="secondary", outline=True, n_clicks=0,
                          className="al-dl", title=f"Download this figure as {label}")

    return html.Div([
        html.Div(dcc.Loading(dcc.Graph(id=graph_id(page, name), figure=empty_figure(),
                                       config=graph_config(f"{page}-{name}"), style=style,
                                       responsive=True, className="al-graph-plot", **kwargs),
                             type="dot", delay_show=150), className="al-graph-scroll"),
        html.Div([html.Span("Download", className="al-dl-label"),
                  button("PNG", IMAGE_BTN, "png"), button("SVG", IMAGE_BTN, "svg"),
                  button("CSV", DATA_BTN, "csv"), button("JSON", DATA_BTN, "json")],
                 className="al-graph-toolbar"),
    ], className="al-graph")


def help_panel(markdown: str, title: str = "How to read this") -> html.Details:
    """A collapsible explanation with the formula (MathJax, served locally)."""
    return html.Details([html.Summary(title), dcc.Markdown(markdown, mathjax=True,
                                                           className="al-help-body")],
                        className="al-help")


def number_control(page: str, name: str, value: Optional[int], label: str, *,
                   min: Optional[int] = None, max: Optional[int] = None,  # noqa: A002
                   step: int = 1, placeholder: str = "") -> dbc.InputGroup:
    """A labelled number box (updates when the user leaves it or presses Enter)."""
    return dbc.InputGroup([
        dbc.InputGroupText(label),
        dbc.Input(id=control_id(page, name), type="number", value=value, min=min, max=max,
                  step=step, debounce=True, placeholder=placeholder, inputmode="numeric"),
    ], size="sm", className="al-control")


def select_control(page: str, name: str, value: Any, options: Iterable[Any],
                   label: str) -> dbc.InputGroup:
    """A labelled drop-down of fixed options."""
    opts = [o if isinstance(o, dict) else {"label": str(o), "value": o} for o in options]
    return dbc.InputGroup([
        dbc.InputGroupText(label),
        dbc.Select(id=control_id(page, name), options=opts, value=value),
    ], size="sm", className="al-control")


def text_control(page: str, name: str, value: str, label: str,
                 placeholder: str = "") -> dbc.InputGroup:
    """A labelled text box (updates when the user leaves it or presses Enter)."""
    return dbc.InputGroup([
        dbc.InputGroupText(label),
        dbc.Input(id=control_id(page, name), type="text", value=value, debounce=True,
                  placeholder=placeholder),
    ], size="sm", className="al-control")


def page_layout(page: str, title: str, *, description: Any = None,
                controls: Sequence[Any] = (), body: Sequence[Any] = (), help_md: str = "",
                query: Optional[dict] = None, problems: Sequence[str] = (),
                exportable: bool = True) -> html.Div:
    """The frame of an analysis page: title, export button, help, controls, alerts, body."""
    header = [html.H2(title, className="al-page-title")]
    if exportable:
        header.append(html.Div([
            dbc.Button("Export page", id={"type": EXPORT, "page": page}, n_clicks=0,
                       color="info", size="sm",
                       title="Download a zip: every figure as PNG and SVG, its data, "
                             "and a manifest"),
            dcc.Loading(html.Span(id={"type": EXPORT_STATUS, "page": page},
                                  className="al-export-status"), type="circle"),
        ], className="al-export"))
    url_alerts = [shell.alert("Link parameter: " + p, color="warning") for p in problems]
    return html.Div([
        html.Div(header, className="al-page-header"),
        html.P(description, className="al-description") if description else None,
        help_panel(help_md) if help_md else None,
        html.Div(list(controls), className="al-controls") if controls else None,
        html.Div(url_alerts, id=f"{page}-url-alerts"),
        html.Div(id=alerts_id(page), **{"aria-live": "polite"}),
        dcc.Store(id=query_id(page), data={**(query or {}), "src": "url"}),
        html.Div(list(body), className="al-body"),
    ], className=f"al-page al-page-{page}")


# ------------------------------------------------------------------------- callbacks
def main_outputs(page: str, names: Sequence[str], extra: Sequence[Output] = ()) -> list[Output]:
    """Outputs of a page's main callback: its graphs, extra outputs, alerts, query store."""
    return ([Output(graph_id(page, n), "figure") for n in names] + list(extra)
            + [Output(alerts_id(page), "children"), Output(query_id(page), "data")])


def main_inputs(page: str, controls: dict[str, Param], prop: str = "value") -> list[Input]:
    """Inputs of a page's main callback: the shared state, then each control."""
    return [Input(shell.STATE, "data")] + [Input(control_id(page, n), prop) for n in controls]


def triggered_id() -> Any:
    """The id of the input that fired the current callback (None outside a callback)."""
    try:
        return dash.ctx.triggered_id
    except Exception:  # noqa: BLE001 - called directly (tests)
        return None


def analysis_callback(page: str, controls: dict[str, Param], n_outputs: Optional[int] = None
                      ) -> Callable[[Callable[..., Sequence[Any]]], Callable[..., tuple]]:
    """Turn ``fn(state, query) -> outputs`` into a main callback body.

    It validates the controls, turns an :class:`AnalysisError` into an alert (never a
    traceback; the outputs keep their last value), and writes the validated controls to
    the page's query store, flagged ``src="user"`` when a control triggered the call so the
    URL gets a new history entry.
    """

    def deco(fn: Callable[..., Sequence[Any]]) -> Callable[..., tuple]:
        def inner(state: Optional[dict], *values: Any) -> tuple:
            if not state or not state.get("text"):
                raise PreventUpdate
            query, problems = parse_query(controls, dict(zip(controls, values)))
            trigger = triggered_id()
            src = "user" if isinstance(trigger, str) and trigger.startswith(f"{page}-") else "url"
            alerts: list[Any] = [shell.alert(p, color="warning") for p in problems]
            try:
                outs = themed(tuple(fn(state, query)), state)
            except AnalysisError as exc:
                alerts.append(shell.alert(str(exc)))
                outs = (no_update,) * (n_outputs or 0)
            except Exception:  # noqa: BLE001 - never a traceback in the browser
                log.exception("%s analysis failed", page)
                alerts.append(shell.alert(f"The {page} analysis failed on this input "
                                          "(details in the server log)."))
                outs = (no_update,) * (n_outputs or 0)
            return (*outs, alerts, {**query, "src": src})

        # not functools.wraps: dash's own wrapper must expose this body as ``__wrapped__``
        inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
        inner.__module__, inner.__qualname__ = fn.__module__, fn.__qualname__
        inner.analysis = fn  # type: ignore[attr-defined]
        return inner

    return deco


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe slug of ``text``."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].strip("-")
    return s or "prompt"


def export_filename(page: str, name: str, state: Optional[dict]) -> str:
    """Base file name of an exported figure: page, figure, model and prompt."""
    if not state:
        return f"{page}-{name}"
    return f"{page}-{name}-{slug(state.get('model', ''), 30)}-{slug(state.get('text', ''))}"


#: A graph's box takes its figure's height (and width, when the figure sets one), so a
#: figure never spills over what follows it; dcc.Graph drops the figure's own size when
#: it fills its box, and this puts it back on the box.
GRAPH_BOX = """
function(figure, style) {
    const lay = (figure && figure.layout) || {};
    const next = Object.assign({}, style || {});
    next.height = (lay.height || 450) + 'px';
    if (lay.width) { next.width = lay.width + 'px'; next.minWidth = '100%'; }
    else { delete next.width; delete next.minWidth; }
    if (style && style.height === next.height && style.width === next.width) {
        return window.dash_clientside.no_update;
    }
    return next;
}
"""

IMAGE_DOWNLOAD = """
function(clicks, state, ids) {
    const dc = window.dash_clientside;
    const t = dc.callback_context.triggered_id;
    if (!t || !t.fmt) { return dc.no_update; }
    const i = ids.findIndex(x => x.page === t.page && x.name === t.name && x.fmt === t.fmt);
    if (i < 0 || !clicks[i]) { return dc.no_update; }
    const gid = JSON.stringify({name: t.name, page: t.page, type: 'al-graph'});
    const host = document.getElementById(gid);
    const gd = host && (host.classList.contains('js-plotly-plot') ? host :
                        host.querySelector('.js-plotly-plot'));
    if (!gd || !window.Plotly) { return 'no figure to download'; }
    const slug = s => (s || '').replace(/[^A-Za-z0-9]+/g, '-').replace(/^-+|-+$/g, '')
                                 .slice(0, 40).replace(/-+$/, '') || 'prompt';
    const name = state ? [t.page, t.name, slug(state.model).slice(0, 30), slug(state.text)]
                         .join('-') : t.page + '-' + t.name;
    const fl = gd._fullLayout || {};
    window.Plotly.downloadImage(gd, {format: t.fmt, filename: name,
        width: fl.width || 900, height: fl.height || 500, scale: t.fmt === 'png' ? 3 : 1});
    return 'downloaded ' + name + '.' + t.fmt;
}
"""

CONFIG_FILENAMES = """
function(state, figures, ids, configs) {
    const dc = window.dash_clientside;
    const slug = s => (s || '').replace(/[^A-Za-z0-9]+/g, '-').replace(/^-+|-+$/g, '')
                                 .slice(0, 40).replace(/-+$/, '') || 'prompt';
    return ids.map(function (id, i) {
        const name = state ? [id.page, id.name, slug(state.model).slice(0, 30), slug(state.text)]
                             .join('-') : id.page + '-' + id.name;
        const cfg = configs[i] || {};
        const opts = cfg.toImageButtonOptions || {};
        // dcc.Graph applies a new config only with its next figure: also set it on the plot
        const host = document.getElementById(JSON.stringify({name: id.name, page: id.page,
                                                             type: id.type}));
        const gd = host && host.querySelector('.js-plotly-plot');
        if (gd && gd._context) {
            gd._context.toImageButtonOptions = Object.assign({}, opts, {filename: name});
        }
        if (opts.filename === name) { return dc.no_update; }
        return Object.assign({}, cfg, {toImageButtonOptions: Object.assign({}, opts,
                                                                      {filename: name})});
    });
}
"""


def register_shell_callbacks(app: dash.Dash) -> None:
    """Callbacks every page's widgets rely on: graph box sizes, downloads and page export."""
    app.clientside_callback(
        GRAPH_BOX, Output({"type": GRAPH, "page": MATCH, "name": MATCH}, "style"),
        Input({"type": GRAPH, "page": MATCH, "name": MATCH}, "figure"),
        State({"type": GRAPH, "page": MATCH, "name": MATCH}, "style"),
    )
    app.clientside_callback(
        IMAGE_DOWNLOAD, Output("shell-image-status", "children"),
        Input({"type": IMAGE_BTN, "page": ALL, "name": ALL, "fmt": ALL}, "n_clicks"),
        State(shell.STATE, "data"),
        State({"type": IMAGE_BTN, "page": ALL, "name": ALL, "fmt": ALL}, "id"),
        prevent_initial_call=True,
    )
    app.clientside_callback(
        CONFIG_FILENAMES, Output({"type": GRAPH, "page": ALL, "name": ALL}, "config"),
        Input(shell.STATE, "data"), Input({"type": GRAPH, "page": ALL, "name": ALL}, "figure"),
        State({"type": GRAPH, "page": ALL, "name": ALL}, "id"),
        State({"type": GRAPH, "page": ALL, "name": ALL}, "config"),
    )
    app.callback(
        Output(shell.DOWNLOAD, "data", allow_duplicate=True),
        Output(shell.ALERTS, "children", allow_duplicate=True),
        Input({"type": DATA_BTN, "page": ALL, "name": ALL, "fmt": ALL}, "n_clicks"),
        State({"type": DATA_BTN, "page": ALL, "name": ALL, "fmt": ALL}, "id"),
        State(shell.STATE, "data"), State({"type": QUERY, "page": ALL}, "data"),
        prevent_initial_call=True,
    )(download_data)
    app.callback(
        Output(shell.DOWNLOAD, "data", allow_duplicate=True),
        Output({"type": EXPORT_STATUS, "page": ALL}, "children"),
        Input({"type": EXPORT, "page": ALL}, "n_clicks"),
        State({"type": EXPORT, "page": ALL}, "id"),
        State(shell.STATE, "data"), State({"type": QUERY, "page": ALL}, "data"),
        prevent_initial_call=True,
    )(export_page)


def _clicked(clicks: list[Optional[int]], ids: list[dict]) -> Optional[dict]:
    trigger = triggered_id()
    for n, i in zip(clicks, ids):
        if n and (trigger is None or trigger == i):
            return i
    return None


def _page_query(page: str, queries: list[Optional[dict]]) -> dict:
    return next((q for q in queries if q), {})


def download_data(clicks: list[Optional[int]], ids: list[dict], state: Optional[dict],
                  queries: list[Optional[dict]]) -> tuple[Any, Any]:
    """CSV or JSON of one figure's data, rebuilt server-side from the cached forward pass."""
    from .. import export

    which = _clicked(clicks, ids)
    if which is None or not state:
        raise PreventUpdate
    try:
        panels = page_panels(which["page"], state, _page_query(which["page"], queries))
        panel = next((p for p in panels if p.name == which["name"]), None)
        if panel is None:
            raise AnalysisError(f"figure {which['name']!r} is not on this page")
        base = export_filename(which["page"], which["name"], state)
        if which["fmt"] == "csv":
            return dcc.send_string(export.figure_csv(panel.figure), f"{base}.csv"), no_update
        return dcc.send_string(export.panel_json(panel, state), f"{base}.json"), no_update
    except AnalysisError as exc:
        return no_update, shell.alert(f"Download failed: {exc}")
    except Exception:  # noqa: BLE001
        log.exception("data download failed")
        return no_update, shell.alert("Download failed (details in the server log).")


def export_page(clicks: list[Optional[int]], ids: list[dict], state: Optional[dict],
                queries: list[Optional[dict]]) -> tuple[Any, list[Any]]:
    """The "Export page" zip: every figure as PNG and SVG, its data, and a manifest."""
    from .. import export

    which = _clicked(clicks, ids)
    if which is None or not state:
        raise PreventUpdate
    statuses: list[Any] = [no_update] * len(ids)
    idx = ids.index(which)
    page = which["page"]
    query = _page_query(page, queries)
    try:
        with background.current().slots.job(f"export of {page}"):
            panels = page_panels(page, state, query, compute=True)
            fp = registry_module.current().forward(state["text"], state["model"])
            data = export.page_zip(page, panels, state, {k: v for k, v in query.items()
                                                         if k != "src"}, fp)
    except background.BusyError as exc:
        statuses[idx] = shell.alert(str(exc), color="warning")
        return no_update, statuses
    except export.ExportError as exc:
        statuses[idx] = shell.alert(str(exc), color="warning")
        return no_update, statuses
    except AnalysisError as exc:
        statuses[idx] = shell.alert(f"Export failed: {exc}")
        return no_update, statuses
    except Exception:  # noqa: BLE001
        log.exception("page export failed")
        statuses[idx] = shell.alert("Export failed (details in the server log).")
        return no_update, statuses
    name = f"{export_filename(page, 'page', state)}.zip"
    statuses[idx] = f"{len(panels)} figure(s), {len(data) / 1000:.0f} kB"
    return dcc.send_bytes(data, name), statuses


# ====================================================================== page declaration
@dataclass
class Html:
    """A part of a page that is not a figure (a table, a list), named once like a graph."""

    name: str
    children: Any


@dataclass
class Notice:
    """A note the page shows above its figures (what a default chose, what does not apply)."""

    text: str
    color: str = "info"


Part = Any  # Panel | Html | Notice


class PageContext:
    """What a page's panels function reads: the analysed prompt, the model, its analyses.

    ``model`` and ``forward`` come from the process's registry (the forward pass cached);
    ``weights(...)`` returns weight analyses from the shared store. In a page's main
    callback a missing one raises :class:`attention_lens.weight_analyses.Missing` (the
    scaffolding then starts a background job); in that job, and in an export, it is
    computed here, with progress reported to ``progress(request, fraction)``.
    """

    def __init__(self, state: dict, *, compute: bool = False,
                 progress: Optional[Callable[[W.Request, float], None]] = None) -> None:
        self.state, self.compute, self.progress = state, compute, progress
        self.registry = registry_module.current()
        self._model: Any = None
        self._forward: Any = None

    @property
    def model(self) -> Any:
        """The analysed model (a ``LoadedModel``)."""
        if self._model is None:
            self._model = self.registry.get(self.state.get("model"))
        return self._model

    @property
    def forward(self) -> Any:
        """The cached forward pass of the prompt through the model."""
        if self._forward is None:
            self._forward = self.registry.forward(self.state["text"], self.model.name)
        return self._forward

    def weights(self, *requests: W.Request) -> list[Any]:
        """The results of these weight analyses of the model (see the class docstring)."""
        store = W.store()
        if not self.compute:
            return store.get(self.model, *requests)
        out = []
        for req in requests:
            report = None if self.progress is None else (
                lambda f, req=req: self.progress(req, f))  # type: ignore[misc]
            out.append(store.compute(self.model, req, progress=report))
        return out

    def weight(self, request: W.Request) -> Any:
        """The result of one weight analysis of the model."""
        return self.weights(request)[0]


def extra_id(page: str, name: str) -> str:
    """Id of a page's non-figure part ``name``."""
    return f"{page}-{name}"


@dataclass
class PageSpec:
    """A declared page: what its scaffolding needs to build layout, callbacks and export."""

    page: str
    heading: str
    description: Any
    help_md: str
    controls: tuple[Control, ...]
    graphs: tuple[str, ...]
    extras: tuple[str, ...]
    panels: Callable[[PageContext, dict], Sequence[Part]]
    body: Optional[Callable[[dict[str, Any]], Sequence[Any]]] = None
    prepare: Optional[Callable[[dict, Any], dict]] = None
    graph_options: Optional[dict[str, dict]] = None
    exportable: bool = True

    # ---------------------------------------------------------------- helpers
    @property
    def control_names(self) -> list[str]:
        """The controls' names (URL parameters and callback inputs, in order)."""
        return [c.name for c in self.controls]

    def config(self, model: Optional[str]) -> Any:
        """The config of ``model`` (the default model if None); None when it cannot load."""
        reg = registry_module.current()
        try:
            return reg.get(model or reg.default).cfg
        except AnalysisError:
            return None

    def query(self, raw: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], list[str]]:
        """The validated controls (``prepare`` applied) and the problems with ``raw``."""
        q, problems = parse_all(self.controls, raw, cfg)
        if self.prepare is not None and cfg is not None:
            q = self.prepare(q, cfg)
        return q, problems

    def draw(self, ctx: PageContext, query: dict) -> tuple[list[Any], list[Any]]:
        """The outputs (figures, then parts) and notices of the panels for ``query``."""
        parts = list(self.panels(ctx, query))
        theme = (ctx.state or {}).get("theme")
        figures = {p.name: styled(p.figure, theme) for p in parts if isinstance(p, Panel)}
        extras = {p.name: p.children for p in parts if isinstance(p, Html)}
        unknown = (set(figures) - set(self.graphs)) | (set(extras) - set(self.extras))
        if unknown:
            raise RuntimeError(f"the {self.page} page returned undeclared parts {unknown}")
        outs = [figures.get(g, no_update) for g in self.graphs]
        outs += [extras.get(e) for e in self.extras]
        notices = [shell.alert(p.text, color=p.color) for p in parts if isinstance(p, Notice)]
        return outs, notices

    def figure_panels(self, state: dict, raw_query: Optional[dict], compute: bool = False
                      ) -> list[Panel]:
        """The figure panels of this page for a state and query (downloads and export)."""
        ctx = PageContext(state, compute=compute)
        q, _ = self.query({k: v for k, v in (raw_query or {}).items() if k != "src"},
                          self.config(state.get("model")))
        panels = [p for p in self.panels(ctx, q) if isinstance(p, Panel)]
        for p in panels:
            styled(p.figure, state.get("theme"))
        return panels

    # ----------------------------------------------------------------- outputs
    def drawing_outputs(self) -> list[Output]:
        """Graphs, parts and alerts: what the main callback and the job both draw."""
        return ([Output(graph_id(self.page, g), "figure") for g in self.graphs]
                + [Output(extra_id(self.page, e), "children") for e in self.extras]
                + [Output(alerts_id(self.page), "children")])

    def states(self) -> list[State]:
        """The shared state and every control, as the job reads them."""
        return [State(shell.STATE, "data")] + [State(control_id(self.page, n), "value")
                                               for n in self.control_names]

    # ------------------------------------------------------------------ layout
    def layout(self, **raw: Any) -> html.Div:
        """The page for URL parameters ``raw`` (bad ones become warnings)."""
        cfg = self.config(raw.get("model"))
        q, problems = self.query(raw, cfg)
        opts = self.graph_options or {}
        parts: dict[str, Any] = {g: graph(self.page, g, **opts.get(g, {})) for g in self.graphs}
        parts.update({e: html.Div(id=extra_id(self.page, e)) for e in self.extras})
        body = list(self.body(parts)) if self.body else list(parts.values())
        return page_layout(self.page, self.heading, description=self.description,
                           controls=[c.widget(self.page, q[c.name], cfg)
                                     for c in self.controls],
                           body=[job_strip.strip(self.page), *body], help_md=self.help_md,
                           query=q, problems=problems, exportable=self.exportable)

    # ---------------------------------------------------------------- callbacks
    def update(self, state: Optional[dict], *values: Any) -> tuple:
        """The main callback: draw from cached results, or start a job for missing ones."""
        if not state or not state.get("text"):
            raise PreventUpdate
        *values, _rerun, old_request = values
        cfg = self.config(state.get("model"))
        query, problems = self.query(dict(zip(self.control_names, values)), cfg)
        trigger = triggered_id()
        src = "user" if isinstance(trigger, str) and trigger.startswith(f"{self.page}-") \
            else "url"
        alerts: list[Any] = [shell.alert(p, color="warning") for p in problems]
        keep = [no_update] * (len(self.graphs) + len(self.extras))
        request, after, note = no_update, job_strip.HIDDEN, ""
        try:
            outs, notices = self.draw(PageContext(state), query)
            alerts += notices
        except W.Missing as missing:
            outs = keep
            slots = background.current().slots
            if isinstance(old_request, dict) and old_request.get("token"):
                slots.release(str(old_request["token"]))  # a newer request replaces it
            labels = [r.label for r in missing.requests]
            token = slots.reserve(", ".join(labels))
            if token is None:
                busy = background.BusyError(slots.n)
                alerts.append(shell.alert(str(busy), color="warning"))
                after, note = job_strip.SHOWN, "Busy."
            else:
                request = {"token": token, "labels": labels, "model": missing.model}
        except AnalysisError as exc:
            alerts.append(shell.alert(str(exc)))
            outs = keep
        except Exception:  # noqa: BLE001 - never a traceback in the browser
            log.exception("%s analysis failed", self.page)
            alerts.append(shell.alert(f"The {self.page} analysis failed on this input "
                                      "(details in the server log)."))
            outs = keep
        return (*outs, alerts, {**query, "src": src}, request, after, note)

    def run_job(self, set_progress: Callable[[Any], None], request: dict, state: Any,
                *values: Any) -> tuple:
        """The background job: compute the missing weight analyses in its slot, then draw."""
        keep = [no_update] * (len(self.graphs) + len(self.extras))
        slots = background.current().slots
        labels = ", ".join(request.get("labels") or []) or "weight analyses"
        if not state or not state.get("text"):
            return (*keep, no_update, job_strip.HIDDEN, "")
        seen: list[str] = []

        def progress(req: W.Request, fraction: float) -> None:
            if req.label not in seen:
                seen.append(req.label)
            n = max(len(request.get("labels") or []), len(seen))
            set_progress(job_strip.progress_value(req.label, fraction, len(seen) - 1, n))

        try:
            with slots.hold(str(request.get("token") or ""), labels) as ok:
                if not ok:
                    busy = background.BusyError(slots.n)
                    return (*keep, [shell.alert(str(busy), color="warning")],
                            job_strip.SHOWN, "Busy.")
                query, problems = self.query(dict(zip(self.control_names, values)),
                                             self.config(state.get("model")))
                outs, notices = self.draw(PageContext(state, compute=True, progress=progress),
                                          query)
        except AnalysisError as exc:
            return (*keep, [shell.alert(str(exc))], job_strip.HIDDEN, "")
        except Exception:  # noqa: BLE001 - never a traceback in the browser
            log.exception("%s background job failed", self.page)
            return (*keep, [shell.alert(f"The {self.page} analysis failed (details in the "
                                        "server log).")], job_strip.HIDDEN, "")
        alerts = [shell.alert(p, color="warning") for p in problems] + notices
        return (*outs, alerts, job_strip.HIDDEN, "")


def _count_ids(tree: Any, wanted: set[str]) -> dict[str, int]:
    counts = dict.fromkeys(wanted, 0)

    def walk(node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for n in node:
                walk(n)
            return
        node_id = getattr(node, "id", None)
        if isinstance(node_id, str) and node_id in counts:
            counts[node_id] += 1
        children = getattr(node, "children", None)
        if children is not None and not isinstance(children, str):
            walk(children)

    walk(tree)
    return counts


def register_page(module: str, *, path: str, name: str, order: int, heading: str,
                  panels: Callable[[PageContext, dict], Sequence[Part]],
                  graphs: Sequence[str] = (), extras: Sequence[str] = (),
                  controls: Sequence[Control] = (), description: Any = "",
                  help_md: str = "", body: Optional[Callable[[dict], Sequence[Any]]] = None,
                  prepare: Optional[Callable[[dict, Any], dict]] = None,
                  graph_options: Optional[dict[str, dict]] = None, exportable: bool = True,
                  page: Optional[str] = None, **dash_kwargs: Any) -> PageSpec:
    """Declare an analysis page: Dash's ``register_page`` plus everything wired from it.

    ``controls`` (each with its label, bounds and widget), ``graphs`` and ``extras`` (named
    once) and ``panels(ctx, query) -> [Panel | Html | Notice]`` are all a page states. The
    scaffolding builds the layout (``body(parts)`` arranges the graphs and extras, each
    placed once), the main callback (outputs and inputs derived from the declaration, URL
    state, alerts), the background job for weight analyses with its strip, CSV/JSON
    downloads and "Export page". The spec is stored in ``dash.page_registry`` under
    ``"attention_lens"`` so export and the tests find every page there.
    """
    page = page or module.rsplit(".", 1)[-1].replace("_", "-")
    spec = PageSpec(page=page, heading=heading, description=description, help_md=help_md,
                    controls=tuple(controls), graphs=tuple(graphs), extras=tuple(extras),
                    panels=panels, body=body, prepare=prepare, graph_options=graph_options,
                    exportable=exportable)
    names = [*spec.graphs, *spec.extras, *spec.control_names]
    if len(set(names)) != len(names):
        raise ValueError(f"page {page}: graphs, extras and controls need distinct names")
    if body is not None:
        placed = _count_ids(list(body({n: html.Div(id=n) for n in (*spec.graphs,
                                                                   *spec.extras)})),
                            set(spec.graphs) | set(spec.extras))
        wrong = {n: c for n, c in placed.items() if c != 1}
        if wrong:
            raise ValueError(f"page {page}: body must place each graph and extra once: {wrong}")

    def layout(**raw: Any) -> html.Div:
        return spec.layout(**raw)

    dash.register_page(module, path=path, name=name, order=order, layout=layout,
                       attention_lens=spec, **dash_kwargs)
    drawing = spec.drawing_outputs()
    strip_ids = job_strip.ids(page)
    dash.callback(*drawing, Output(query_id(page), "data"), *job_strip.main_outputs(page),
                  Input(shell.STATE, "data"),
                  *[Input(control_id(page, n), "value") for n in spec.control_names],
                  job_strip.rerun_input(page), State(strip_ids["request"], "data"))(spec.update)
    job_strip.register(page, drawing, spec.states(), spec.run_job)
    return spec


def declared_pages() -> list[PageSpec]:
    """Every declared page, from ``dash.page_registry``."""
    return [p["attention_lens"] for p in dash.page_registry.values()
            if isinstance(p.get("attention_lens"), PageSpec)]


def spec_of(page: str) -> Optional[PageSpec]:
    """The declaration of ``page``, or None."""
    return next((s for s in declared_pages() if s.page == page), None)
