"""The Dash app factory."""

from __future__ import annotations

from typing import Optional

import dash
import dash_bootstrap_components as dbc
from dash import html

from . import __version__
from .registry import Registry

_REGISTRY: Optional[Registry] = None


def registry() -> Registry:
    """The process-wide model registry used by page callbacks."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def set_registry(reg: Registry) -> None:
    """Install the registry page callbacks use (the server and tests call this)."""
    global _REGISTRY
    _REGISTRY = reg


def create_app(reg: Optional[Registry] = None) -> dash.Dash:
    """Build the Dash app around ``reg`` (a default registry over ``weights/`` if None)."""
    if reg is not None:
        set_registry(reg)
    reg = registry()
    app = dash.Dash(__name__, title="Attention Lens", suppress_callback_exceptions=True,
                    serve_locally=True)
    lm = reg.get()
    card = lm.card
    ev = card.get("evaluation", {})
    probe = ev.get("induction_probe", {})
    app.layout = dbc.Container([
        html.H1("Attention Lens"),
        html.P(f"Model {lm.name}: {card.get('description', '')}"),
        html.Ul([
            html.Li(f"parameters: {card.get('n_params', 'unknown')}"),
            html.Li(f"validation loss: {ev.get('validation_loss', 'unknown')}"),
            html.Li(f"max induction score: {probe.get('max_score', 'unknown')} "
                    f"(layer {probe.get('max_layer')}, head {probe.get('max_head')})"),
        ]),
        html.Footer(f"v{__version__}"),
    ])
    return app
