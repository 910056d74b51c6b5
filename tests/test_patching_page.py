"""/patching: the default example tells the induction story; bad input is an alert; clicks,
big models as a background job, figures."""

from __future__ import annotations

import dash
import numpy as np
import pytest
from conftest import restored_background

from attention_lens.analysis import declare as D
from attention_lens.analysis import patching as PT
from attention_lens.components import page as P
from attention_lens.analysis.labels import parse_head_label
from attention_lens.figures.patching import patching_figure, patching_scatter_figure
from attention_lens.server import ServerConfig, create_server

STATE = {"model": "attn-only-2l", "text": "Harry Potter went to the shop.", "pos": None}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with restored_background():
        app = create_server(ServerConfig(cache_size=8,
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
        assert app.server.test_client().get("/").status_code == 200
        yield app


def _draw(spec, state, **controls):
    """What the page draws for ``state`` and these controls, its job not run."""
    d = spec.render(state, compute=False, **controls)
    return d.figures, list(d.extras.values()), d.alerts, d.request


def _text(alerts) -> str:
    return " ".join(text for _, text in alerts)


def test_default_example_names_the_induction_circuit(server):
    spec = P.spec_of("patching")
    figures, extras, alerts, request = _draw(spec, STATE)
    assert request is dash.no_update
    note = _text(alerts)
    # the previous-token head after the corrupted token, then the four induction heads
    assert "Strongest cells: L0H2 at 20 'olid' (+9.54), L1H5 at 42 '·h' (+3.13), " \
           "L1H0 at 42 '·h' (+2.45), L1H6 at 42 '·h' (+2.35), L1H10 at 42 '·h' (+1.69)" in note
    exact = figures["exact"]
    assert exact.data[0].z.shape == (24, 43) and "denoising" in exact.layout.title.text
    assert "'olid'" in str(extras[0]) and "'ouse'" in str(extras[0])
    path = figures["path"]
    z = np.asarray(path.data[0].z)
    # L0H2's effect on the induction heads goes through their keys
    assert list(path.data[0].x) == ["query", "key", "value"]
    keys = z[:, 1]
    assert set(np.argsort(-keys)[:4]) == {5, 0, 6, 10}
    assert keys.max() > 5 * max(abs(z[:, 0]).max(), abs(z[:, 2]).max())


def test_the_prompt_bar_text_becomes_the_clean_prompt(server):
    from dash.exceptions import PreventUpdate

    from attention_lens.pages.patching import use_prompt

    assert use_prompt(1, {"text": "Harry Potter went to Hogwarts"}) == (
        "Harry Potter went to Hogwarts", "", "", "")
    for clicks, state in ((None, {"text": "x y"}), (1, {"text": "  "}), (1, None)):
        with pytest.raises(PreventUpdate):
            use_prompt(clicks, state)
    spec = P.spec_of("patching")
    _, _, alerts, _ = _draw(spec, STATE, clean="Harry Potter went to Hogwarts", corrupted="",
                            correct="", wrong="", granularity="head_out")
    assert "Corrupted prompt: the clean prompt with token" in _text(alerts)


def test_empty_boxes_are_filled_and_said(server):
    spec = P.spec_of("patching")
    _, _, alerts, _ = _draw(spec, STATE, corrupted="", correct="", wrong="",
                            granularity="head_out")
    note = _text(alerts)
    assert "token 19 '·h' changed to '·and'" in note
    assert "clean prompt's top prediction 'olid'" in note
    assert "corrupted prompt's top prediction 'ouse'" in note


@pytest.mark.parametrize("controls, message", [
    (dict(corrupted=" Anna gave Peter"), "same token length"),
    (dict(clean=""), "clean prompt: the prompt is empty"),
    (dict(correct="olidays"), "not a single token"),
    (dict(wrong="olid"), "the same token"),
    (dict(sender="L7H0"), "sender L7H0 does not exist"),
    (dict(sender="head"), "cannot read the sender"),
    (dict(granularity="mlp_out"), "no MLPs"),
    (dict(position="99"), "outside the prompts"),
    (dict(metric="loss"), "metric must be one of"),  # a bad link value: a warning
])
def test_bad_input_is_an_alert(server, controls, message):
    spec = P.spec_of("patching")
    _, _, alerts, _ = _draw(spec, STATE, **controls)
    assert message in _text(alerts)


def test_server_token_limit_applies(server, monkeypatch):
    from attention_lens import registry as registry_module

    monkeypatch.setattr(registry_module.current(), "max_tokens", 10)
    _, _, alerts, _ = _draw(P.spec_of("patching"), STATE)
    assert "the clean prompt has 43 tokens; this server analyses at most 10" in _text(alerts)


def test_click_opens_the_head_on_attention(server):
    from attention_lens.pages import patching as page

    href = page.open_head({"points": [{"x": "20: olid", "y": "L0H2"}]}, None, STATE,
                          PT.DEFAULT_CLEAN)
    assert href.startswith("/attention?") and "layer=0&head=2" in href and "holiday" in href
    href = page.open_head({"points": [{"x": "H5", "y": "L1"}]}, None, STATE, PT.DEFAULT_CLEAN)
    assert "layer=1&head=5" in href
    assert page.open_head({"points": [{"x": "3: a", "y": "L1"}]}, None, STATE, "x") is \
        dash.no_update
    assert parse_head_label("L1H10\u200b") == (1, 10) and parse_head_label("H3") is None


def test_big_models_patch_in_a_background_job(server, monkeypatch):
    monkeypatch.setattr(D, "INLINE_MAX_GFLOP", -1.0)
    spec = P.spec_of("patching")
    state = {**STATE, "text": STATE["text"] + " job"}
    figures, _, _, request = _draw(spec, state, granularity="head_v", sender="")
    assert figures["exact"] is dash.no_update
    assert request["labels"] == ["head_v activation patching"]
    progress = []
    values = [{"granularity": "head_v", "sender": ""}.get(c.name, c.default)
              for c in spec.controls]
    out = spec.run_job(progress.append, request, state, *values)
    assert progress and "activation patching (exact)" in out[0].layout.title.text
    figures, _, _, request = _draw(spec, state, granularity="head_v", sender="")
    assert request is dash.no_update and figures["exact"].data[0].z.shape == (2, 12)
    # answers the page chooses (token ids) reach the job as ids, not as digit strings
    auto = {"granularity": "head_v", "sender": "L0H2", "correct": "", "wrong": ""}
    figures, _, alerts, request = _draw(spec, state, **auto)
    assert isinstance(request, dict), alerts
    values = [auto.get(c.name, c.default) for c in spec.controls]
    out = spec.run_job(progress.append, request, state, *values)
    n_figs = len(spec.graphs) + len(spec.extras)
    assert not [a for a in out[n_figs] or [] if a.color == "danger"], out[n_figs]
    assert "activation patching (exact)" in out[0].layout.title.text
    assert "clean prompt's top prediction 'olid'" in " ".join(
        str(a.children) for a in out[n_figs])


def test_uploaded_pairs_are_averaged_in_a_job(server, monkeypatch):
    import base64

    from attention_lens.analysis import declare
    from attention_lens.pages import patching as page

    csv = ("clean,corrupted,correct,wrong\n"
           f"\"{PT.DEFAULT_CLEAN}\",\"{PT.DEFAULT_CORRUPTED}\",olid,ouse\n"
           " The cat sat on the mat. The cat sat on the, The man sat on the mat. The cat sat "
           "on the, mat, man\n")
    url = "data:text/csv;base64," + base64.b64encode(csv.encode()).decode()
    digest, status = page.upload_pairs(url, "pairs.csv")
    assert "2 pairs" in str(status.children)
    spec = P.spec_of("patching")
    controls = dict(pairs=digest, granularity="head_out", sender="")
    # the declared patching's one threshold between one pair's grid and the set's two
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")
    n = len(PT.pair_tokens(lm, PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED)[0])
    one = PT.PATCHING.gflop(lm.cfg, n, {"granularity": "head_out", "attribution": True})
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", 1.5 * one)
    figures, _, _, request = _draw(spec, STATE, **controls)
    assert request["labels"] == ["head_out activation patching"]
    values = [controls.get(c.name, c.default) for c in spec.controls]
    out = spec.run_job(lambda _: None, request, STATE, *values)
    fig = out[spec.graphs.index("pair-set")]
    assert "mean over 2 pairs" in fig.layout.title.text
    one = PT.activation_patching(server.server.extensions["attention_lens"]["registry"]
                                 .get("attn-only-2l"), PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED,
                                 correct="olid", wrong="ouse", granularity="head_out")
    two = PT.activation_patching(server.server.extensions["attention_lens"]["registry"]
                                 .get("attn-only-2l"),
                                 " The cat sat on the mat. The cat sat on the",
                                 " The man sat on the mat. The cat sat on the",
                                 correct=" mat", wrong=" man", granularity="head_out")
    np.testing.assert_allclose(np.asarray(fig.data[0].z), (one.effect + two.effect) / 2,
                               atol=1e-6)
    # bad files: a message, the page keeps its set
    for body, message in [("clean,corrupted\na,b\n", "lacks the column"),
                          ("clean,corrupted,correct,wrong\n" + "a b,a c, d, e\n" * 10_000,
                           "10,000 pairs; at most 100")]:
        bad = "data:text/csv;base64," + base64.b64encode(body.encode()).decode()
        value, status = page.upload_pairs(bad, "bad.csv")
        assert value is dash.no_update and message in str(status.children)
    value, status = page.upload_pairs("data:text/csv;base64,//79", "bin.csv")
    assert value is dash.no_update and "could not be read" in str(status.children)


def test_an_upload_the_store_cannot_keep_is_a_message_on_both_pair_pages(server, monkeypatch):
    """/patching and /circuit read uploads through one function: a store that cannot keep
    the file (Redis away, a full disk) gives a message, not a refused callback."""
    import base64

    from attention_lens import weight_analyses as W
    from attention_lens.pages import circuit, patching

    def unreachable(raw):
        raise OSError("no space left on device")

    monkeypatch.setattr(W, "keep_pair_set", unreachable)
    csv = f"clean,corrupted,correct,wrong\n\"{PT.DEFAULT_CLEAN}\",\"{PT.DEFAULT_CORRUPTED}\",olid,ouse\n"
    url = "data:text/csv;base64," + base64.b64encode(csv.encode()).decode()
    for page in (patching, circuit):
        value, status = page.upload_pairs(url, "pairs.csv")
        assert value is dash.no_update
        assert "cannot keep it right now (OSError)" in str(status.children)


@pytest.mark.parametrize("granularity", PT.GRANULARITIES)
def test_figures_of_every_granularity(tiny_ln, granularity):
    clean = "Harry Potter went to the shop, and Harry"
    grid = PT.activation_patching(tiny_ln, clean, "Harry Potter went to and shop, and Harry",
                                  correct=" Potter", wrong=" the", granularity=granularity)
    fig = patching_figure(grid)
    z = np.asarray(fig.data[0].z)
    assert z.size == grid.values.size and np.nanmax(np.abs(z)) == pytest.approx(
        np.abs(grid.effect).max())
    scatter = patching_scatter_figure(grid)
    assert len(scatter.data[1].x) == grid.values.size


# --------------------------------------------------------------------------- the browser
@pytest.mark.browser
def test_patching_page_in_the_browser(dash_duo, registry, tmp_path, bg):
    """The default example drawn with nothing overlapping at desktop and phone widths, and a
    real click on the previous-token head's cell opening it on /attention."""
    import os
    import time
    from pathlib import Path

    from selenium.webdriver.common.action_chains import ActionChains
    from test_browser import has_traces, url, wait
    from test_head_metrics import full_screenshot, geometry_problems

    from attention_lens.server.app import create_app

    shots = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    dash_duo.start_server(create_app(registry, background=bg))
    d = dash_duo.driver
    d.set_window_size(1440, 1000)
    d.get(url(dash_duo, "/patching", model="attn-only-2l", text="Harry Potter went."))
    for name in ("exact", "attribution", "scatter", "path"):
        wait(dash_duo, has_traces("patching", name), timeout=120, what=f"the {name} figure")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    assert "L1H5 at 42" in d.find_element("css selector", "#patching-alerts").text
    full_screenshot(d, shots / "patching.png")
    host = d.find_element("css selector",
                          '[id=\'{"name":"exact","page":"patching","type":"al-graph"}\'] '
                          '.js-plotly-plot')
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", host)
    time.sleep(0.3)
    x, y = d.execute_script(  # the viewport pixel of cell (row L0H2, column position 20)
        "const fl = arguments[0]._fullLayout, r = arguments[0].getBoundingClientRect();"
        "return [Math.round(r.left + fl.xaxis._offset + fl.xaxis.l2p(20)),"
        "        Math.round(r.top + fl.yaxis._offset + fl.yaxis.l2p(2))];", host)
    ActionChains(d).move_to_location(x, y).pause(0.2).click().perform()
    wait(dash_duo, "window.location.pathname === '/attention' && "
                   "window.location.search.includes('layer=0') && "
                   "window.location.search.includes('head=2')", what="L0H2 on /attention")
    wait(dash_duo, has_traces("attention", "pattern"), timeout=60, what="its pattern")
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    d.get(url(dash_duo, "/patching", model="attn-only-2l", text="Harry Potter went.",
              granularity="resid_pre"))
    for name in ("exact", "scatter", "path"):
        wait(dash_duo, has_traces("patching", name), timeout=60, what=f"the phone's {name}")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    # a real click patches the prompt bar's text instead of the example
    button = d.find_element("css selector", "#patching-use-prompt")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    time.sleep(0.3)
    ActionChains(d).move_to_element(button).click().perform()
    wait(dash_duo, "document.getElementById('patching-clean').value === 'Harry Potter "
                   "went.' && document.getElementById('patching-alerts').textContent"
                   ".includes('Corrupted prompt: the clean prompt with token')",
         timeout=120, what="the prompt bar's text patched")
    assert d.find_element("css selector", "#patching-corrupted").get_attribute("value") == ""
    assert [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"] == []


def test_many_heads_open_as_one_row_a_layer_and_the_pair_is_shown_whole(server, monkeypatch):
    from attention_lens.pages import patching as page

    monkeypatch.setattr(page, "MANY_HEADS", 10)  # attn-only-2l has 24 heads
    spec = P.spec_of("patching")
    figures, extras, alerts, _ = _draw(spec, STATE)
    # a layer's attention output (all its heads) × position first, said in the note
    assert figures["exact"].data[0].z.shape == (2, 43)
    assert "has 24 heads" in _text(alerts) and "every head" in _text(alerts)
    # both prompts whole, token by token, the one token that differs marked in each
    lm = P.model("attn-only-2l")
    clean, corrupted = PT.pair_tokens(lm, PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED)
    (diff,) = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
    lines = [c for c in extras[0].children if "al-pair-line" in getattr(c, "className", "")]
    assert len(lines) == 2
    for line, ids in zip(lines, (clean, corrupted)):
        tokens = line.children[1].children
        assert [t.children for t in tokens] == [lm.tokenizer.display(i) for i in ids]
        assert [i for i, t in enumerate(tokens) if "al-diff" in t.className] == [diff]
    figures, _, _, _ = _draw(spec, STATE, rows="heads")
    assert figures["exact"].data[0].z.shape == (24, 43)
