"""Dataset head metrics: plain-loop recomputation, agreement with the probe, examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attention_lens.analysis.datasets import Dataset, dataset_windows, load_dataset
from attention_lens.analysis.eigen import copying_score, full_ov_eigenvalues
from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.head_metrics import (
    ALL_METRICS,
    PATTERN_METRICS,
    head_examples,
    head_metrics,
    metric_targets,
)
from attention_lens.analysis.heads import probe_head_scores

TEXT = ("the cat sat on the mat and the cat sat on the hat. " * 6 + "Harry Potter and Harry "
        "Potter went to the shop. ") * 2


def loop_metrics(lm, tokens: np.ndarray) -> tuple[dict, dict]:
    """Every metric by plain Python loops over windows, heads and queries.

    Returns (per-window means [n, L, H] with NaN where a window has no query, pooled means).
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(lm.cfg.n_layers)]
    _, cache = lm.model.run_with_cache(torch.as_tensor(tokens), names_filter=names)
    n, p = tokens.shape
    L, H = lm.cfg.n_layers, lm.cfg.n_heads
    per = {m: np.full((n, L, H), np.nan) for m in PATTERN_METRICS}
    sums = {m: np.zeros((L, H)) for m in PATTERN_METRICS}
    counts = {m: 0 for m in PATTERN_METRICS}
    for w in range(n):
        t = [int(x) for x in tokens[w]]
        for layer in range(L):
            A = cache[names[layer]][w].double().numpy()
            for h in range(H):
                vals = {m: [] for m in PATTERN_METRICS}
                for i in range(1, p):
                    row = A[h, i]
                    vals["previous_token"].append(row[i - 1])
                    vals["first_token"].append(row[0])
                    vals["self"].append(row[i])
                    vals["entropy"].append(-sum(a * math.log(a) for a in row[: i + 1] if a > 0))
                    if t[i] in t[:i]:
                        vals["duplicate_token"].append(
                            sum(row[j] for j in range(i) if t[j] == t[i]))
                        vals["induction"].append(
                            sum(row[j] for j in range(1, i + 1) if t[j - 1] == t[i]))
                for m, v in vals.items():
                    if v:
                        per[m][w, layer, h] = sum(v) / len(v)
                        sums[m][layer, h] += sum(v)
                    if layer == 0 and h == 0:
                        counts[m] += len(v)
    pooled = {m: sums[m] / counts[m] for m in PATTERN_METRICS}
    return per, pooled


def _windows(lm, text: str = TEXT, length: int = 32, stride: int = 24, n: int = 4):
    ds = Dataset("t", (text,), sha256="x")
    return dataset_windows(lm, ds, length=length, stride=stride, max_windows=n)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_ln"])
def test_metrics_equal_plain_loops(fixture, request):
    lm = request.getfixturevalue(fixture)
    w = _windows(lm)
    hm = head_metrics(lm, w, batch_size=3)  # batches of 3 and 1: batching cannot matter
    per, pooled = loop_metrics(lm, w.tokens)
    for m in PATTERN_METRICS:
        np.testing.assert_allclose(hm.per_window[m], per[m], atol=1e-6, rtol=0, err_msg=m)
        np.testing.assert_allclose(hm.metrics[m], pooled[m], atol=1e-6, rtol=0, err_msg=m)
    assert hm.n_queries["previous_token"] == w.n_windows * (w.length - 1)
    # induction and duplicate average over the queries that have an earlier copy only
    copies = sum(sum(1 for i in range(1, w.length) if row[i] in row[:i])
                 for row in w.tokens.tolist())
    assert hm.n_queries["induction"] == hm.n_queries["duplicate_token"] == copies > 0


def test_metrics_equal_plain_loops_on_shipped_windows(model_2l):
    ds = load_dataset("validation")
    w = dataset_windows(model_2l, ds, length=64, stride=64, max_windows=3)
    hm = head_metrics(model_2l, w)
    per, pooled = loop_metrics(model_2l, w.tokens)
    for m in PATTERN_METRICS:
        np.testing.assert_allclose(hm.per_window[m], per[m], atol=1e-6, rtol=0, err_msg=m)
        np.testing.assert_allclose(hm.metrics[m], pooled[m], atol=1e-6, rtol=0, err_msg=m)


def test_best_query_and_examples(tiny):
    w = _windows(tiny, n=4)
    hm = head_metrics(tiny, w)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(tiny.cfg.n_layers)]
    _, cache = tiny.model.run_with_cache(torch.as_tensor(w.tokens), names_filter=names)
    layer, head = 1, 2
    for metric in ("induction", "previous_token", "entropy"):
        for win in range(w.n_windows):
            q = hm.best_query[metric][win, layer, head]
            A = cache[names[layer]][win, head].double().numpy()
            t = w.tokens[win]
            candidates = [i for i in range(1, w.length)
                          if metric != "induction" or t[i] in t[:i]]
            if not candidates:
                assert q == -1
                continue

            def value(i):
                if metric == "entropy":
                    return -sum(a * math.log(a) for a in A[i, : i + 1] if a > 0)
                return float(A[i][metric_targets(t, metric, i)].sum())
            assert value(q) == pytest.approx(max(value(i) for i in candidates), abs=1e-6)
        top = hm.examples(metric, layer, head, n=2)
        vals = hm.per_window[metric][:, layer, head]
        assert top[0]["value"] == pytest.approx(np.nanmax(vals))
        assert top[0]["value"] >= top[1]["value"]
        dec = hm.deciles(metric, layer, head)
        assert [d["percentile"] for d in dec] == list(range(10, 100, 10))
        assert all(a["value"] <= b["value"] for a, b in zip(dec, dec[1:]))
    ex = head_examples(tiny, hm, "induction", layer, head, n=2)
    for e in ex:
        A = cache[names[layer]][e.window, head].double().numpy()
        np.testing.assert_allclose(e.attention, A[e.query], atol=1e-7)
        assert e.targets.sum() >= 1 and len(e.display) == w.length


def test_copying_score_passes_through(model_1l):
    copying = copying_score(full_ov_eigenvalues(model_1l))
    w = dataset_windows(model_1l, load_dataset("validation"), max_windows=2)
    hm = head_metrics(model_1l, w, copying=copying)
    assert set(hm.metrics) == set(ALL_METRICS)
    np.testing.assert_array_equal(hm.metrics["copying"], copying)
    with pytest.raises(AnalysisError):
        head_metrics(model_1l, w, copying=np.zeros((3, 3)))


def test_shipped_ranking_agrees_with_probe(model_2l):
    """The dataset ranking finds the probe's heads (computed from both, not written down)."""
    w = dataset_windows(model_2l, load_dataset("validation"))  # 400 windows x 128
    assert (w.n_windows, w.length) == (400, 128)
    hm = head_metrics(model_2l, w)
    probe = probe_head_scores(model_2l)
    n_probe = int((probe.induction >= 0.6).sum())
    assert n_probe >= 4
    top = hm.ranking("induction", 4)
    for layer, head, _ in top:
        assert layer == 1 and probe.induction[layer, head] >= 0.6, (layer, head)
    prev = hm.ranking("previous_token", 1)[0][:2]
    assert prev == tuple(int(i) for i in np.unravel_index(probe.previous_token.argmax(),
                                                           probe.previous_token.shape))


def test_bad_inputs(tiny):
    w = _windows(tiny)
    hm = head_metrics(tiny, w)
    with pytest.raises(AnalysisError, match="unknown metric"):
        hm.ranking("nonsense")
    with pytest.raises(AnalysisError, match="does not exist"):
        hm.examples("induction", 5, 0)


# ----------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def api():
    from attention_lens.server import ServerConfig, create_server

    app = create_server(ServerConfig(cache_size=8))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    return client, app.server.extensions["attention_lens"]["registry"]


def test_api_head_metrics_matches_the_analysis(api):
    client, reg = api
    lm = reg.get("attn-only-2l")
    body = {"windows": 6, "length": 64, "stride": 64, "metric": "previous_token",
            "n_examples": 2, "copying": False}
    r = client.post("/api/head-metrics", json=body)
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    w = dataset_windows(lm, load_dataset("validation"), length=64, stride=64, max_windows=6)
    hm = head_metrics(lm, w)
    for m in PATTERN_METRICS:
        np.testing.assert_allclose(data["metrics"][m], hm.metrics[m], rtol=1e-6, atol=1e-9)
    assert data["dataset"]["sha256"] == lm.card["data"]["val_sha256"]
    assert data["dataset"]["stride"] == 64 and "every 64 tokens" in data["dataset"]["description"]
    best = hm.ranking("previous_token", 1)[0]
    assert (data["examples"]["layer"], data["examples"]["head"]) == best[:2]
    assert len(data["examples"]["windows"]) == 2 and "copying" not in data["metrics"]
    text = {"text": "the cat sat on the mat. " * 40, "windows": 3, "length": 32,
            "layer": 1, "head": 5, "metric": "induction"}
    r = client.post("/api/head-metrics", json=text)
    assert r.status_code == 200 and r.get_json()["examples"]["head"] == 5
    assert r.get_json()["metrics"]["copying"]


@pytest.mark.parametrize("body, message", [
    ({"dataset": "nope.txt"}, "unknown dataset"),
    ({"dataset": "validation", "text": "x"}, "not both"),
    ({"text": ""}, "empty"),
    ({"windows": 0}, "'windows' must be between 1"),
    ({"length": 999}, "context"),
    ({"metric": "copying"}, "'metric' must be one of"),
    ({"text": "a b"}, "too short"),
    ({"layer": 7, "head": 0}, "'layer' must be between"),
])
def test_api_head_metrics_bad_input(api, body, message):
    client, _ = api
    r = client.post("/api/head-metrics", json=body)
    assert r.status_code == 400 and message in r.get_json()["error"], r.get_json()


def test_api_head_metrics_defaults_on_models_with_few_heads(tmp_path, tiny_tokenizer):
    """The default ``top`` (10) is capped at the number of heads; an explicit value beyond
    it is still a 400."""
    from attention_lens.model import save_model
    from attention_lens.server import ServerConfig, create_server
    from tests.conftest import make_tiny

    models = {"tiny-attn": make_tiny(tiny_tokenizer, name="tiny-attn"),  # 2 x 4 heads
              "tiny-4h": make_tiny(tiny_tokenizer, seed=2, n_layers=1, attn_only=False,
                                   d_mlp=64, act_fn="gelu", normalization_type="LN",
                                   name="tiny-4h")}
    for name, lm in models.items():
        save_model(lm.model, tiny_tokenizer, tmp_path / name)
    app = create_server(ServerConfig(models_dirs=[tmp_path], model="tiny-attn", cache_size=4))
    client = app.server.test_client()
    reg = app.server.extensions["attention_lens"]["registry"]
    body = {"text": TEXT, "windows": 3, "length": 32}
    for name, n_heads in (("tiny-attn", 8), ("tiny-4h", 4)):
        r = client.post("/api/head-metrics", json={**body, "model": name})
        assert r.status_code == 200, r.get_json()
        data = r.get_json()
        lm = reg.get(name)
        hm = head_metrics(lm, dataset_windows(lm, Dataset("t", (TEXT,), sha256="x"),
                                              length=32, stride=32, max_windows=3))
        for m in PATTERN_METRICS:
            ranked = data["ranking"][m]
            assert len(ranked) == n_heads, (name, m)
            assert [(e["layer"], e["head"]) for e in ranked] == \
                [(la, h) for la, h, _ in hm.ranking(m, n_heads)]
            np.testing.assert_allclose(data["metrics"][m], hm.metrics[m], rtol=1e-6,
                                       atol=1e-9)
        r = client.post("/api/head-metrics", json={**body, "model": name, "top": n_heads + 1})
        assert r.status_code == 400
        assert f"'top' must be between 1 and {n_heads}" in r.get_json()["error"]


# --------------------------------------------------------------------------- the browser
GEOMETRY_JS = """
const problems = [], boxes = [];
const page = document.querySelector('.al-page');
if (!page) { return ['no page']; }
page.querySelectorAll('.js-plotly-plot').forEach(function (gd, i) {
    const svg = gd.querySelector('.main-svg');
    const name = (gd.closest('[id]') || {}).id || ('figure ' + i);
    if (!svg) { return; }
    const g = gd.getBoundingClientRect(), s = svg.getBoundingClientRect();
    if (s.height > g.height + 2 || s.width > g.width + 2 || g.height < 50) {
        problems.push(name + ': figure ' + Math.round(s.width) + 'x' + Math.round(s.height) +
                      ' in a box of ' + Math.round(g.width) + 'x' + Math.round(g.height));
    }
    if (g.right > document.documentElement.clientWidth + 2) {
        problems.push(name + ' is cut at the right edge');
    }
    boxes.push([name, g]);
});
page.querySelectorAll('h2, h4, .dash-table-container, .al-examples, .al-upload')
    .forEach(function (el, i) {
        const r = el.getBoundingClientRect();
        if (r.width > 0 && r.height > 0) { boxes.push([el.tagName + '.' + el.className + i, r]); }
    });
for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
        const a = boxes[i][1], b = boxes[j][1];
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        if (w > 2 && h > 2) { problems.push(boxes[i][0] + ' overlaps ' + boxes[j][0]); }
    }
}
return problems;
"""


def geometry_problems(driver) -> list[str]:
    """Figures taller or wider than their boxes, cut at the edge, or overlapping anything."""
    return driver.execute_script(GEOMETRY_JS)


def full_screenshot(driver, path) -> None:
    """The whole page as a PNG (beyond the window's height), via the DevTools protocol."""
    import base64

    # fixed and sticky bars would be painted over the page's middle in a beyond-viewport shot
    w, h = driver.execute_script(
        "window.scrollTo(0, 0);"
        "document.querySelectorAll('body *').forEach(function (el) {"
        "  const p = getComputedStyle(el).position;"
        "  if (p === 'fixed' || p === 'sticky') { el.style.position = 'static'; } });"
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def point_offset(driver, element, trace: int, index: int) -> tuple[int, int]:
    """Pixel offset, from the plot element's top-left corner, of a scatter/line point."""
    return tuple(driver.execute_script(
        "const gd = arguments[0], fl = gd._fullLayout, d = gd._fullData[arguments[1]];"
        "const xa = fl[d.xaxis === 'x' ? 'xaxis' : 'xaxis' + d.xaxis.slice(1)];"
        "const ya = fl[d.yaxis === 'y' ? 'yaxis' : 'yaxis' + d.yaxis.slice(1)];"
        "const cd = gd.calcdata[arguments[1]][arguments[2]];"
        "return [Math.round(xa._offset + xa.c2p(cd.x)), Math.round(ya._offset + ya.c2p(cd.y))];",
        element, trace, index))


@pytest.mark.browser
def test_heads_page_in_the_browser(dash_duo, registry, tmp_path, bg):
    """Geometry at desktop and phone widths; a real click on the head finder selects a head;
    hovering a prompt token redraws every head's attention from it."""
    import os
    import time
    from pathlib import Path

    from selenium.webdriver.common.action_chains import ActionChains
    from test_browser import has_traces, url, wait

    from attention_lens.server.app import create_app
    from attention_lens.components import shell

    shots = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    dash_duo.start_server(create_app(registry, background=bg))
    d = dash_duo.driver
    d.set_script_timeout(120)  # a busy machine's browser answers slowly
    d.set_window_size(1440, 1000)
    d.get(url(dash_duo, "/heads", model="attn-only-2l", text=shell.DEFAULT_PROMPT))
    wait(dash_duo, has_traces("heads", "finder"), timeout=180, what="the head finder")
    wait(dash_duo, "document.querySelector('#heads-all-heads-graph .js-plotly-plot') && "
                   "document.querySelector('#heads-all-heads-graph .js-plotly-plot')"
                   "._fullData.length > 0", what="the all-heads view")
    wait(dash_duo, "document.querySelectorAll('.al-example').length >= 10",
         what="examples and deciles")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    assert dash_duo.driver.execute_script(
        "return document.querySelectorAll('.dash-spreadsheet td').length") >= 12 * 7
    # a real click on the layer-0 point of head 2 of the head finder
    host = d.find_element("css selector",
                          '[id=\'{"name":"finder","page":"heads","type":"al-graph"}\'] '
                          '.js-plotly-plot')
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", host)
    time.sleep(0.3)
    x, y = point_offset(d, host, 0, 2)
    ActionChains(d).move_to_element_with_offset(host, x, y).click().perform()
    wait(dash_duo, "document.getElementById('heads-layer').value === '0' && "
                   "document.getElementById('heads-head').value === '2'",
         timeout=60, what="L0H2 selected by the click")
    wait(dash_duo, "window.location.search.includes('head=2')", what="the URL")
    wait(dash_duo, "Array.from(document.querySelectorAll('.al-examples h5'))"
                   ".some(h => h.textContent.startsWith('L0H2'))", timeout=60,
         what="L0H2's examples")
    # hover the fourth token of the prompt: every head's attention from it
    prompt = d.find_element("css selector", "#heads-prompt-graph .js-plotly-plot")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", prompt)
    time.sleep(0.3)
    px, py = d.execute_script(
        "const gd = arguments[0], fl = gd._fullLayout;"
        "return [fl.xaxis._offset + fl.xaxis.c2p(3), fl.yaxis._offset + fl.yaxis.c2p(0)];",
        prompt)
    ActionChains(d).move_to_element_with_offset(prompt, int(px) - 3, int(py)) \
        .move_to_element_with_offset(prompt, int(px), int(py)).perform()
    wait(dash_duo, "(document.querySelector('#heads-all-heads-graph .gtitle') || {})"
                   ".textContent.includes('from 3:')", timeout=60,
         what="the hovered token's view")
    assert geometry_problems(d) == []
    # screenshots last: capturing resizes the viewport for a moment
    d.get(url(dash_duo, "/heads", model="attn-only-2l", text=shell.DEFAULT_PROMPT))
    wait(dash_duo, has_traces("heads", "finder"), timeout=60, what="the head finder again")
    wait(dash_duo, "document.querySelectorAll('.al-example').length >= 10", what="examples")
    time.sleep(1.0)
    full_screenshot(d, shots / "heads.png")
    # a phone: the page loaded at 390 x 844 (cached results now)
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 1,
                       "mobile": True})
    d.get(url(dash_duo, "/heads", model="attn-only-2l", text=shell.DEFAULT_PROMPT))
    wait(dash_duo, has_traces("heads", "finder"), timeout=60, what="the phone's finder")
    wait(dash_duo, "document.querySelector('#heads-all-heads-graph .js-plotly-plot') && "
                   "document.querySelector('#heads-all-heads-graph .js-plotly-plot')"
                   "._fullData.length > 0", what="the phone's all-heads view")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    widths = d.execute_script("return [document.body.scrollWidth, "
                              "document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] + 1, widths
    full_screenshot(d, shots / "phone-heads.png")
    assert [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"] == []


@pytest.mark.browser
def test_heads_upload_messages(dash_duo, registry, tmp_path, bg):
    """Uploaded files: binary, not UTF-8, empty and too large ones are refused with a reason;
    a good one becomes the dataset."""
    from test_browser import url, wait

    from attention_lens.analysis.datasets import MAX_UPLOAD_BYTES
    from attention_lens.server.app import create_app
    from attention_lens.components import shell

    files = {"bin.txt": b"\x00\x01\x02binary", "latin.txt": "café".encode("latin-1"),
             "empty.txt": b"", "big.txt": b"word " * (MAX_UPLOAD_BYTES // 5 + 100),
             "good.jsonl": b'{"text": "the cat sat on the mat. the cat sat on the mat."}\n' * 30}
    expect = {"bin.txt": "looks binary", "latin.txt": "not UTF-8", "empty.txt": "empty",
              "big.txt": "at most 512 KiB", "good.jsonl": "Using good.jsonl: 30 documents"}
    dash_duo.start_server(create_app(registry, background=bg))
    dash_duo.driver.get(url(dash_duo, "/heads", model="attn-only-2l",
                            text=shell.DEFAULT_PROMPT, windows=8, length=32))
    dash_duo.wait_for_element("#heads-upload input[type=file]", timeout=20)
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        box = dash_duo.driver.find_element("css selector", "#heads-upload input[type=file]")
        box.send_keys(str(path))
        wait(dash_duo, "document.getElementById('heads-upload-status').textContent"
                       f".includes({expect[name]!r})", timeout=30, what=expect[name])
    wait(dash_duo, "document.getElementById('heads-dataset').value.startsWith('upload:')",
         what="the uploaded dataset chosen")
    wait(dash_duo, "(document.getElementById('heads-alerts') || {}).textContent !== undefined"
                   " && document.body.textContent.includes('uploaded')", what="a note")
    assert [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"] == []


def test_heads_page_second_visit_reuses_the_heads_examples(tmp_path, monkeypatch):
    """/heads' examples (a forward pass of their windows each) are kept with the model's
    weight analyses: a second visit shows the same examples without running them again."""
    from conftest import restored_background

    from attention_lens.components import page as P
    from attention_lens.components.shell import DEFAULT_PROMPT
    from attention_lens.server import ServerConfig, create_server

    with restored_background():
        create_server(ServerConfig(cache_size=4, cache_dir=str(tmp_path)))
        from attention_lens.pages import heads as page

        state = {"model": "attn-only-2l", "text": DEFAULT_PROMPT, "pos": None}
        spec = P.spec_of("heads")
        first = spec.render(state)
        assert first.errors == [] and first.drew
        runs = []
        real = page.head_examples
        monkeypatch.setattr(page, "head_examples", lambda *a, **k: runs.append(a) or real(*a, **k))
        again = spec.render(state)
        assert runs == [] and again.errors == []
        assert str(again.extras["examples"]) == str(first.extras["examples"])
        assert "top 5 windows" in str(again.extras["examples"])
        other = spec.render(state, layer=0, head=1)  # another head: its own examples
        assert len(runs) == 2 and "L0H1: top" in str(other.extras["examples"])
