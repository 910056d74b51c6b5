"""/ : the prompt, the model picker (in the shell), the selected model's card, every page."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, callback, dcc, html
from dash.exceptions import PreventUpdate

from ..analysis.errors import AnalysisError
from ..components import page as P
from ..components import shell

PAGE = "overview"
dash.register_page(__name__, path="/", order=0, name="Overview",
                   title="Attention Lens",
                   description="The prompt, the model and its card.")

CARD = f"{PAGE}-card"
LINKS = f"{PAGE}-links"


def layout(**_: Any) -> html.Div:
    """Introduction, the model card and a link to every page."""
    return html.Div([
        html.H2("Attention Lens", className="al-page-title"),
        html.P("Type a prompt above, pick a model and press Analyse; then walk through the "
               "pages. Every view is exact (computed from the model's own activations), "
               "its state lives in the URL so a link reproduces it, and every figure exports "
               "as PNG, SVG and data.", className="al-description"),
        dbc.Row([
            dbc.Col(html.Div(id=LINKS, className="al-page-links"), lg=7),
            dbc.Col(dcc.Loading(html.Div(id=CARD), type="dot"), lg=5),
        ], className="g-3"),
    ], className="al-page al-page-overview")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def model_card(name: str) -> dbc.Card:
    """What the model is, how it was trained and how well it does (from its card.json)."""
    lm = P.model(name)
    card, cfg = lm.card or {}, lm.cfg
    ev = card.get("evaluation", {}) or {}
    probe = ev.get("induction_probe", {}) or {}
    tr = card.get("training", {}) or {}
    rows: list[tuple[str, Any]] = [
        ("layers × heads", f"{cfg.n_layers} × {cfg.n_heads} (d_head {cfg.d_head})"),
        ("d_model / context / vocabulary", f"{cfg.d_model} / {cfg.n_ctx} / {cfg.d_vocab:,}"),
        ("MLPs", "none (attention only)" if cfg.attn_only else f"d_mlp {cfg.d_mlp}"),
        ("normalisation", cfg.normalization_type or "none"),
    ]
    if "n_params" in card:
        rows.append(("parameters", _fmt(card["n_params"])))
    if "validation_loss" in ev:
        rows.append(("validation loss (nats/token)", _fmt(ev["validation_loss"])))
    if probe.get("max_score") is not None:
        rows.append(("strongest induction head",
                     f"L{probe.get('max_layer')}H{probe.get('max_head')}: "
                     f"{_fmt(probe['max_score'], 3)} on the repeated-random-token probe"))
    if tr.get("tokens_seen"):
        rows.append(("training", f"{_fmt(tr.get('steps', '?'))} steps, "
                                 f"{_fmt(tr['tokens_seen'])} tokens"
                                 + (f", {tr['device']}" if tr.get("device") else "")))
    sources = (card.get("data", {}) or {}).get("sources", []) or []
    return dbc.Card([
        dbc.CardHeader(html.H5(lm.name, className="mb-0")),
        dbc.CardBody([
            html.P(card.get("description", ""), className="small"),
            dbc.Table(html.Tbody([html.Tr([html.Th(k), html.Td(v)]) for k, v in rows]),
                      size="sm", className="al-table mb-2"),
            html.Div([html.Div(f"Data: {s.get('attribution', s.get('name', ''))} "
                               f"({s.get('licence', 'licence unknown')})", className="small")
                      for s in sources]),
        ]),
    ], className="al-card")


@callback(Output(CARD, "children"), Output(LINKS, "children"), Input(shell.STATE, "data"))
def update(state: Optional[dict]) -> tuple[Any, Any]:
    """The card of the analysed model and links to every page carrying the prompt."""
    if not state:
        raise PreventUpdate
    links = [
        dbc.ListGroupItem([
            html.Div(dcc.Link(p["name"], href=shell.page_href(p["path"], state),
                              className="fw-bold")),
            html.Small(p.get("description") or "", className="text-muted"),
        ])
        for p in shell.pages() if p["path"] != "/"
    ]
    try:
        card = model_card(state["model"])
    except AnalysisError as exc:
        card = shell.alert(str(exc))
    return card, dbc.ListGroup(links)
