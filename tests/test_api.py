"""The JSON API: every endpoint answers from the analysis package, with token ids and strings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from attention_lens.analysis.attention import attention_pattern
from attention_lens.analysis.predictions import next_token
from attention_lens.registry import DEFAULT_WEIGHTS, Registry
from attention_lens.server import ServerConfig, create_server

PROMPT = "Mr and Mrs Dursley were proud. Mr and Mrs Dursley"


@pytest.fixture(scope="module")
def server():
    """The lab server over the shipped models, no auth (loopback)."""
    app = create_server(ServerConfig(cache_size=8))
    client = app.server.test_client()
    assert client.get("/").status_code == 200  # sets the Dash app up before another is built
    return app


@pytest.fixture(scope="module")
def client(server):
    return server.server.test_client()


@pytest.fixture(scope="module")
def reg(server) -> Registry:
    return server.server.extensions["attention_lens"]["registry"]


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


def test_models_lists_shipped_models_with_sizes(client):
    r = client.get("/api/models")
    assert r.status_code == 200
    data = r.get_json()
    names = {m["name"]: m for m in data["models"]}
    assert {"attn-only-1l", "attn-only-2l"} <= set(names)
    assert all(m["size_bytes"] > 1_000_000 for m in names.values())
    assert data["default"] == "attn-only-2l" and names["attn-only-2l"]["default"] is True
    assert data["unavailable"] == []


def test_index_lists_every_endpoint(client):
    listed = " ".join(client.get("/api/").get_json()["endpoints"])
    for ep in ("POST /api/predict", "POST /api/attention", "GET /api/embeddings",
               "POST /api/activations", "GET /api/weights", "POST /api/analogy",
               "POST /api/token-predictions", "POST /api/eigenvalues",
               "POST /api/induction-score", "POST /api/logit-lens", "POST /api/attribution",
               "POST /api/ablation", "GET /api/models"):
        assert ep in listed, ep


def test_predict_matches_the_analysis(client, reg):
    status, data = post(client, "/api/predict", {"text": PROMPT, "top_k": 5})
    assert status == 200
    lm = reg.get("attn-only-2l")
    fp = reg.forward(PROMPT, "attn-only-2l")
    ref = next_token(lm, fp, k=5)
    assert data["token_ids"] == fp.token_ids.tolist() and data["tokens"] == list(fp.tokens)
    assert [p["id"] for p in data["predictions"]] == ref.token_ids.tolist()
    assert [p["token"] for p in data["predictions"]] == list(ref.tokens)
    np.testing.assert_allclose([p["probability"] for p in data["predictions"]], ref.probs,
                               rtol=1e-5)
    assert [p["rank"] for p in data["predictions"]] == [1, 2, 3, 4, 5]
    assert data["truncated"] is None and data["model"] == "attn-only-2l"


def test_predict_other_model_and_position(client, reg):
    status, data = post(client, "/api/predict",
                        {"text": PROMPT, "top_k": 3, "model": "attn-only-1l", "position": 2})
    assert status == 200 and data["model"] == "attn-only-1l" and data["position"] == 2
    lm = reg.get("attn-only-1l")
    ref = next_token(lm, reg.forward(PROMPT, "attn-only-1l"), k=3, position=2)
    assert [p["id"] for p in data["predictions"]] == ref.token_ids.tolist()


def test_long_prompt_is_truncated_and_says_so(client):
    text = "the cat sat on the mat and " * 100
    status, data = post(client, "/api/predict", {"text": text})
    assert status == 200
    t = data["truncated"]
    assert t is not None and t["n_tokens_kept"] == 128 == data["n_tokens"] == len(data["tokens"])
    assert t["tokens_dropped"] == t["n_prompt_tokens"] - 128 > 0
    assert "first 128" in t["message"]


def test_attention_one_head_matches_the_analysis(client, reg):
    status, data = post(client, "/api/attention", {"text": PROMPT, "layer": 1, "head": 5})
    assert status == 200
    lm = reg.get()
    ref = attention_pattern(lm, reg.forward(PROMPT), layer=1, head=5)
    got = np.array(data["result"]["pattern"])
    np.testing.assert_allclose(got, ref.pattern, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert data["result"]["display"] == list(ref.display)


def test_attention_all_heads_and_one_layer(client):
    _, all_heads = post(client, "/api/attention", {"text": "a b c d"})
    p = np.array(all_heads["result"]["patterns"])
    assert p.shape == (2, 12, 4, 4)
    _, layer1 = post(client, "/api/attention", {"text": "a b c d", "layer": 1})
    np.testing.assert_allclose(np.array(layer1["result"]["patterns"]), p[1])


def test_token_predictions(client):
    status, data = post(client, "/api/token-predictions", {"text": PROMPT, "top_k": 4})
    assert status == 200
    res = data["result"]
    n = data["n_tokens"]
    assert np.array(res["top_ids"]).shape == (n, 4)
    assert res["next_ids"][:-1] == data["token_ids"][1:] and res["next_ids"][-1] == -1
    assert res["next_probs"][-1] is None  # NaN is sent as null (valid JSON)


def test_activations(client):
    status, data = post(client, "/api/activations", {"text": "hello world", "vectors": True,
                                                     "layer": 2})
    assert status == 200
    rs = data["residual_stream"]
    assert len(rs["labels"]) == 3 and np.array(rs["norms"]).shape == (3, data["n_tokens"])
    (vec,) = rs["resid"].values()
    assert np.array(vec).shape == (data["n_tokens"], 384)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=-1), rs["norms"][2], rtol=1e-4)
    assert np.array(data["head_outputs"]["norms"]).shape == (2, 12, data["n_tokens"])


def test_logit_lens_last_stage_is_the_model(client):
    _, pred = post(client, "/api/predict", {"text": PROMPT, "top_k": 1})
    status, data = post(client, "/api/logit-lens", {"text": PROMPT, "top_k": 2,
                                                    "target": pred["predictions"][0]["id"]})
    assert status == 200
    res = data["result"]
    assert res["top_ids"][-1][-1][0] == pred["predictions"][0]["id"]
    assert res["target_ranks"][-1][-1] == 1
    assert len(res["stage_labels"]) == len(res["top_ids"])


def test_logit_lens_window_of_positions(client):
    body = {"text": PROMPT, "top_k": 3, "target": " Mr"}
    _, full = post(client, "/api/logit-lens", body)
    status, part = post(client, "/api/logit-lens", {**body, "positions": [-1, 2, 2]})
    assert status == 200
    n, res, ref = part["n_tokens"], part["result"], full["result"]
    assert res["positions"] == [2, n - 1] and ref["positions"] is None
    for name in ("top_ids", "target_ranks", "target_probs", "entropy"):
        for stage, row in enumerate(res[name]):
            for pos, value in enumerate(row):
                if pos in (2, n - 1):
                    assert value == pytest.approx(ref[name][stage][pos], abs=1e-5), (name, pos)
                else:
                    assert value in (None, -1, [-1, -1, -1]), (name, stage, pos)
    for bad, word in (([], "at least one"), ([n], "positions"), ("3", "list"), ([1.5], "whole")):
        status, err = post(client, "/api/logit-lens", {**body, "positions": bad})
        assert status == 400 and word in err["error"], (bad, err)


def test_weights_one_head_and_cached(client, reg):
    r = client.get("/api/weights?layer=1&head=5")
    assert r.status_code == 200
    res = r.get_json()["result"]
    assert len(res["singular_values"]) == 32 and res["circuit"] == "OV"
    assert np.all(np.diff(res["singular_values"]) <= 1e-6)
    assert np.array(res["output_ids"]).shape == (3, 10)
    r2 = client.get("/api/weights?circuit=QK&top_k=2&n_directions=1")
    assert np.array(r2.get_json()["result"]["output_ids"]).shape == (2, 12, 1, 2)


def test_eigenvalues(client):
    status, data = post(client, "/api/eigenvalues", {"text": PROMPT, "layer": 1, "head": 5})
    assert status == 200
    spec = data["attention_spectrum"]
    assert len(spec["eigenvalues"]) == data["n_tokens"] and spec["eigenvalues"][0] == 1.0
    circ = data["circuits"]
    assert len(circ["full_ov"]["real"]) == 32 and -1 <= circ["copying"]["full_ov"] <= 1


def test_induction_score_finds_the_shipped_induction_heads(client):
    status, data = post(client, "/api/induction-score", {"text": PROMPT})
    assert status == 200
    probe = np.array(data["probe_induction_scores"])
    assert probe.shape == (2, 12) and probe[1].max() > 0.6 and probe[0].max() < 0.3
    assert np.array(data["induction_scores"]).shape == (2, 12)
    assert len(data["result"]["labels"]) == 2


def test_induction_score_rows(client, reg):
    """``rows: "all"`` is TransformerLens' head_detector score and the page's all-rows grid;
    the default averages over the rows that have a target."""
    from tl_oracle import to_transformer_lens
    from transformer_lens.head_detector import (
        compute_head_attention_similarity_score,
        get_induction_head_detection_pattern,
    )

    from attention_lens.components import page as P
    from attention_lens.figures.heads import KIND_TITLES

    text = "Harry Potter went home. Harry Potter went home."
    status, default = post(client, "/api/induction-score", {"text": text})
    assert status == 200, default
    status, data = post(client, "/api/induction-score", {"text": text, "rows": "all"})
    assert status == 200, data
    ours = np.array(data["induction_scores"])
    assert data["result"]["rows"] == "all" and default["result"]["rows"] == "target"
    lm = reg.get("attn-only-2l")
    tokens = torch.tensor([data["token_ids"]])
    _, cache = to_transformer_lens(lm).run_with_cache(tokens)
    det = get_induction_head_detection_pattern(tokens[0])
    theirs = np.array([[compute_head_attention_similarity_score(
        cache["pattern", layer][0, head], det, exclude_bos=False, exclude_current_token=False,
        error_measure="mul") for head in range(lm.cfg.n_heads)]
        for layer in range(lm.cfg.n_layers)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # the first half has no earlier copy: counting its rows lowers every score
    target = np.array(default["induction_scores"])
    assert (target >= ours - 1e-9).all() and (target - ours).max() > 0.1
    drawn = P.spec_of("induction").render({"model": lm.name, "text": text, "pos": None},
                                           rows="all")
    fig = drawn.figures["scores"]
    grid = next(t.z for t in fig.data if t.name == f"prompt: {KIND_TITLES['induction']}")
    np.testing.assert_allclose(np.array(grid, dtype=float), ours, rtol=1e-6, atol=1e-7)
    status, data = post(client, "/api/induction-score", {"text": text, "rows": "some"})
    assert status == 400 and "'rows' must be one of" in data["error"]


def test_attribution_sums_to_the_logit(client):
    status, data = post(client, "/api/attribution", {"text": PROMPT, "position": -1})
    assert status == 200
    res = data["result"]
    assert res["total"] == pytest.approx(res["logit"] - res["bias"], abs=1e-3)
    assert np.array(res["heads"]).shape == (2, 12)


def test_ablation_of_induction_heads_hurts(client):
    status, data = post(client, "/api/ablation", {"text": PROMPT, "heads": [[1, 5], [1, 0]],
                                                  "method": "zero", "top_k": 3})
    assert status == 200
    res = data["result"]
    assert res["heads"] == [[1, 0], [1, 5]] and len(res["after_ids"]) == 3
    assert res["loss_change"] == pytest.approx(res["loss_after"] - res["loss_before"], abs=1e-5)


def test_embeddings_with_prompt_projection(client):
    r = client.get("/api/embeddings?n_clusters=4&max_tokens=300&text=the%20cat")
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    res = data["result"]
    assert len(res["token_ids"]) == len(res["coords"]) == 300 and len(res["coords"][0]) == 2
    assert len(res["cluster_sizes"]) == 4 and sum(res["cluster_sizes"]) == 300
    proj = data["prompt"]["projection"]
    assert proj["token_ids"] == data["prompt"]["token_ids"] and len(proj["coords"]) == 2
    assert client.get("/api/embeddings").status_code == 200  # the cached default view


def test_analogy_excludes_its_inputs(client):
    r = client.post("/api/analogy", json={"positive": ["king", "woman"], "negative": ["man"],
                                          "top_k": 3})
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    ids = [x["id"] for x in data["results"]]
    assert len(ids) == 3 and not set(ids) & set(data["input_ids"])
    cos = [x["cosine"] for x in data["results"]]
    assert all(-1 <= c <= 1 for c in cos) and cos == sorted(cos, reverse=True)


def test_corrupt_model_folder_is_unavailable_with_reason(tmp_path):
    for name in ("attn-only-1l", "attn-only-2l"):
        shutil.copytree(DEFAULT_WEIGHTS / name, tmp_path / name)
    bad = tmp_path / "attn-only-1l" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    app = create_server(ServerConfig(models_dirs=[tmp_path]))
    client = app.server.test_client()
    client.get("/")
    data = client.get("/api/models").get_json()
    assert [m["name"] for m in data["models"]] == ["attn-only-2l"]
    (u,) = data["unavailable"]
    assert u["name"] == "attn-only-1l" and "model.safetensors" in u["reason"]
    r = client.post("/api/predict", json={"text": "hi", "model": "attn-only-1l"})
    assert r.status_code == 400 and "unavailable" in r.get_json()["error"]
    assert client.post("/api/predict", json={"text": "hi"}).status_code == 200


def test_concurrent_ablation_never_leaks_into_other_requests(server, reg):
    """One model instance serves concurrent requests: an ablation's hooks stay in its thread."""
    import threading

    from attention_lens.analysis.forward import run_forward

    texts = [f"{PROMPT} {w}" for w in ("one", "two", "three", "four", "five", "six", "seven",
                                        "eight", "nine", "ten")]  # more than the cache holds
    lm = reg.get()
    ref = {t: next_token(lm, run_forward(lm, t), k=3).token_ids.tolist() for t in texts}
    wrong, errors = [], []

    def ablate():
        c = server.server.test_client()
        for _ in range(12):
            r = c.post("/api/ablation", json={"text": PROMPT, "heads": [[1, 5], [1, 0], [0, 2]]})
            if r.status_code != 200:
                errors.append(r.status_code)

    def predict():
        c = server.server.test_client()
        for t in texts * 2:
            r = c.post("/api/predict", json={"text": t, "top_k": 3})
            if r.status_code != 200:
                errors.append(r.status_code)
            elif [p["id"] for p in r.get_json()["predictions"]] != ref[t]:
                wrong.append(t)

    threads = [threading.Thread(target=f) for f in (ablate, predict, ablate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


def test_logit_lens_and_analogy_are_cached(client, reg):
    body = {"text": PROMPT + " cached", "top_k": 3, "target": " and"}
    _, first = post(client, "/api/logit-lens", body)
    before = reg.cache_info()["per_prompt"]
    status, again = post(client, "/api/logit-lens", body)
    assert status == 200 and again == first
    assert reg.cache_info()["per_prompt"] == before  # served from the forward pass's cache
    fp = reg.forward(body["text"], reg.default)
    lm = reg.get(reg.default)
    from attention_lens.analysis.declare import Shape
    from attention_lens.analysis.logit_lens import LOGIT_LENS

    key = LOGIT_LENS.key(LOGIT_LENS.values({"top_k": 3, "target": " and"}),
                         Shape(lm.cfg, fp.n_tokens))
    cached = reg.per_prompt(fp, key, lambda: pytest.fail("the logit lens was not cached"))
    assert cached.top_ids.tolist() == first["result"]["top_ids"]
    words = {"positive": ["king", "woman"], "negative": ["man"], "top_k": 4}
    _, one = post(client, "/api/analogy", words)
    n = reg.cache_info()["weights"]
    status, two = post(client, "/api/analogy", words)
    assert status == 200 and two == one and reg.cache_info()["weights"] == n
