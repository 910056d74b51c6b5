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
from attention_lens.server.app import create_app
from attention_lens.components import downloads, shell
from attention_lens.components import page as P

MODEL = "attn-only-2l"
STATE = {"model": MODEL, "text": shell.DEFAULT_PROMPT, "pos": None, "src": "url"}


@pytest.fixture(scope="module")
def app(registry):
    """One app over the shipped weights; its pages, as Dash registered them."""
    return create_app(registry)


def declared() -> list[str]:
    """Every declared page, from dash.page_registry (after the app is built)."""
    return [s.page for s in P.declared_pages()]


@pytest.fixture(scope="module")
def pages(app):
    """The declared pages' names (the parametrised tests below cover every one)."""
    return declared()


def alert_texts(alerts) -> list[str]:
    """Messages of a list of dbc.Alert components."""
    return [str(a.children) for a in (alerts or [])]


def spec(name: str) -> P.PageSpec:
    """The declaration of page ``name``."""
    found = P.spec_of(name)
    assert found is not None, name
    return found


def test_every_page_is_registered_and_declared(app):
    paths = {p["path"] for p in dash.page_registry.values()}
    assert {"/", "/predictions", "/tokens", "/attention", "/logit-lens", "/attribution",
            "/ablation"} <= paths
    # every page module in the pages folder is registered, and every analysis page is a
    # declaration (the overview is the only free-form page)
    from pathlib import Path

    import attention_lens.pages

    folder = Path(attention_lens.pages.__file__).parent
    files = {p.stem for p in folder.glob("*.py") if not p.name.startswith("_")}
    registered = {k.rsplit(".", 1)[-1] for k in dash.page_registry}
    assert files == registered
    free = [p["path"] for p in dash.page_registry.values() if "attention_lens" not in p]
    assert free == ["/"]
    assert len(declared()) == len(files) - 1


def test_a_prompt_position_is_pos_on_every_page_so_a_pinned_token_reaches_it(app):
    """A token pinned on /tokens travels in the URL as ``pos``: every page whose control
    chooses a position of the prompt names it so. /patching and /circuit choose the metric's
    position in a pair of prompts and /compare one in two prompts, not in the pinned one."""
    own_prompt = {"patching", "circuit", "compare"}
    for page in P.declared_pages():
        names = {c.name for c in page.controls}
        if page.page not in own_prompt:
            assert "position" not in names, page.page
    assert {"predictions", "attribution", "logit-lens", "ablation", "graph"} <= {
        page.page for page in P.declared_pages() if "pos" in {c.name for c in page.controls}}
    drawn = spec("graph").render(STATE, pos="3")
    said = [text for _, text in drawn.alerts]
    assert [c for c, _ in drawn.alerts] == ["info"], drawn.alerts
    assert "Explaining the logit" in said[0] and " at position 3 " in said[0], said


def test_every_page_has_its_own_place_in_the_navbar(app):
    """No two pages share an ``order`` (the navbar's order is the pages' own, not their paths'
    alphabet's)."""
    orders = [p.get("order") for p in dash.page_registry.values() if "attention_lens" in
              p["module"]]
    assert None not in orders and len(set(orders)) == len(orders), sorted(orders)


def pytest_generate_tests(metafunc):
    """Parametrise ``page_name`` over every page Dash registers (built once here)."""
    if "page_name" in metafunc.fixturenames:
        from attention_lens.registry import Registry

        create_app(Registry())
        metafunc.parametrize("page_name", declared())


def test_main_callback_returns_figures_for_default_prompt(app, page_name):
    d = spec(page_name).render(STATE)
    assert d.errors == [], d.errors
    assert d.drew, f"{page_name} returned no figure"
    for name, fig in d.figures.items():
        if fig.data:  # a drawn figure carries numbers
            assert any(_has_values(t) for t in fig.data), (page_name, name)
        else:  # an empty one says why, in words
            said = [a.text for a in fig.layout.annotations if (a.text or "").strip()]
            assert said, (page_name, name)
    assert d.query["_src"] == "url" and set(spec(page_name).control_names) <= set(d.query)


def _has_values(trace) -> bool:
    """Whether a trace holds data (z, values, x/y or a table's cells)."""
    for key in ("z", "values", "y", "x", "cells"):
        v = getattr(trace, key, None) if key in trace else None
        if v is not None and (not hasattr(v, "__len__") or len(v)):
            return True
    return False


def test_layout_renders_from_query_and_reports_bad_params(app, page_name):
    from attention_lens.components.controls import Choice, Int, IntList

    sp = spec(page_name)
    div = dash.page_registry[next(k for k, p in dash.page_registry.items()
                                  if p.get("attention_lens") is sp)]["layout"]()
    assert isinstance(div, html.Div)
    # garbage in every link parameter (and an unknown model): a warning for each, by name
    text = str(sp.layout(model="no-such-model", **{c.name: "x!" for c in sp.controls}))
    for c in sp.controls:
        if isinstance(c, Int):
            assert f"Link parameter: {c.name} must be a whole number" in text, (page_name, c)
        elif isinstance(c, Choice):
            assert f"Link parameter: {c.name} must be one of" in text, (page_name, c)
        elif isinstance(c, IntList):
            assert f"Link parameter: {c.name} must be whole numbers" in text, (page_name, c)
    text = str(sp.layout())
    for c in sp.controls:  # each control is rendered, with its label
        assert f"'{sp.page}-{c.name}'" in text or c.name in ("plus", "minus")
        assert repr(c.label) in text
    for g in sp.graphs:
        assert f"'name': '{g}'" in text
    for e in sp.extras:
        assert f"'{sp.page}-{e}'" in text


def test_predictions_figure_depends_on_prompt_and_k(app):
    d = spec("predictions").render(STATE, k=7, pos=-1)
    assert len(d.figures["next-token"].data[0].y) == 7
    short = spec("predictions").render({**STATE, "text": "Harry Potter"}, k=7)
    assert len(short.figures["surprisal"].data[0].x) < len(d.figures["surprisal"].data[0].x)


def test_out_of_range_controls_become_alerts(app):
    pred = spec("predictions").render(STATE, k=10, pos=999)
    assert list(pred.figures.values()) == [dash.no_update] * 2
    assert pred.extras["table"] is dash.no_update
    assert any("outside the prompt" in t for t in pred.errors)
    att = spec("attention").render(STATE, layer=7, head=0)  # clamped to the model's layers
    assert any("layer 7 is above the largest allowed value 1" in t for t in att.errors)
    assert "Layer 1, head 0" in att.figures["pattern"].layout.title.text
    big = spec("predictions").render(STATE, k=1000)  # clamped to the allowed maximum
    assert any("above the largest allowed value 100" in t for t in big.errors)
    assert len(big.figures["next-token"].data[0].y) == 100


def test_bad_target_token_and_heads_are_alerts(app):
    lens = spec("logit-lens").render(STATE, colour="target", target="Hermione Granger")
    assert any("not a single token" in t for t in lens.errors)
    abl = spec("ablation").render(STATE, heads="L9H0")
    assert any("does not exist" in t for t in abl.errors)
    abl = spec("ablation").render(STATE, heads="banana")
    assert any("cannot read head" in t for t in abl.errors)


def test_attention_head_switch_reuses_the_forward_pass(app, registry):
    att = spec("attention")
    att.render(STATE, layer=1, head=5)
    before = registry.cache_info()["forward"]
    fig_a = att.render(STATE, layer=1, head=5).figures["pattern"]
    fig_b = att.render(STATE, layer=0, head=2).figures["pattern"]
    assert registry.cache_info()["forward"] == before
    assert "head 5" in fig_a.layout.title.text and "head 2" in fig_b.layout.title.text


def test_attention_head_switch_keeps_the_entropy(app):
    """Only the head changed: the grid is redrawn (it outlines the head shown), the entropy
    is left as drawn."""
    from contextvars import copy_context

    from dash._callback_context import context_value
    from dash._utils import AttributeDict

    att = spec("attention")

    def run():
        context_value.set(AttributeDict(triggered_inputs=[
            {"prop_id": "attention-head.value", "value": 2}]))
        return att.update(STATE, 1, 2, 0, None)

    out = copy_context().run(run)
    assert isinstance(out[0], go.Figure) and isinstance(out[1], go.Figure)
    assert out[2] is dash.no_update
    assert "Layer 1, head 2" in out[0].layout.title.text
    assert out[3] == "Showing L1H2, the head you chose."
    n = len(spec("attention").graphs) + len(spec("attention").extras)
    assert out[n + 1]["_src"] == "user"  # a control changed: a new history entry


def test_thumbnail_click_selects_head(app):
    att = sys.modules[next(k for k, p in dash.page_registry.items()
                           if p["path"] == "/attention")]
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
    d = spec("predictions").render({**STATE, "text": evil}, k=5)
    assert d.errors == []
    tree = json.dumps(spec("predictions").layout().to_plotly_json(), default=str)
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


def test_export_over_the_job_bound_says_busy(app):
    """Page export takes a job slot like any background job: over the bound it says so."""
    from attention_lens import background

    slots = background.current().slots
    held = [slots.reserve("other") for _ in range(slots.n)]
    try:
        ids = [{"type": P.EXPORT, "page": "predictions"}]
        _, statuses = downloads.export_page([1], ids, STATE, [{}])
        assert "The server is busy" in str(statuses[0].children)
    finally:
        for token in held:
            slots.release(token)
