"""The app shell: navbar, shared prompt and model picker, alerts, and the URL as shared state.

State flow: the URL query string (``model``, ``text``, ``pos``, ``theme`` and the page's own
controls)
is the source of truth. On load, on link navigation and on back/forward the shell reads
it into :data:`STATE`; the Analyse button and the model picker write :data:`STATE`; a
clientside callback writes :data:`STATE` plus the page's query store back into the URL
(``pushState`` for user actions, ``replaceState`` when only normalising), so a link
reproduces the view. Back/forward raise a ``popstate`` that ``assets/app.js`` turns into
:data:`NAV`, which re-renders the page from the restored URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlencode

import dash
import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, State, dcc, html, no_update

from .. import __version__, prompt_links
from .. import registry as registry_module
from ..analysis.errors import AnalysisError

log = logging.getLogger(__name__)

#: Repeats rare names, so the shipped two-layer model's induction heads show: on attn-only-2l
#: the second "Hermione Granger ... Hogsmeade" is predicted with p ~0.3-0.8 per token against
#: ~0.01 the first time.
DEFAULT_PROMPT = ("Harry Potter and Hermione Granger walked to Hogsmeade. "
                  "Harry Potter and Hermione Granger walked to Hogsmeade.")

STATE = "shell-state"
NAV = "shell-nav"
NAV_KWARG = "nav_"
TEXT = "shell-text"
MODEL = "shell-model"
ANALYSE = "shell-analyse"
ALERTS = "shell-alerts"
DOWNLOAD = "shell-download"
URLSYNC = "shell-urlsync"
NAVLINK = "shell-navlink"
TOGGLER = "shell-toggler"
COLLAPSE = "shell-collapse"
THEME = "shell-theme"
LOCATION = "_pages_location"  # dash.page_container's own dcc.Location
SHARED_KEYS = ("model", "text", "pos", "theme")
#: The light "publication" theme's name in the URL (``theme=light``); dark is the default.
LIGHT = "light"


@dataclass(frozen=True)
class AppOptions:
    """Settings of the shell the app factory passes in."""

    max_prompt_chars: int = 20_000


# --------------------------------------------------------------------------- helpers
def parse_search(search: Optional[str]) -> dict[str, str]:
    """Query-string parameters of ``search`` (``"?a=1&b=2"``); the first value of each."""
    if not search:
        return {}
    parsed = parse_qs(search.lstrip("?"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items() if v}


def state_query(state: Optional[dict]) -> str:
    """The shared part of a page URL (``model``, ``text``, ``pos``, ``theme``) for ``state``."""
    if not state:
        return ""
    params = {k: state[k] for k in SHARED_KEYS if state.get(k) not in (None, "")}
    if state.get("tid"):  # a long prompt travels as the id of its stored text
        params.pop("text", None)
        params["t"] = state["tid"]
    return urlencode(params)


def page_href(path: str, state: Optional[dict] = None, **extra: Any) -> str:
    """The link to the page at ``path`` under the app's URL prefix (``--url-prefix``),
    carrying ``state``'s shared part and ``extra`` query parameters (None values left out).

    Every link between pages is built here, so that behind a proxy path such as ``/lens/``
    no link leaves the app.
    """
    query = "&".join(x for x in (state_query(state),
                                 urlencode({k: v for k, v in extra.items() if v is not None}))
                     if x)
    rel = dash.get_relative_path(path)
    return f"{rel}?{query}" if query else rel


def human_size(n: int) -> str:
    """A byte count as ``"17.5 MB"``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def alert(message: str, color: str = "danger", **kwargs: Any) -> dbc.Alert:
    """A dismissable alert; ``message`` is shown as text (never as HTML)."""
    return dbc.Alert(message, color=color, dismissable=True, className="al-alert", **kwargs)


def model_options() -> list[dict[str, Any]]:
    """Model picker options: every model folder with its size; unavailable ones disabled."""
    opts = []
    for e in registry_module.current().entries():
        size = f" · {human_size(e.size_bytes)}" if e.size_bytes else ""
        size = f" · {e.detail}{size}" if e.detail else size
        if e.available:
            opts.append({"label": f"{e.name}{size}", "value": e.name})
        else:
            opts.append({"label": f"{e.name} — unavailable: {e.error}", "value": e.name,
                         "disabled": True})
    return opts


def pages() -> list[dict[str, Any]]:
    """Registered pages in navbar order."""
    return sorted(dash.page_registry.values(), key=lambda p: (p.get("order") or 0, p["path"]))


# ---------------------------------------------------------------------------- layout
def navbar() -> dbc.Navbar:
    """The navbar, generated from ``dash.page_registry`` (adding a page touches no file here)."""
    links = [
        dbc.NavItem(dbc.NavLink(p["name"], href=page_href(p["path"]),
                                id={"type": NAVLINK, "path": p["path"]}))
        for p in pages()
    ]
    return dbc.Navbar(
        dbc.Container([
            dbc.NavbarBrand("Attention Lens", href=page_href("/"),
                            className="al-brand"),
            dbc.NavbarToggler(id=TOGGLER, n_clicks=0),
            dbc.Collapse([dbc.Nav(links, navbar=True, className="al-nav"),
                          dbc.Button("Light theme", id=THEME, n_clicks=0, size="sm",
                                     color="secondary", outline=True, className="al-theme",
                                     title="Switch between the dark theme and a light one "
                                           "for papers (figures and exports follow)")],
                         id=COLLAPSE, navbar=True, is_open=False),
        ], fluid=True),
        color="dark", dark=True, expand="lg", className="al-navbar mb-2",
    )


def prompt_bar(options: AppOptions) -> html.Div:
    """The prompt box, model picker and Analyse button shared by every page."""
    return html.Div([
        dbc.Row([
            dbc.Col(dbc.Textarea(id=TEXT, value=DEFAULT_PROMPT, rows=2,
                                 maxLength=options.max_prompt_chars,
                                 placeholder="Type a prompt to analyse",
                                 className="al-prompt", persistence=False,
                                 title="prompt"),
                    xs=12, lg=8),
            dbc.Col(dbc.Select(id=MODEL, options=model_options(),
                               value=registry_module.current().default),
                    xs=8, lg=3),
            dbc.Col(dbc.Button("Analyse", id=ANALYSE, n_clicks=0, color="primary",
                               className="w-100"), xs=4, lg=1),
        ], className="g-2 align-items-center"),
    ], className="al-prompt-bar mb-2")


def root_layout(options: AppOptions) -> Callable[..., html.Div]:
    """The root layout: a function, so the model list is fresh on every page load."""
    return lambda **_: layout(options)


def layout(options: AppOptions = AppOptions()) -> html.Div:
    """The root layout: shared state, navbar, prompt bar, the page, the footer."""
    return html.Div([
        dcc.Store(id=STATE),
        dcc.Store(id=NAV),
        dcc.Download(id=DOWNLOAD),
        html.Div(id=URLSYNC, hidden=True),
        html.Div(id="shell-image-status", hidden=True),
        navbar(),
        dbc.Container([
            prompt_bar(options),
            html.Div(id=ALERTS, **{"aria-live": "polite"}),
            dash.page_container,
        ], fluid=True, className="al-main"),
        html.Footer(f"Attention Lens {__version__} · runs entirely on this server",
                    className="al-footer"),
    ])


# ------------------------------------------------------------------- page layouts
def wrap_page_layouts() -> None:
    """Make every page layout read back/forward URLs and never fail on bad parameters."""
    for page in dash.page_registry.values():
        fn = page.get("layout")
        if callable(fn) and not getattr(fn, "_al_wrapped", False):
            page["layout"] = _wrapped_layout(fn, page.get("name", "page"))


def _wrapped_layout(fn: Any, name: str) -> Any:
    def wrapped(**kwargs: Any) -> Any:
        nav = kwargs.pop(NAV_KWARG, None)
        try:
            triggered = dash.ctx.triggered_prop_ids
        except Exception:  # noqa: BLE001 - outside a callback (first render, tests)
            triggered = {}
        if nav and f"{NAV}.data" in (triggered or {}):
            # back/forward: the router's own location can lag behind the real URL
            kwargs = parse_search(nav.get("search"))
        try:
            return fn(**kwargs)
        except AnalysisError as exc:
            return alert(str(exc))
        except Exception:  # noqa: BLE001 - a bad link must not break the app
            log.exception("layout of %s failed", name)
            return alert(f"The {name} page could not be shown for these URL parameters.")

    wrapped._al_wrapped = True  # type: ignore[attr-defined]
    return wrapped


# ------------------------------------------------------------------------ callbacks
URL_WRITER = """
function(state, queries) {
    const dc = window.dash_clientside;
    if (!state || !state.text) { return dc.no_update; }
    const trig = ((dc.callback_context || {}).triggered || []).map(t => t.prop_id);
    const p = new URLSearchParams();
    document.documentElement.setAttribute('data-al-theme',
                                          state.theme === 'light' ? 'light' : 'dark');
    p.set('model', state.model);
    if (state.tid) { p.set('t', state.tid); } else { p.set('text', state.text); }
    if (state.pos !== null && state.pos !== undefined) { p.set('pos', String(state.pos)); }
    if (state.theme === 'light') { p.set('theme', 'light'); }
    let user = trig.indexOf('shell-state.data') >= 0 && state.src === 'user';
    (queries || []).forEach(function (q) {
        if (!q) { return; }
        Object.keys(q).sort().forEach(function (k) {
            const v = q[k];
            if (k === '_src' || v === null || v === undefined || v === '') { return; }
            p.set(k, Array.isArray(v) ? v.join(',') : String(v));
        });
        if (q._src === 'user' && trig.some(t => t.indexOf('al-query') >= 0)) { user = true; }
    });
    const search = '?' + p.toString();
    if (search === window.location.search) { return search; }
    const url = window.location.pathname + search + window.location.hash;
    if (user) { window.history.pushState({}, '', url); }
    else { window.history.replaceState(window.history.state, '', url); }
    return search;
}
"""


def register_callbacks(app: dash.Dash, options: AppOptions = AppOptions()) -> None:
    """Shell callbacks: URL <-> state, navbar links, mobile menu."""
    def sync(search: Optional[str], nav: Optional[dict], n_clicks: Optional[int],
             model: Optional[str], text: Optional[str], state: Optional[dict]) -> tuple:
        return sync_state(search, nav, n_clicks, model, text, state,
                          max_prompt_chars=options.max_prompt_chars)

    app.callback(
        Output(STATE, "data"), Output(TEXT, "value"), Output(MODEL, "value"),
        Output(ALERTS, "children"),
        Input(LOCATION, "search"), Input(NAV, "data"), Input(ANALYSE, "n_clicks"),
        Input(MODEL, "value"), State(TEXT, "value"), State(STATE, "data"),
        prevent_initial_call=True,
    )(sync)

    app.clientside_callback(
        URL_WRITER, Output(URLSYNC, "children"),
        Input(STATE, "data"), Input({"type": "al-query", "page": ALL}, "data"),
    )

    app.callback(
        Output({"type": NAVLINK, "path": ALL}, "href"),
        Output({"type": NAVLINK, "path": ALL}, "active"),
        Input(STATE, "data"), Input(LOCATION, "pathname"),
        State({"type": NAVLINK, "path": ALL}, "id"),
    )(nav_links)

    app.callback(
        Output(COLLAPSE, "is_open"), Input(TOGGLER, "n_clicks"), State(COLLAPSE, "is_open"),
        prevent_initial_call=True,
    )(lambda n, is_open: not is_open)

    app.callback(
        Output(STATE, "data", allow_duplicate=True), Input(THEME, "n_clicks"),
        State(STATE, "data"), prevent_initial_call=True,
    )(toggle_theme)

    app.callback(Output(THEME, "children"), Input(STATE, "data"))(theme_label)


def sync_state(search: Optional[str], nav: Optional[dict], n_clicks: Optional[int],
               model: Optional[str], text: Optional[str], state: Optional[dict], *,
               max_prompt_chars: int = AppOptions.max_prompt_chars
               ) -> tuple[Any, Any, Any, Any]:
    """Read the URL (load, links, back/forward) or the prompt box (Analyse) into the state."""
    try:
        trigger = dash.ctx.triggered_id
    except Exception:  # noqa: BLE001 - called directly in tests
        trigger = LOCATION
    reg = registry_module.current()
    alerts: list[Any] = []
    if trigger in (ANALYSE, MODEL):
        src = "user"
        new_text, new_model = text or "", model or reg.default
        text_out, model_out = no_update, no_update
        same_text = bool(state) and state.get("text") == new_text
        pos = state.get("pos") if same_text and state.get("model") == new_model else None
        theme = (state or {}).get("theme")
    else:
        src = "url"
        if trigger == NAV and nav:
            search = nav.get("search")
        q = parse_search(search)
        new_text = q.get("text", DEFAULT_PROMPT)
        if q.get("t"):
            stored = prompt_links.load(q["t"])
            if stored is None:
                alerts.append(alert("This link's prompt is not stored on this server (the "
                                    "link is incomplete or has expired); showing the default "
                                    "prompt.", color="warning"))
            new_text = stored or DEFAULT_PROMPT
        new_model = q.get("model") or reg.default
        pos = _int_or_none(q.get("pos"))
        theme = LIGHT if q.get("theme") == LIGHT else None
        if q.get("pos") not in (None, "") and pos is None:
            alerts.append(alert(f"Ignored the link's position {q.get('pos')!r}: "
                                "it must be a whole number.", color="warning"))
        if new_model not in reg.names():
            alerts.append(alert(f"The link asks for model {new_model!r}, which is not "
                                f"available here; showing {reg.default!r} instead. "
                                f"Available: {', '.join(reg.names())}.", color="warning"))
            new_model = reg.default
        text_out, model_out = new_text, new_model

    limit = max_prompt_chars
    if len(new_text) > limit:
        alerts.append(alert(f"The prompt is {len(new_text):,} characters long; the limit is "
                            f"{limit:,}. Shorten it and press Analyse."))
        return (_fallback(state), text_out, model_out, alerts)
    try:
        fp = reg.forward(new_text, new_model)
    except AnalysisError as exc:
        alerts.append(alert(str(exc)))
        return (_fallback(state), text_out, model_out, alerts)
    except Exception:  # noqa: BLE001 - never a traceback in the browser
        log.exception("forward pass failed")
        alerts.append(alert("The model failed on this prompt (see the server log)."))
        return (_fallback(state), text_out, model_out, alerts)
    if fp.truncated:
        alerts.append(alert(
            f"The prompt has {fp.n_prompt_tokens} tokens but {new_model} reads at most "
            f"{fp.n_tokens}: analysed the first {fp.n_tokens} of {fp.n_prompt_tokens} tokens.",
            color="warning"))
    new_state = {"model": new_model, "text": new_text, "pos": pos, "theme": theme, "src": src}
    tid = prompt_links.link_id(new_text)
    if tid:  # a long prompt: the link carries the id of its stored text
        new_state["tid"] = tid
    if state and src == "url" and all(state.get(k) == new_state[k] for k in SHARED_KEYS):
        return (no_update, text_out, model_out, alerts)
    return (new_state, text_out, model_out, alerts)


def toggle_theme(n_clicks: Optional[int], state: Optional[dict]) -> Any:
    """Switch the shared state between the dark theme and the light publication theme."""
    if not n_clicks or not state:
        return no_update
    return {**state, "theme": None if state.get("theme") == LIGHT else LIGHT, "src": "user"}


def theme_label(state: Optional[dict]) -> str:
    """The theme button offers the theme not in use."""
    return "Dark theme" if (state or {}).get("theme") == LIGHT else "Light theme"


def _fallback(state: Optional[dict]) -> Any:
    """Keep the last good analysis; on a first load with a bad link, analyse the default."""
    if state:
        return no_update
    return {"model": registry_module.current().default, "text": DEFAULT_PROMPT, "pos": None,
            "theme": None, "src": "url"}


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def nav_links(state: Optional[dict], pathname: Optional[str],
              ids: list[dict]) -> tuple[list[str], list[bool]]:
    """Navbar hrefs carrying the shared state, and which one is the current page."""
    by_path = {p["path"]: p for p in dash.page_registry.values()}
    hrefs, active = [], []
    current = dash.strip_relative_path(pathname or "/") if pathname else ""
    for i in ids:
        page = by_path.get(i["path"])
        hrefs.append(page_href(i["path"], state))
        active.append(page is not None and page["path"].strip("/") == (current or ""))
    return hrefs, active
