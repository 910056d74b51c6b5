"""Downloads of a page's figures: PNG/SVG in the browser, CSV/JSON of the data, "Export page".

PNG and SVG are drawn by Plotly in the browser (clientside callbacks); CSV and JSON are
rebuilt on the server from the page's panels; "Export page" draws every figure with kaleido
into a zip, inside a background-job slot like any heavy work (over the bound it says the
server is busy).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import dash
from dash import ALL, Input, Output, State, dcc, no_update
from dash.exceptions import PreventUpdate

from .. import background
from .. import registry as registry_module
from ..analysis.errors import AnalysisError
from . import shell
from .page import (
    DATA_BTN,
    EXPORT,
    EXPORT_STATUS,
    GRAPH,
    IMAGE_BTN,
    QUERY,
    SOURCE,
    page_panels,
    triggered_id,
)

log = logging.getLogger(__name__)


def slug(text: str, n: int = 40) -> str:
    """A file-name-safe slug of ``text``."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].strip("-")
    return s or "prompt"


def export_filename(page: str, name: str, state: Optional[dict]) -> str:
    """Base file name of an exported figure: page, figure, model and prompt."""
    if not state:
        return f"{page}-{name}"
    return f"{page}-{name}-{slug(state.get('model', ''), 30)}-{slug(state.get('text', ''))}"


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


def register_callbacks(app: dash.Dash) -> None:
    """Callbacks every page's widgets rely on: image/data downloads and the page export."""
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
                                                         if k != SOURCE}, fp)
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


