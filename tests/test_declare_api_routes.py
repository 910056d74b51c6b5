"""The per-prompt endpoints declared next to their functions (attention patterns, activations,
QK attribution): each endpoint's 400 naming a bad field, its result kept under the
declaration's key, and a background job with the same numbers when the one inline threshold
is forced."""

from __future__ import annotations

import numpy as np
import pytest

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare

TEXT = "Harry Potter went home. Harry Potter went home."
MODEL = "attn-only-2l"


def post(client, name, **body):
    r = client.post(f"/api/{name}", json={"text": TEXT, "model": MODEL, **body})
    return r.status_code, r.get_json()


def bad_fields(client, name, cases):
    for body, words in cases:
        status, err = post(client, name, **body)
        assert status == 400 and words in err["error"], (body, err)


def cached(registry, analysis, values, text=TEXT):
    """The result kept with the prompt's forward pass under the declaration's key."""
    lm, fp = registry.get(MODEL), registry.forward(text, MODEL)
    key = analysis.key(analysis.values(values), declare.Shape(lm.cfg, fp.n_tokens))
    return registry.per_prompt(fp, key, lambda: pytest.fail(f"no entry under {key}"))


def derived_keys(registry, text):
    """The keys of the results kept with the prompt's forward pass."""
    fp = registry.forward(text, MODEL)
    entry = registry._forward.get((MODEL, tuple(int(i) for i in fp.token_ids)))
    return set(entry.derived)


def as_job(registry, monkeypatch, analysis, values):
    """Force the threshold: how often the store computed the request of ``values``."""
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    lm, fp = registry.get(MODEL), registry.forward(TEXT, MODEL)
    vals = analysis.values(values)
    req = W.declared(analysis, lm, fp, vals)
    assert req is not None and req.label == analysis.label.format(**vals)
    return lambda: W.store().stats(lm, req)["computed"]


def test_attention(client, registry, monkeypatch):
    from attention_lens.analysis.attention import ATTENTION

    bad_fields(client, "attention", [
        ({"layer": 2}, "'layer' must be between 0 and 1 (the model attn-only-2l has 2"),
        ({"layer": "1"}, "'layer' must be an integer"),
        ({"layer": 0, "head": 12}, "'head' must be between 0 and 11 (each layer of"),
        ({"head": 3}, "'head' needs a 'layer' too"),
        ({"heads": [[0, 1]], "layer": 0}, "send either 'heads' (a list of heads) or 'layer'"),
        ({"heads": []}, "'heads' is empty: choose at least one head"),
        ({"heads": ["L1X5"]}, "each entry of 'heads' must be a [layer, head] pair"),
        ({"heads": ["L7H1"]}, "'layer' must be between 0 and 1"),
        ({"queries": [20]}, "'queries[0]' must be between -20 and 19 (the prompt has 20"),
        ({"queries": {"start": 5, "stop": 5}}, "'queries' window is empty"),
        ({"queries": "all"}, "'queries' must be a list of positions or a window"),
        ({"query": [1]}, "unknown field(s) 'query'")])
    status, data = post(client, "attention", heads=["L1H5", [0, 2]], queries=[-1, 3])
    assert status == 200 and data["heads"] == [[1, 5], [0, 2]] and data["queries"] == [19, 3]
    fp = registry.forward(TEXT, MODEL)
    pattern = fp.cache["blocks.1.attn.hook_pattern"][5].numpy()
    np.testing.assert_allclose(data["result"]["patterns"][0], pattern[[19, 3]], rtol=1e-6,
                               atol=1e-7)
    kept = cached(registry, ATTENTION, {"heads": [(1, 5), (0, 2)], "queries": [19, 3]})
    np.testing.assert_allclose(kept.result["patterns"], data["result"]["patterns"], rtol=1e-6)
    # the order of the heads is the order of the answer: another order is another entry
    _, swapped = post(client, "attention", heads=[[0, 2], [1, 5]], queries=[19, 3])
    assert swapped["result"]["patterns"] == data["result"]["patterns"][::-1]
    status, one = post(client, "attention", layer=1, head=5)
    assert status == 200 and one["result"]["pattern"][19] == pytest.approx(
        pattern[19].tolist(), rel=1e-6, abs=1e-7)
    computed = as_job(registry, monkeypatch, ATTENTION, {"layer": 1, "head": 5})
    status, job = post(client, "attention", layer=1, head=5)
    assert status == 200 and computed() == 1 and job == one


def test_activations(client, registry, monkeypatch):
    from attention_lens.analysis.attention import ACTIVATIONS

    bad_fields(client, "activations", [
        ({"layer": 3}, "'layer' must be between 0 and 2 (a residual-stream stage"),
        ({"vectors": "yes"}, "'vectors' must be true or false"),
        ({"head": 1}, "unknown field(s) 'head'")])
    status, data = post(client, "activations", vectors=True, layer=2)
    assert status == 200 and list(data["residual_stream"]["resid"]) == \
        ["blocks.1.hook_resid_post"]
    resid = np.asarray(data["residual_stream"]["resid"]["blocks.1.hook_resid_post"])
    np.testing.assert_allclose(np.linalg.norm(resid, axis=-1),
                               data["residual_stream"]["norms"][2], rtol=1e-5)
    kept = cached(registry, ACTIVATIONS, {"vectors": True, "layer": 2})
    np.testing.assert_allclose(kept.head_outputs.norms, data["head_outputs"]["norms"],
                               rtol=1e-6)
    computed = as_job(registry, monkeypatch, ACTIVATIONS, {"vectors": True, "layer": 2})
    status, job = post(client, "activations", vectors=True, layer=2)
    assert status == 200 and computed() == 1 and job == data


def test_qk_attribution(client, registry, monkeypatch):
    from attention_lens.analysis.qk_attribution import QK_ATTRIBUTION

    bad_fields(client, "qk-attribution", [
        ({"key": 2}, "'layer' and 'head' are required"),
        ({"layer": 1, "key": 2}, "'layer' and 'head' are required"),
        ({"head": 5, "key": 2}, "'head' needs a 'layer' too"),
        ({"layer": 1, "head": 5}, "missing field 'key'"),
        ({"layer": 1, "head": 5, "key": 20}, "'key' must be between -20 and 19"),
        ({"layer": 1, "head": 5, "key": 2, "query": 1}, "key 2 comes after query 1"),
        ({"layer": 1, "head": 5, "key": 2, "contrast_key": "a"},
         "'contrast_key' must be an integer"),
        ({"layer": 1, "head": 5, "key": 2, "split_sources": 1},
         "'split_sources' must be true or false"),
        ({"layer": 1, "head": 5, "row": "yes"}, "'row' must be true or false"),
        ({"layer": 1, "head": 5, "key": 2, "truncate": "no"},
         "'truncate' must be true or false")])
    status, err = post(client, "qk-attribution", layer=1, head=5, key=2,
                       text="word " * 300)
    assert status == 400 and 'send "truncate": true' in err["error"]
    status, data = post(client, "qk-attribution", layer=1, head=5, key=3, query=8,
                        contrast_key=1)
    assert status == 200, data
    res = data["result"]
    assert (res["query"], res["key"], res["contrast_key"]) == (8, 3, 1)
    # the terms add up to the model's score difference; the sum is sent unrounded
    assert np.sum(res["terms"]) == pytest.approx(res["score"], rel=1e-5, abs=1e-6)
    kept = cached(registry, QK_ATTRIBUTION, {"layer": 1, "head": 5, "key": 3, "query": 8,
                                             "contrast_key": 1})
    assert res["total"] == kept.total and res["top_terms"][0]["value"] in kept.terms
    status, row = post(client, "qk-attribution", layer=1, head=5, query=-1, row=True)
    assert status == 200 and len(row["result"]["scores"]) == 20
    cached(registry, QK_ATTRIBUTION, {"layer": 1, "head": 5, "query": 19, "row": True})
    values = {"layer": 1, "head": 5, "key": 3, "query": 8, "contrast_key": 1}
    computed = as_job(registry, monkeypatch, QK_ATTRIBUTION, values)
    status, job = post(client, "qk-attribution", **values)
    assert status == 200 and computed() == 1 and job == data


def test_qk_page_reads_the_entry_the_api_computed(client, registry):
    """/qk draws the declared analysis: the cell and the row the API computed are read from
    the prompt's cache, not computed again."""
    from attention_lens.analysis.qk_attribution import QK_ATTRIBUTION
    from attention_lens.components import page as P

    text = "The page and the API read one entry. The page and the API read one entry."
    cell = {"text": text, "layer": 1, "head": 5, "query": 8, "key": 3}
    for extra in ({}, {"row": True, "key": None}):
        status, _ = post(client, "qk-attribution", **{k: v for k, v in {**cell, **extra}.items()
                                                      if v is not None})
        assert status == 200
    before = derived_keys(registry, text)
    assert len(before) == 2
    kept = cached(registry, QK_ATTRIBUTION, {"layer": 1, "head": 5, "query": 8, "key": 3},
                  text)
    kept.terms[0, 0] = 123.0  # marks the kept entry: the page's term heatmap shows it
    drawn = P.spec_of("qk").render({"model": MODEL, "text": text}, layer=1, head=5, query=8,
                                   key=3)
    assert derived_keys(registry, text) == before  # read, not computed under other keys
    assert 123.0 in np.asarray(drawn.figures["terms"].data[0].z, dtype=float)


def test_token_predictions(client, registry, monkeypatch):
    from attention_lens.analysis.predictions import TOKEN_PREDICTIONS

    bad_fields(client, "token-predictions", [
        ({"top_k": 0}, "'top_k' must be between 1 and 50"),
        ({"top_k": 51}, "'top_k' must be between 1 and 50"),
        ({"top_k": 2.5}, "'top_k' must be an integer"),
        ({"k": 3}, "unknown field(s) 'k'")])
    status, data = post(client, "token-predictions", top_k=3)
    assert status == 200 and np.asarray(data["result"]["top_ids"]).shape == (20, 3)
    fp = registry.forward(TEXT, MODEL)
    # the probability of each actual next token, from the model's logits
    probs = fp.logits.double().softmax(-1)[np.arange(19), fp.token_ids[1:]].numpy()
    np.testing.assert_allclose(data["result"]["next_probs"][:19], probs, rtol=1e-6)
    kept = cached(registry, TOKEN_PREDICTIONS, {"top_k": 3})
    assert kept.top_ids.tolist() == data["result"]["top_ids"]
    # /predictions draws the same declaration (k = 5): the entry the API computed
    from attention_lens.analysis.predictions import NEXT_TOKEN
    from attention_lens.components import page as P

    text = "Predictions of every position. Predictions of every position."
    status, _ = post(client, "token-predictions", text=text)
    (five,) = derived_keys(registry, text)
    assert status == 200 and five[1] == "token-predictions" and five[2] == (("top_k", 5),)
    kept = cached(registry, TOKEN_PREDICTIONS, {"top_k": 5}, text)
    kept.surprisal_nats[0] = 123.0  # marks the kept entry: the page's figure shows it
    drawn = P.spec_of("predictions").render({"model": MODEL, "text": text}, k=10)
    assert {k[1] for k in derived_keys(registry, text) - {five}} == {NEXT_TOKEN.name}
    assert 123.0 in list(drawn.figures["surprisal"].data[0].y)
    # /tokens reads it too (its k = 5): no entry of its own
    toks = P.spec_of("tokens").render({"model": MODEL, "text": text}, k=5)
    assert {k[1] for k in derived_keys(registry, text) - {five}} == {NEXT_TOKEN.name}
    hover = [c[1] for row in toks.figures["tokens"].data[0].customdata for c in row]
    assert any("surprisal 123.00 nats" in h for h in hover)  # the marked entry, drawn
    computed = as_job(registry, monkeypatch, TOKEN_PREDICTIONS, {"top_k": 3})
    status, job = post(client, "token-predictions", top_k=3)
    assert status == 200 and computed() == 1 and job == data


def test_eigenvalues(client, registry, monkeypatch):
    from attention_lens.analysis.eigen import EIGENVALUES

    bad_fields(client, "eigenvalues", [
        ({"layer": 2}, "'layer' must be between 0 and 1"),
        ({"head": 1}, "'head' needs a 'layer' too"),
        ({"layer": 0, "head": 12}, "'head' must be between 0 and 11"),
        ({"circuit": "OV"}, "unknown field(s) 'circuit'")])
    status, data = post(client, "eigenvalues", layer=1, head=5)
    assert status == 200, data
    fp = registry.forward(TEXT, MODEL)
    # a causal pattern is lower-triangular: its eigenvalues are its diagonal
    diag = fp.cache["blocks.1.attn.hook_pattern"][5].diagonal().double().numpy()
    np.testing.assert_allclose(data["attention_spectrum"]["eigenvalues"], diag, rtol=1e-6)
    eig = W.store().get(registry.get(MODEL), W.circuit_eigenvalues())[0]
    np.testing.assert_allclose(data["circuits"]["ov"]["real"], eig.ov[1, 5].real, rtol=1e-6,
                               atol=1e-9)
    kept = cached(registry, EIGENVALUES, {"layer": 1, "head": 5})
    assert kept.circuits["copying"]["full_ov"] == pytest.approx(
        data["circuits"]["copying"]["full_ov"], rel=1e-6)
    computed = as_job(registry, monkeypatch, EIGENVALUES, {"layer": 1, "head": 5})
    status, job = post(client, "eigenvalues", layer=1, head=5)
    assert status == 200 and computed() == 1 and job == data


def test_weights_by_get(client, registry):
    """GET /api/weights: the query string read by the declaration; one store entry per
    request, cut from the shared circuit SVD (computed once)."""
    from attention_lens.analysis.circuits import WEIGHTS

    for query, words in [("circuit=XX", "'circuit' must be one of 'OV', 'QK'"),
                         ("head=2", "'head' needs a 'layer' too"),
                         ("layer=9", "'layer' must be between 0 and 1 (the model attn-only-2l"),
                         ("top_k=0", "'top_k' must be between 1 and 50"),
                         ("n_directions=33", "'n_directions' must be between 0 and 32 (d_head "
                                             "of attn-only-2l)"),
                         ("top_k=x", "top_k must be an integer"),
                         ("foo=1", "unknown parameter(s) 'foo'")]:
        r = client.get(f"/api/weights?model={MODEL}&{query}")
        assert r.status_code == 400 and words in r.get_json()["error"], (query, r.data)
    r = client.post("/api/weights", json={"model": MODEL})
    assert r.status_code == 405 and "use GET" in r.get_json()["error"]
    assert "GET /api/weights" in " ".join(client.get("/api/").get_json()["endpoints"])
    lm = registry.get(MODEL)
    r = client.get(f"/api/weights?model={MODEL}&circuit=QK&layer=1&head=5&top_k=4"
                   "&n_directions=2")
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    assert (data["layer"], data["head"]) == (1, 5)
    full = W.store().get(lm, W.circuit_svd("QK"))[0]
    assert data["result"]["input_ids"] == full.input_ids[1, 5, :2, :4].tolist()
    # the singular values of the head's QK circuit W_Q W_K^T, from the weights
    w = lm.model.blocks[1].attn
    qk = (w.W_Q[5].double() @ w.W_K[5].double().T)
    np.testing.assert_allclose(data["result"]["singular_values"],
                               np.linalg.svd(qk.detach().numpy(), compute_uv=False)[:32],
                               rtol=1e-5, atol=1e-9)
    values = WEIGHTS.values({"circuit": "QK", "layer": 1, "head": 5, "top_k": 4,
                             "n_directions": 2})
    req = W.declared(WEIGHTS, lm, None, values)
    assert W.store().stats(lm, req)["computed"] == 1
    assert client.get(f"/api/weights?model={MODEL}&circuit=QK&layer=1&head=5&top_k=4"
                      "&n_directions=2").get_json() == data
    assert W.store().stats(lm, req)["computed"] == 1
    assert W.store().stats(lm, W.circuit_svd("QK"))["computed"] == 1


def test_analogy(client, registry, monkeypatch):
    """A cheap weight analysis: inline, kept in the registry's weight cache under the
    declaration's key; a job in the store when the threshold is forced."""
    from attention_lens.analysis.analogy import ANALOGY

    def ask(**body):
        r = client.post("/api/analogy", json={"model": MODEL, **body})
        return r.status_code, r.get_json()

    for body, words in [({}, "missing field 'positive' (a list of words)"),
                        ({"positive": []}, "'positive' is empty: give at least one word"),
                        ({"positive": [" "]}, "'positive' contains an empty word"),
                        ({"positive": [3]}, "'positive' must be a list of strings"),
                        ({"positive": ["a"] * 11}, "at most 10 are allowed"),
                        ({"positive": ["a"], "negative": None}, "missing field 'negative'"),
                        ({"positive": ["a"], "top_k": 0}, "'top_k' must be between 1 and"),
                        ({"positive": ["a"], "method": "add"}, "'method' must be one of"),
                        ({"positive": ["a"], "matrix": "W_Q"}, "'matrix' must be one of"),
                        ({"positive": ["a"], "text": "a"}, "unknown field(s) 'text'")]:
        status, err = ask(**body)
        assert status == 400 and words in err["error"], (body, err)
    values = {"positive": ["king", "woman"], "negative": ["man"], "top_k": 4}
    status, data = ask(**values)
    assert status == 200, data
    lm = registry.get(MODEL)
    excluded = set(data["input_ids"])
    assert [r["id"] for r in data["results"]] == data["result"]["token_ids"]
    assert not excluded & set(data["result"]["token_ids"])
    # 3CosAdd: the cosine of each answer's unit embedding row to the unit target
    unit = lm.model.W_E.detach().double().numpy()
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    rows = [np.mean(unit[ids], 0) for ids in data["result"]["term_token_ids"]]
    rows = [r / np.linalg.norm(r) for r in rows]
    target = rows[0] + rows[1] - rows[2]
    cos = unit[data["result"]["token_ids"]] @ (target / np.linalg.norm(target))
    np.testing.assert_allclose([r["cosine"] for r in data["results"]], cos, rtol=1e-6)
    key = ANALOGY.key(ANALOGY.values(values), declare.Shape(lm.cfg))
    kept = registry.weights(MODEL, key, lambda m: pytest.fail(f"no entry under {key}"))
    assert kept["input_ids"] == data["input_ids"]
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    req = W.declared(ANALOGY, lm, None, ANALOGY.values(values))
    assert req is not None
    status, job = ask(**values)
    assert status == 200 and job == data and W.store().stats(lm, req)["computed"] == 1


def test_analogy_page_reads_the_entry_the_api_computed(client, registry):
    from attention_lens.analysis.analogy import ANALOGY
    from attention_lens.components import page as P

    values = {"positive": ["England", "French"], "negative": ["English"], "top_k": 6,
              "method": "3cosmul"}
    r = client.post("/api/analogy", json={"model": MODEL, **values})
    assert r.status_code == 200
    lm = registry.get(MODEL)
    key = ANALOGY.key(ANALOGY.values(values), declare.Shape(lm.cfg))
    kept = registry.weights(MODEL, key, lambda m: pytest.fail("not kept"))
    kept["result"].scores[0] = 123.0  # marks the kept entry: the page's bars show it
    drawn = P.spec_of("analogy").render({"model": MODEL, "text": TEXT}, plus=["England", "French"],
                                        minus=["English"], k=6, method="3cosmul")
    assert drawn.errors == [] and 123.0 in list(drawn.figures["results"].data[0].x)
