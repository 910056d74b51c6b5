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
