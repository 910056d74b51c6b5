"""The page declaration: a page states its controls, graphs and panels; the rest is derived.

A page module calls :func:`register_page` once (the recipe is in the package docs of
:mod:`attention_lens.components`). Component ids are plain strings prefixed by the page
(``"attention-layer"``) for a page's own controls and parts, and dicts for the widgets
handled on every page:
``{"type": "al-graph", "page": p, "name": n}`` (graphs), ``{"type": "al-query", "page": p}``
(the page's validated controls, written into the URL), ``{"type": "al-export", "page": p}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import dash
import dash_bootstrap_components as dbc
import plotly.graph_objects as go
from dash import MATCH, Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import background
from .. import registry as registry_module
from .. import weight_analyses as W
from ..analysis.errors import AnalysisError
from ..export import Panel
from ..figures.theme import TEMPLATE, styled, wrap_title
from . import job_strip, shell
from .controls import (
    Control,
    control_id,  # noqa: F401 - pages address their controls through P
    control_input,
    control_of,
    control_state,
    parse_all,
)

log = logging.getLogger(__name__)

GRAPH, QUERY, EXPORT, EXPORT_STATUS = "al-graph", "al-query", "al-export", "al-export-status"
IMAGE_BTN, DATA_BTN = "al-img", "al-data"
#: Key of a page's query store saying whether the user ("user") or a link ("url") set it
#: (a user's change adds a browser history entry); never a control's name.
SOURCE = "_src"


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


def page_panels(page: str, state: dict, query: Optional[dict], compute: bool = False
                ) -> list[Panel]:
    """The figure panels of ``page`` (AnalysisError for bad input; weight analyses not
    computed yet are computed here when ``compute``, else they raise ``Missing``)."""
    spec = spec_of(page)
    if spec is None:
        raise AnalysisError(f"the {page} page has no figures to export")
    return spec.figure_panels(state, query, compute=compute)


#: Height (px) of the blank figure a graph shows before its first analysis.
EMPTY_HEIGHT = 320


def empty_figure(message: str = "") -> go.Figure:
    """A blank themed figure (shown before the first analysis or after an error)."""
    fig = go.Figure(layout=dict(template=TEMPLATE, xaxis=dict(visible=False),
                                yaxis=dict(visible=False), height=EMPTY_HEIGHT))
    if message:
        # wrapped like a title, so that a phone-width figure shows it whole
        fig.add_annotation(text=wrap_title(message, 40), showarrow=False, font=dict(size=14))
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
        dcc.Store(id=query_id(page), data={**(query or {}), SOURCE: "url"}),
        html.Div(list(body), className="al-body"),
    ], className=f"al-page al-page-{page}")


# ------------------------------------------------------------------------- callbacks
def triggered_id() -> Any:
    """The id of the input that fired the current callback (None outside a callback)."""
    try:
        return dash.ctx.triggered_id
    except Exception:  # noqa: BLE001 - called directly (tests)
        return None


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


def register_callbacks(app: dash.Dash) -> None:
    """What every page's graphs rely on: each graph's box follows its figure's size."""
    app.clientside_callback(
        GRAPH_BOX, Output({"type": GRAPH, "page": MATCH, "name": MATCH}, "style"),
        Input({"type": GRAPH, "page": MATCH, "name": MATCH}, "figure"),
        State({"type": GRAPH, "page": MATCH, "name": MATCH}, "style"),
    )


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
                 progress: Optional[Callable[[W.Request, float], None]] = None,
                 changed: Optional[set[str]] = None) -> None:
        self.state, self.compute, self.progress = state, compute, progress
        self.changed: Optional[set[str]] = changed
        self.registry = registry_module.current()
        #: analyses a panel drew a preview for (see :meth:`weight_or`): still to compute
        self.pending: list[W.Missing] = []
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

    def weight_or(self, request: W.Request, preview: Callable[[], Any]) -> Any:
        """The result of ``request``, or, while it is not computed yet, ``preview()`` (a
        cheaper part of it, e.g. the positions a figure shows first): the page then draws the
        preview at once and the scaffolding computes the rest as a background job, which
        draws the page again when it ends."""
        try:
            return self.weight(request)
        except W.Missing as missing:
            self.pending.append(missing)
            return preview()

    def run(self, analysis: Any, query: Optional[dict] = None, *, pair: Any = None,
            data: Any = None, preview: Optional[dict] = None, wait: bool = True,
            **given: Any) -> Any:
        """The result of a declared analysis (:mod:`..analysis.declare`) on the prompt (scope
        prompt) or the model's weights: its parameters from the page's validated controls
        ``query`` and ``given`` (values the page chose, by parameter name). Kept with the
        forward pass under the declaration's key, or, when its estimated work is over the
        inline threshold (scope weights always), read from the store and computed as a
        background job with progress. Scope pair reads ``pair`` (a
        :class:`..analysis.patching.PairInput`) and keeps its result in the registry's
        weight-analysis cache; scope dataset reads ``data`` (a
        :class:`..analysis.datasets.DatasetInput`: the dataset's identity and windows) and
        keeps its result there too. ``preview`` (parameter values naming a cheaper part of
        the same analysis, e.g. the positions a figure shows first): while that job runs,
        the part is computed at once and returned instead (see :meth:`weight_or`); without
        one, ``wait=False`` returns None meanwhile (the page draws its other parts)."""
        values = analysis.values({**(analysis.from_query(query) if query else {}), **given})
        lm = self.model
        if analysis.scope == "pair":
            req = W.declared(analysis, lm, pair, values)
            if req is not None:
                return self.weight(req)
            return self.registry.weights(lm.name, analysis.key(values, given=pair),
                                         lambda m: analysis.compute(m, pair, values, {}))
        if analysis.scope == "dataset":
            req = W.declared(analysis, lm, data, values)
            if req is not None:
                return self.weight(req)
            needs = dict(zip(analysis.needs, self.weights(*W.needs(analysis)))) \
                if analysis.needs else {}
            return self.registry.weights(
                lm.name, analysis.key(values, given=data),
                lambda m: analysis.compute(m, data.cut(m), values, needs))
        fp = self.forward if analysis.scope == "prompt" else None
        req = W.declared(analysis, lm, fp, values)
        if req is not None and preview is None:
            return self.weight(req) if wait else self.weight_or(req, lambda: None)
        if req is not None:
            part = analysis.values({**values, **preview})
            return self.weight_or(req, lambda: self._inline(analysis, lm, fp, part))
        return self._inline(analysis, lm, fp, values)

    def _inline(self, analysis: Any, lm: Any, fp: Any, values: dict) -> Any:
        """A declared analysis computed here, kept with the forward pass under its key."""
        needs = dict(zip(analysis.needs, self.weights(*W.needs(analysis)))) \
            if analysis.needs else {}
        from ..analysis.declare import Shape

        if fp is None:  # a weight analysis cheap enough to run inline: the weight cache
            return self.registry.weights(lm.name, analysis.key(values, Shape(lm.cfg)),
                                         lambda m: analysis.compute(m, None, values, needs))
        return self.registry.per_prompt(
            fp, analysis.key(values, Shape(lm.cfg, fp.n_tokens)),
            lambda: analysis.compute(lm, fp, values, needs))

    def only(self, *controls: str) -> bool:
        """True when only some of these controls changed since the page was drawn (parts
        that do not depend on them may then be left out: they keep what they show)."""
        return bool(self.changed) and self.changed <= set(controls)


def extra_id(page: str, name: str) -> str:
    """Id of a page's non-figure part ``name``."""
    return f"{page}-{name}"


@dataclass
class PageSpec:
    """A declared page: what its scaffolding needs to build layout, callbacks and export."""

    page: str
    heading: str
    lead: Any
    help_md: str
    controls: tuple[Control, ...]
    graphs: tuple[str, ...]
    extras: tuple[str, ...]
    panels: Callable[[PageContext, dict], Sequence[Part]]
    body: Optional[Callable[[dict[str, Any]], Sequence[Any]]] = None
    prepare: Optional[Callable[[dict, Any], dict]] = None
    graph_options: Optional[dict[str, dict]] = None
    exportable: bool = True
    extra_classes: Optional[dict[str, str]] = None
    analysis: Any = None

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
        q, _ = self.query({k: v for k, v in (raw_query or {}).items() if k != SOURCE},
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

    def inputs(self) -> list[Input]:
        """The shared state and every control, as the main callback's inputs."""
        return [Input(shell.STATE, "data")] + [control_input(self.page, c)
                                               for c in self.controls]

    def states(self) -> list[State]:
        """The shared state and every control, as the job reads them."""
        return [State(shell.STATE, "data")] + [control_state(self.page, c)
                                               for c in self.controls]

    # ------------------------------------------------------------------ layout
    def layout(self, **raw: Any) -> html.Div:
        """The page for URL parameters ``raw`` (bad ones become warnings)."""
        cfg = self.config(raw.get("model"))
        q, problems = self.query(raw, cfg)
        opts = self.graph_options or {}
        parts: dict[str, Any] = {g: graph(self.page, g, **opts.get(g, {})) for g in self.graphs}
        classes = self.extra_classes or {}
        parts.update({e: html.Div(id=extra_id(self.page, e), className=classes.get(e))
                      for e in self.extras})
        body = list(self.body(parts)) if self.body else list(parts.values())
        return page_layout(self.page, self.heading, description=self.lead,
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
        src = "url" if trigger in (None, shell.STATE) else "user"
        alerts: list[Any] = [shell.alert(p, color="warning") for p in problems]
        keep = [no_update] * (len(self.graphs) + len(self.extras))
        request, after, note = no_update, job_strip.HIDDEN, ""

        def start_job(missing: W.Missing) -> None:
            nonlocal request, after, note
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

        try:
            ctx = PageContext(state, changed=self.changed_controls())
            outs, notices = self.draw(ctx, query)
            alerts += notices
            if ctx.pending:  # previews drawn: the job computes the rest and draws again
                start_job(W.Missing(ctx.pending[0].model,
                                    [r for m in ctx.pending for r in m.requests]))
        except W.Missing as missing:
            outs = keep
            start_job(missing)
        except AnalysisError as exc:
            alerts.append(shell.alert(str(exc)))
            outs = keep
        except Exception:  # noqa: BLE001 - never a traceback in the browser
            log.exception("%s analysis failed", self.page)
            alerts.append(shell.alert(f"The {self.page} analysis failed on this input "
                                      "(details in the server log)."))
            outs = keep
        return (*outs, alerts, {**query, SOURCE: src}, request, after, note)

    def render(self, state: dict, *, compute: bool = True, **controls: Any) -> "Drawn":
        """Run the page's callbacks as Dash would, for ``state`` and these control values
        (the others as an empty URL sets them): the main callback, then, if it asked for one,
        the background job (``compute``). For tests, notebooks and scripts."""
        cfg = self.config(state.get("model"))
        defaults, _ = self.query({}, cfg)
        values = [controls.get(n, defaults[n]) for n in self.control_names]
        unknown = set(controls) - set(self.control_names)
        if unknown:
            raise TypeError(f"the {self.page} page has no controls {sorted(unknown)}")
        out = self.update(state, *values, 0, None)
        n = len(self.graphs) + len(self.extras)
        drawn, alerts, query, request = list(out[:n]), out[n], out[n + 1], out[n + 2]
        if compute and isinstance(request, dict):
            job = self.run_job(lambda _: None, request, state, *values)
            drawn, alerts = list(job[:n]), list(job[n] or [])
        return Drawn(figures=dict(zip(self.graphs, drawn[:len(self.graphs)])),
                     extras=dict(zip(self.extras, drawn[len(self.graphs):])),
                     alerts=[(a.color, str(a.children)) for a in alerts or []],
                     query=query, request=request)

    def changed_controls(self) -> set[str]:
        """Names of the controls that triggered the current callback (empty: anything else)."""
        try:
            props = dash.ctx.triggered_prop_ids or {}
        except Exception:  # noqa: BLE001 - called directly (tests)
            return set()
        deps = [(control_input(self.page, c).component_id, c.name) for c in self.controls]
        out = set()
        for cid in props.values():
            name = next((n for pattern, n in deps if _matches(pattern, cid)), None)
            if name is None:
                return set()
            out.add(name)
        return out

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


@dataclass
class Drawn:
    """What a page's callbacks drew (see :meth:`PageSpec.render`)."""

    figures: dict[str, Any]
    extras: dict[str, Any]
    alerts: list[tuple[str, str]]  # (colour, text)
    query: dict
    request: Any

    @property
    def errors(self) -> list[str]:
        """Texts of the error and warning alerts."""
        return [text for color, text in self.alerts if color != "info"]

    @property
    def notes(self) -> list[str]:
        """Texts of the informational notes."""
        return [text for color, text in self.alerts if color == "info"]

    @property
    def drew(self) -> bool:
        """True when every graph got a figure."""
        return all(isinstance(f, go.Figure) for f in self.figures.values())


def _wild(value: Any) -> bool:
    return not isinstance(value, (str, int, float, bool))


def _matches(pattern: Any, cid: Any) -> bool:
    """Whether component id ``cid`` is ``pattern`` (whose wildcards match anything)."""
    if not isinstance(pattern, dict) or not isinstance(cid, dict):
        return pattern == cid
    return set(pattern) == set(cid) and all(_wild(v) or cid.get(k) == v
                                            for k, v in pattern.items())


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
                  graphs: Sequence[str] = (), extras: Sequence[Any] = (),
                  controls: Sequence[Control] = (), lead: Any = "",
                  help_md: str = "", body: Optional[Callable[[dict], Sequence[Any]]] = None,
                  prepare: Optional[Callable[[dict, Any], dict]] = None,
                  graph_options: Optional[dict[str, dict]] = None, exportable: bool = True,
                  page: Optional[str] = None, analysis: Any = None,
                  **dash_kwargs: Any) -> PageSpec:
    """Declare an analysis page: Dash's ``register_page`` plus everything wired from it.

    ``heading`` and ``lead`` (a sentence under it) title the page; ``controls`` (each with
    its label, bounds and widget), ``graphs`` and ``extras`` (named once; an extra may be a
    ``(name, css_class)`` pair) and
    ``panels(ctx, query) -> [Panel | Html | Notice]`` are all a page states; the rest
    (``title``, ``description`` for the navbar and overview) goes to Dash. The
    scaffolding builds the layout (``body(parts)`` arranges the graphs and extras, each
    placed once), the main callback (outputs and inputs derived from the declaration, URL
    state, alerts), the background job for weight analyses with its strip, CSV/JSON
    downloads and "Export page". The spec is stored in ``dash.page_registry`` under
    ``"attention_lens"`` so export and the tests find every page there.

    ``analysis`` (a declaration of :mod:`..analysis.declare`) adds a control for each of its
    parameters shown on pages (URL names, defaults, bounds and labels from the declaration),
    before the page's own ``controls``, or where ``controls`` names it (a URL name as a
    string places that parameter's control); ``panels`` then read the result with
    ``ctx.run(analysis, query)``.
    """
    page = page or module.rsplit(".", 1)[-1].replace("_", "-")
    if analysis is not None:
        # a page control named like a parameter replaces its derived one (e.g. a widget
        # whose labels depend on the model, a slider); a string places the derived one
        own = {c.name for c in controls if not isinstance(c, str)}
        derived = {p.url_name: control_of(p) for p in analysis.params
                   if p.page and p.url_name not in own}
        placed = [c for c in controls if isinstance(c, str)]
        wrong = set(placed) - set(derived)
        if wrong:
            raise ValueError(f"page {page}: {sorted(wrong)} are no parameters of "
                             f"{analysis.name}")
        controls = [c for n, c in derived.items() if n not in placed] + \
            [derived[c] if isinstance(c, str) else c for c in controls]
    pairs = [(e, None) if isinstance(e, str) else tuple(e) for e in extras]
    spec = PageSpec(page=page, heading=heading, lead=lead, help_md=help_md,
                    controls=tuple(controls), graphs=tuple(graphs),
                    extras=tuple(name for name, _ in pairs), panels=panels, body=body,
                    prepare=prepare, graph_options=graph_options, exportable=exportable,
                    extra_classes={name: cls for name, cls in pairs if cls},
                    analysis=analysis)
    names = [*spec.extras, *spec.control_names]  # both are ``{page}-{name}`` ids
    if len(set(names)) != len(names) or len(set(spec.graphs)) != len(spec.graphs):
        raise ValueError(f"page {page}: graphs, and extras and controls, need distinct names")
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
                  *spec.inputs(), job_strip.rerun_input(page),
                  State(strip_ids["request"], "data"))(spec.update)
    job_strip.register(page, drawing, spec.states(), spec.run_job)
    return spec


def declared_pages() -> list[PageSpec]:
    """Every declared page, from ``dash.page_registry``."""
    return [p["attention_lens"] for p in dash.page_registry.values()
            if isinstance(p.get("attention_lens"), PageSpec)]


def spec_of(page: str) -> Optional[PageSpec]:
    """The declaration of ``page``, or None."""
    return next((s for s in declared_pages() if s.page == page), None)


def model(name: Optional[str] = None) -> Any:
    """A model from the process's registry (the default if None), for a page's own callbacks."""
    return registry_module.current().get(name)


def forward(state: dict) -> Any:
    """The cached forward pass of a shared state, for a page's own callbacks."""
    return forward_of(state["text"], state.get("model"))


def forward_of(text: str, name: Optional[str] = None) -> Any:
    """The cached forward pass of ``text`` through model ``name`` (a second prompt or model)."""
    return registry_module.current().forward(text, name)


def per_prompt(fp: Any, key: Any, compute: Callable[[], Any]) -> Any:
    """A result of one forward pass, kept with it under ``key`` (for a page's own callbacks)."""
    return registry_module.current().per_prompt(fp, key, compute)


def model_names() -> list[str]:
    """The names of the models that can be picked."""
    return registry_module.current().names()


def default_model() -> str:
    """The name of the default model."""
    return registry_module.current().default
