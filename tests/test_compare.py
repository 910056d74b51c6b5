"""Comparison of two prompts / two models, and in-context-learning curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_lens.analysis.attribution import logit_attribution
from attention_lens.analysis.compare import (
    compare,
    default_icl_positions,
    icl_score,
    icl_view,
    loss_by_position,
    probe_halves,
    same_tokenizer,
)
from attention_lens.analysis.datasets import dataset_windows, load_dataset
from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.heads import probe_head_scores
from attention_lens.analysis.logit_lens import logit_lens

CLEAN = "The king and the man went to the store, and the king gave a drink to the"
CORRUPT = "The king and the man went to the store, and the man gave a drink to the"


def _losses(lm, ids) -> np.ndarray:
    return lm.model.loss(torch.as_tensor(ids)[None], per_token=True)[0].double().numpy()


def test_two_prompts_differences_equal_separate_values(model_2l):
    fa, fb = run_forward(model_2l, CLEAN), run_forward(model_2l, CORRUPT)
    c = compare(model_2l, fa, model_2l, fb, layer=1, head=5, k=5)
    assert c.mode == "prompts" and c.n_common == fa.n_tokens == fb.n_tokens
    np.testing.assert_allclose(c.loss_diff, _losses(model_2l, fb.token_ids)
                               - _losses(model_2l, fa.token_ids), atol=1e-5)
    pa = torch.softmax(fa.logits[-1].double(), -1).numpy()
    pb = torch.softmax(fb.logits[-1].double(), -1).numpy()
    np.testing.assert_allclose(c.prob_diff, pb[c.prob_ids] - pa[c.prob_ids], atol=1e-12)
    assert set(c.a.top_ids) | set(c.b.top_ids) == set(c.prob_ids)
    names = ["blocks.1.attn.hook_pattern"]
    _, ca = model_2l.model.run_with_cache(torch.as_tensor(fa.token_ids)[None], names_filter=names)
    _, cb = model_2l.model.run_with_cache(torch.as_tensor(fb.token_ids)[None], names_filter=names)
    np.testing.assert_allclose(c.pattern_diff, (cb[names[0]][0, 5] - ca[names[0]][0, 5]).numpy(),
                               atol=1e-6)
    target = int(fa.logits[-1].argmax())
    assert c.target_id == target
    da = logit_attribution(model_2l, fa, target=target)
    db = logit_attribution(model_2l, fb, target=target)
    assert c.dla_labels == da.labels
    np.testing.assert_allclose(c.dla_diff, db.values - da.values, atol=1e-9)
    la = logit_lens(model_2l, fa, k=1, target=target, granularity="layer")
    lb = logit_lens(model_2l, fb, k=1, target=target, granularity="layer")
    # float32 logits of one row against all rows: the same to 1e-6
    np.testing.assert_allclose(c.lens_diff, lb.target_probs[:, -1] - la.target_probs[:, -1],
                               atol=1e-6)
    assert c.lens_labels == ("embeddings", "after L0", "after L1")
    assert not c.notes


def test_two_models_share_a_tokenizer(model_1l, model_2l):
    fa, fb = run_forward(model_1l, CLEAN), run_forward(model_2l, CLEAN)
    c = compare(model_1l, fa, model_2l, fb, layer=1, head=5)
    assert c.mode == "models" and c.a.pattern is None and c.pattern_diff is None
    assert any("attn-only-1l has no head L1H5" in n for n in c.notes)
    np.testing.assert_allclose(c.loss_diff, _losses(model_2l, fb.token_ids)
                               - _losses(model_1l, fa.token_ids), atol=1e-5)
    assert c.lens_labels == ("embeddings", "after L0")
    assert "L0H3" in c.dla_labels and "L1H5" not in c.dla_labels
    i = c.dla_labels.index("L0H3")
    da = logit_attribution(model_1l, fa, target=c.target_id)
    db = logit_attribution(model_2l, fb, target=c.target_id)
    assert c.dla_diff[i] == pytest.approx(db.values[db.labels.index("L0H3")]
                                          - da.values[da.labels.index("L0H3")], abs=1e-9)
    with pytest.raises(AnalysisError, match="exists in neither"):
        compare(model_1l, fa, model_1l, fa, layer=1, head=0)


def test_different_tokenizers_and_lengths(model_2l, tiny):
    fa, ft = run_forward(model_2l, CLEAN), run_forward(tiny, CLEAN)
    reason = same_tokenizer(model_2l, tiny)
    assert reason and "different tokenizers" in reason
    with pytest.raises(AnalysisError, match="different tokenizers"):
        compare(model_2l, fa, tiny, ft)
    short = run_forward(model_2l, "The king and the man went")
    c = compare(model_2l, fa, model_2l, short, layer=0, head=2)
    assert c.n_common == short.n_tokens and c.pattern_diff is None
    assert len(c.loss_diff) == short.n_tokens - 1
    assert any("differences cover the first" in n for n in c.notes)
    np.testing.assert_allclose(c.loss_diff, _losses(model_2l, short.token_ids)
                               - _losses(model_2l, fa.token_ids)[: short.n_tokens - 1],
                               atol=1e-5)
    same = compare(model_2l, fa, model_2l, fa)
    assert np.all(same.loss_diff == 0) and "every difference is 0" in same.notes[0]


def test_icl_on_the_probe(model_1l, model_2l):
    """The 2-layer model predicts the repeated half > 5 nats better; the 1-layer one does not."""
    gaps = {}
    for lm in (model_1l, model_2l):
        probe = probe_head_scores(lm)
        T = probe.seq_len
        curve = loss_by_position(lm, probe.tokens, source="probe")
        first = curve.loss[: T - 1].mean()  # predicted positions 1 .. T-1
        second = curve.loss[T:].mean()  # predicted positions T+1 .. 2T-1
        assert probe_halves(curve, T) == pytest.approx((first, second))
        assert first == pytest.approx(probe.loss_first_half, abs=1e-4)
        assert second == pytest.approx(probe.loss_second_half, abs=1e-4)
        gaps[lm.name] = (first, second)
    f2, s2 = gaps["attn-only-2l"]
    f1, s1 = gaps["attn-only-1l"]
    print(f"probe loss first/second half: 2l {f2:.2f}/{s2:.2f}, 1l {f1:.2f}/{s1:.2f}")
    assert f2 - s2 > 5
    assert not f1 - s1 > 5


def test_icl_score_on_the_dataset(model_1l, model_2l):
    w = dataset_windows(model_2l, load_dataset("validation"), max_windows=60)
    assert default_icl_positions(128) == (12, 125)
    for lm in (model_1l, model_2l):
        curve = loss_by_position(lm, w.tokens, source="validation")
        s = icl_score(curve)
        manual = _losses_batch(lm, w.tokens)
        assert s.loss_early == pytest.approx(manual[:, 11].mean(), abs=1e-5)
        assert s.loss_late == pytest.approx(manual[:, 124].mean(), abs=1e-5)
        assert s.score == pytest.approx(s.loss_late - s.loss_early)
        assert (s.early, s.late) == (12, 125)
    with pytest.raises(AnalysisError, match="before the late"):
        icl_score(curve, early=50, late=20)
    with pytest.raises(AnalysisError, match="between 1 and 127"):
        icl_score(curve, early=0, late=20)


def _losses_batch(lm, tokens) -> np.ndarray:
    return lm.model.loss(torch.as_tensor(tokens), per_token=True).double().numpy()


def test_icl_view(model_1l, model_2l, tiny):
    w = dataset_windows(model_2l, load_dataset("validation"), max_windows=8)
    probe = probe_head_scores(model_2l)
    view = icl_view([model_1l, model_2l], w.tokens, "validation", probe.tokens, probe.seq_len)
    assert [c.model for c in view.dataset] == ["attn-only-1l", "attn-only-2l"]
    first, second = view.probe_halves["attn-only-2l"]
    assert first == pytest.approx(probe.loss_first_half, abs=1e-4)
    assert second == pytest.approx(probe.loss_second_half, abs=1e-4)
    assert view.scores[1].score == pytest.approx(
        view.dataset[1].at(view.scores[1].late) - view.dataset[1].at(view.scores[1].early))
    with pytest.raises(AnalysisError, match="different tokenizers"):
        icl_view([model_2l, tiny], w.tokens, "v", probe.tokens, probe.seq_len)


# ----------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def api():
    from attention_lens.server import ServerConfig, create_server

    app = create_server(ServerConfig(cache_size=8))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    return client, app.server.extensions["attention_lens"]["registry"]


def test_api_compare(api, model_1l, model_2l):
    client, reg = api
    r = client.post("/api/compare", json={"text": CLEAN, "text_b": CORRUPT, "layer": 1,
                                          "head": 5, "top_k": 5})
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()["result"]
    fa, fb = reg.forward(CLEAN, "attn-only-2l"), reg.forward(CORRUPT, "attn-only-2l")
    lm = reg.get("attn-only-2l")
    np.testing.assert_allclose(data["loss_diff"], _losses(lm, fb.token_ids)
                               - _losses(lm, fa.token_ids), atol=1e-5)
    assert data["mode"] == "prompts"
    r = client.post("/api/compare", json={"text": CLEAN, "model": "attn-only-1l",
                                          "model_b": "attn-only-2l", "icl": True,
                                          "windows": 4})
    assert r.status_code == 200, r.data[:300]
    out = r.get_json()
    assert out["result"]["mode"] == "models"
    halves = out["icl"]["probe_halves"]
    assert halves["attn-only-2l"][0] - halves["attn-only-2l"][1] > 5
    assert not halves["attn-only-1l"][0] - halves["attn-only-1l"][1] > 5
    assert [s["early"] for s in out["icl"]["scores"]] == [12, 12]


@pytest.mark.parametrize("body, status, message", [
    ({"text_b": "x"}, 400, "missing field 'text'"),
    ({"text": "a", "model_b": "nope"}, 400, "unknown model"),
    ({"text": "a", "layer": 9}, 400, "'layer' must be between"),
    ({"text": "a b c", "position": 60}, 400, "outside the prompt"),
    ({"text": "a", "target": "two words"}, 400, "not a single token"),
    ({"text": "a", "icl": "yes"}, 400, "true or false"),
])
def test_api_compare_bad_input(api, body, status, message):
    client, _ = api
    r = client.post("/api/compare", json=body)
    assert r.status_code == status and message in r.get_json()["error"], r.get_json()


# --------------------------------------------------------------------------- the browser
@pytest.mark.browser
def test_compare_page_in_the_browser(dash_duo, registry, tmp_path, bg):
    """Two models by default (with their in-context-learning curves), geometry at desktop and
    phone widths, and a real click on a loss point that moves the predictions' position."""
    import os
    import time
    from pathlib import Path

    from selenium.webdriver.common.action_chains import ActionChains
    from test_browser import has_traces, url, wait
    from test_head_metrics import full_screenshot, geometry_problems, point_offset

    from attention_lens.server.app import create_app

    shots = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    dash_duo.start_server(create_app(registry, background=bg))
    d = dash_duo.driver
    d.set_script_timeout(120)  # a busy machine's browser answers slowly
    d.set_window_size(1440, 1000)
    d.get(url(dash_duo, "/compare", model="attn-only-2l", text=CLEAN, windows=200))
    for name in ("loss", "predictions", "attention", "lens", "dla", "icl"):
        wait(dash_duo, has_traces("compare", name), timeout=180, what=f"the {name} figure")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    text = d.find_element("css selector", "#compare-icl-note").text
    assert "attn-only-1l" in text and "attn-only-2l" in text and "Probe" in text
    host = d.find_element("css selector",
                          '[id=\'{"name":"loss","page":"compare","type":"al-graph"}\'] '
                          '.js-plotly-plot')
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", host)
    time.sleep(0.3)
    x, y = point_offset(d, host, 0, 4)  # A's loss of the token at position 5
    ActionChains(d).move_to_element_with_offset(host, x, y).click().perform()
    wait(dash_duo, "document.getElementById('compare-position').value === '4'",
         what="position 4 chosen by the click")
    wait(dash_duo, "(document.querySelector('#compare-what') || {}).textContent"
                   ".includes('A at position 4')", what="the comparison at position 4")
    wait(dash_duo, "window.location.search.includes('position=4')", what="the URL")
    time.sleep(1.0)
    # screenshots last: capturing resizes the viewport for a moment
    full_screenshot(d, shots / "compare.png")
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    d.get(url(dash_duo, "/compare", model="attn-only-2l", text=CLEAN, windows=200,
              text_b=CORRUPT, model_b="attn-only-2l"))
    for name in ("loss", "attention", "icl"):
        wait(dash_duo, has_traces("compare", name), timeout=60, what=f"the phone's {name}")
    time.sleep(1.0)
    assert geometry_problems(d) == []
    widths = d.execute_script("return [document.body.scrollWidth, "
                              "document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] + 1, widths
    assert [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"] == []
