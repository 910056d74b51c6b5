"""Page callbacks called directly (no browser): figures for the default prompt, errors as alerts."""

from __future__ import annotations

import io
import json
import sys
import zipfile

import dash
import plotly.graph_objects as go
import pytest
from dash import html

from attention_lens import export
from attention_lens.app import create_app
from attention_lens.components import page as P
from attention_lens.components import shell

MODEL = "attn-only-2l"
STATE = {"model": MODEL, "text": shell.DEFAULT_PROMPT, "pos": None, "src": "url"}
PAGES = ["predictions", "tokens", "attention", "logit_lens", "attribution", "ablation"]


@pytest.fixture(scope="module")
def app(registry):
    """One app over the shipped weights; its page modules, as Dash imported them."""
    return create_app(registry)


def page_module(name: str):
    """A page module imported by Dash (never imported directly)."""
    return sys.modules[f"attention_lens.pages.{name}"]


def controls(mod) -> list:
    """Each control's value as the page's layout would set it from an empty URL."""
    values, problems = P.parse_query(mod.CONTROLS, {})
    assert problems == []
    return [values[k] for k in mod.CONTROLS]


def alert_texts(alerts) -> list[str]:
    """Messages of a list of dbc.Alert components."""
    return [str(a.children) for a in (alerts or [])]


def test_every_page_is_registered(app):
    paths = {p["path"] for p in dash.page_registry.values()}
    assert {"/", "/predictions", "/tokens", "/attention", "/logit-lens", "/attribution",
            "/ablation"} <= paths


@pytest.mark.parametrize("name", PAGES)
def test_main_callback_returns_figures_for_default_prompt(app, name):
    mod = page_module(name)
    out = mod.update(STATE, *controls(mod))
    *outputs, alerts, query = out
    assert alert_texts(alerts) == []
    figures = [o for o in outputs if isinstance(o, go.Figure)]
    assert figures, f"{name} returned no figure"
    for fig in figures:
        assert len(fig.data) > 0
    assert query["src"] == "url" and set(mod.CONTROLS) <= set(query)


@pytest.mark.parametrize("name", PAGES)
def test_layout_renders_from_query_and_reports_bad_params(app, name):
    mod = page_module(name)
    div = mod.layout()
    assert isinstance(div, html.Div)
    bad = {k: "not-a-number" for k, p in mod.CONTROLS.items() if isinstance(p, P.IntParam)}
    div = mod.layout(**bad)
    text = json.dumps(div.to_plotly_json(), default=str)
    for k in bad:
        assert f"{k} must be a whole number" in text


def test_predictions_figure_depends_on_prompt_and_k(app):
    mod = page_module("predictions")
    top, surprisal, table, alerts, _ = mod.update(STATE, 7, -1)
    assert len(top.data[0].y) == 7
    short = {**STATE, "text": "Harry Potter"}
    _, surprisal2, *_ = mod.update(short, 7, -1)
    assert len(surprisal2.data[0].x) < len(surprisal.data[0].x)


def test_out_of_range_controls_become_alerts(app):
    pred = page_module("predictions")
    *outs, alerts, query = pred.update(STATE, 10, 999)
    assert outs == [dash.no_update] * 3
    assert any("outside the prompt" in t for t in alert_texts(alerts))
    att = page_module("attention")
    *outs, alerts, _ = att.update(STATE, 7, 0)
    assert any("layer 7 does not exist" in t for t in alert_texts(alerts))
    *outs, alerts, _ = pred.update(STATE, 1000, -1)  # clamped to the allowed maximum
    assert any("above the largest allowed value 100" in t for t in alert_texts(alerts))
    assert len(outs[0].data[0].y) == 100


def test_bad_target_token_and_heads_are_alerts(app):
    lens = page_module("logit_lens")
    *_, alerts, _ = lens.update(STATE, 5, "target", "Hermione Granger", -1, "sublayer")
    assert any("not a single token" in t for t in alert_texts(alerts))
    abl = page_module("ablation")
    *_, alerts, _ = abl.update(STATE, "induction", "L9H0", "zero", 10, -1, "")
    assert any("does not exist" in t for t in alert_texts(alerts))
    *_, alerts, _ = abl.update(STATE, "induction", "banana", "zero", 10, -1, "")
    assert any("cannot read head" in t for t in alert_texts(alerts))


def test_attention_head_switch_reuses_the_forward_pass(app, registry):
    att = page_module("attention")
    att.update(STATE, 1, 5)
    before = registry.cache_info()["forward"]
    fig_a = att.update(STATE, 1, 5)[0]
    fig_b = att.update(STATE, 0, 2)[0]
    assert registry.cache_info()["forward"] == before
    assert "head 5" in fig_a.layout.title.text and "head 2" in fig_b.layout.title.text


def test_thumbnail_click_selects_head(app):
    att = page_module("attention")
    from contextvars import copy_context

    from dash._callback_context import context_value
    from dash._utils import AttributeDict

    def run():
        context_value.set(AttributeDict(triggered_inputs=[
            {"prop_id": json.dumps(P.graph_id("attention", "all-heads"), sort_keys=True,
                                   separators=(",", ":")) + ".clickData", "value": 1}]))
        return att.select_head({"points": [{"curveNumber": 17}]}, None, STATE)

    assert copy_context().run(run) == (1, 5)  # 12 heads per layer


def test_sync_state_from_url_and_errors(app):
    state, text, model, alerts = shell.sync_state("?model=attn-only-1l&text=Hello%20there&pos=1",
                                                  None, None, None, None, None)
    assert state == {"model": "attn-only-1l", "text": "Hello there", "pos": 1, "theme": None,
                     "src": "url"}
    assert text == "Hello there" and model == "attn-only-1l" and alerts == []
    state, *_ = shell.sync_state("?text=Hi&theme=light", None, None, None, None, None)
    assert state["theme"] == "light"
    assert "theme=light" in shell.state_query(state)
    assert shell.toggle_theme(1, state)["theme"] is None
    assert shell.toggle_theme(1, {**state, "theme": None})["theme"] == "light"
    assert shell.theme_label(state) == "Dark theme"
    state, text, model, alerts = shell.sync_state("?model=nope&text=Hi&pos=x", None, None,
                                                  None, None, None)
    assert model == MODEL and text == "Hi"
    msgs = " ".join(alert_texts(alerts))
    assert "'nope'" in msgs and "whole number" in msgs
    # an empty prompt keeps the last good state and the typed text stays in the box
    state, text, model, alerts = shell.sync_state("?text=%20%20", None, None, None, None, STATE)
    assert state is dash.no_update and text == "  " and "empty" in alert_texts(alerts)[0]


def test_over_long_prompt_is_truncated_with_a_message(app, registry):
    long = " ".join(["Harry"] * 400)
    state, *_, alerts = shell.sync_state("?text=" + long.replace(" ", "%20"), None, None, None,
                                         None, None)
    assert state["text"] == long
    assert any("analysed the first 128 of" in t for t in alert_texts(alerts))


def test_nav_links_carry_the_state(app):
    ids = [{"type": shell.NAVLINK, "path": "/attention"}, {"type": shell.NAVLINK, "path": "/"}]
    hrefs, active = shell.nav_links(STATE, "/attention", ids)
    assert hrefs[0].startswith("/attention?model=attn-only-2l&text=Harry+Potter")
    assert active == [True, False]


def test_user_text_is_never_html(app):
    evil = "<img src=x onerror=alert(1)>"
    state = {**STATE, "text": evil}
    mod = page_module("predictions")
    *_, alerts, _ = mod.update(state, 5, -1)
    assert alert_texts(alerts) == []
    tree = json.dumps(mod.layout().to_plotly_json(), default=str)
    assert "dangerously_allow_html" not in tree


def test_data_downloads_and_zip_without_images(app, registry):
    panels = P.page_panels("attention", STATE, {"layer": "1", "head": "5"})
    assert [p.name for p in panels] == ["pattern", "all-heads", "entropy"]
    csv_text = export.figure_csv(panels[0].figure)
    n = registry.forward(STATE["text"], MODEL).n_tokens
    assert csv_text.splitlines()[0] == "trace,name,type,x,y,z,text,customdata"
    assert len(csv_text.splitlines()) == 1 + n * n
    data = json.loads(export.panel_json(panels[0], STATE))
    assert data["data"]["layer"] == 1 and len(data["data"]["pattern"]) == n
    blob = export.page_zip("attention", panels, STATE, {"layer": 1, "head": 5},
                           registry.forward(STATE["text"], MODEL), images=False)
    zf = zipfile.ZipFile(io.BytesIO(blob))
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["model"] == MODEL and manifest["prompt"] == STATE["text"]
    assert len(manifest["token_ids"]) == n and manifest["settings"] == {"layer": 1, "head": 5}
    assert {"pattern.csv", "all-heads.json", "entropy.plotly.json"} <= set(zf.namelist())


def test_export_without_chromium_says_so(app, monkeypatch):
    monkeypatch.setattr(export, "find_chromium", lambda: None)
    panels = P.page_panels("predictions", STATE, {})
    with pytest.raises(export.ExportError, match="needs Chromium"):
        export.page_zip("predictions", panels, STATE, {})
