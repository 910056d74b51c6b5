"""The prompt-scope analyses declared in analysis/ (logit lens, ablation, attribution graph):
each endpoint's 400 on a bad field, its result kept under the declaration's key, and a
background job with the same numbers when the one inline threshold is forced."""

from __future__ import annotations

import numpy as np
import pytest

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare
from attention_lens.components import page as P

TEXT = "Harry Potter went home. Harry Potter went home."
MODEL = "attn-only-2l"


def post(client, name, **body):
    r = client.post(f"/api/{name}", json={"text": TEXT, "model": MODEL, **body})
    return r.status_code, r.get_json()


def cached(registry, analysis, values):
    """The result kept with the prompt's forward pass under the declaration's key."""
    lm, fp = registry.get(MODEL), registry.forward(TEXT, MODEL)
    key = analysis.key(analysis.values(values), declare.Shape(lm.cfg, fp.n_tokens))
    return registry.per_prompt(fp, key, lambda: pytest.fail(f"no entry under {key}"))


def as_job(registry, monkeypatch, analysis, values):
    """Force the threshold: the store's request for ``values`` and how often it was computed."""
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    lm, fp = registry.get(MODEL), registry.forward(TEXT, MODEL)
    req = W.declared(analysis, lm, fp, analysis.values(values))
    assert req is not None and req.label == analysis.label.format(**analysis.values(values))
    return lambda: W.store().stats(lm, req)["computed"]


def test_logit_lens(client, registry, monkeypatch):
    from attention_lens.analysis.logit_lens import LOGIT_LENS

    for body, words in [({"top_k": 0}, "'top_k' must be between 1 and 50"),
                        ({"top_k": "5"}, "'top_k' must be an integer"),
                        ({"granularity": "block"}, "'granularity' must be one of"),
                        ({"positions": 3}, "'positions' must be a list"),
                        ({"stages": "layer"}, "unknown field(s) 'stages'")]:
        status, err = post(client, "logit-lens", **body)
        assert status == 400 and words in err["error"], (body, err)
    status, data = post(client, "logit-lens", top_k=3, target=7, granularity="layer")
    assert status == 200, data
    lens = cached(registry, LOGIT_LENS, {"top_k": 3, "target": 7, "granularity": "layer"})
    assert lens.top_ids.tolist() == data["result"]["top_ids"]
    assert len(data["result"]["stage_labels"]) == 3  # embeddings and after each layer
    _, inline = post(client, "logit-lens", top_k=4)
    computed = as_job(registry, monkeypatch, LOGIT_LENS, {"top_k": 4})
    status, job = post(client, "logit-lens", top_k=4)
    assert status == 200 and computed() == 1
    assert job["result"]["top_ids"] == inline["result"]["top_ids"]
    np.testing.assert_allclose(job["result"]["entropy"], inline["result"]["entropy"],
                               rtol=1e-6)


def test_ablation_and_head_sweep(client, registry, monkeypatch):
    from attention_lens.analysis.ablation import ABLATION, HEAD_SWEEP

    for body, words in [({}, "missing field 'heads'"),
                        ({"heads": []}, "'heads' is empty: choose at least one [layer, head] "
                                        "to ablate"),
                        ({"heads": ["L1X5"]}, "each entry of 'heads' must be a [layer, head]"),
                        ({"heads": [[2, 0]]}, "'layer' must be between 0 and 1"),
                        ({"heads": [[1, 5]], "top_k": 51}, "'top_k' must be between 1 and 50"),
                        ({"heads": [[1, 5]], "method": "resample"}, "'method' must be one of")]:
        status, err = post(client, "ablation", **body)
        assert status == 400 and words in err["error"], (body, err)
    status, data = post(client, "ablation", heads=["L1H5", [1, 0]], top_k=3)
    assert status == 200 and data["result"]["heads"] == [[1, 0], [1, 5]]
    kept = cached(registry, ABLATION, {"heads": [[1, 5], [1, 0]], "top_k": 3})
    assert kept.loss_change == pytest.approx(data["result"]["loss_change"], rel=1e-6)
    status, err = post(client, "head-sweep", positions=[-1])  # the last has no next token
    assert status == 400 and "loss positions" in err["error"]
    status, sweep = post(client, "head-sweep", method="mean")
    assert status == 200 and np.asarray(sweep["result"]["loss_after"]).shape == (2, 12)
    cached(registry, HEAD_SWEEP, {"method": "mean"})
    computed = as_job(registry, monkeypatch, HEAD_SWEEP, {"method": "mean"})
    status, job = post(client, "head-sweep", method="mean")
    assert status == 200 and computed() == 1
    np.testing.assert_allclose(job["result"]["loss_change"], sweep["result"]["loss_change"],
                               rtol=1e-5, atol=1e-6)
    computed = as_job(registry, monkeypatch, ABLATION, {"heads": [[1, 5], [1, 0]], "top_k": 3})
    status, job = post(client, "ablation", heads=[[1, 5], [1, 0]], top_k=3)
    assert status == 200 and computed() == 1
    assert job["result"]["after_ids"] == data["result"]["after_ids"]


def test_attribution_graph(client, registry, monkeypatch):
    from attention_lens.analysis.graph import EDGE_THRESHOLD, GRAPH, NODE_THRESHOLD
    from attention_lens.pages.graph import Share

    for body, words in [({"node_threshold": 0}, "'node_threshold' must be a number in (0, 1]"),
                        ({"edge_threshold": "0.9"}, "'edge_threshold' must be a number"),
                        ({"truncate": "yes"}, "'truncate' must be true or false"),
                        ({"position": -99}, "'position' must be between")]:
        status, err = post(client, "graph", **body)
        assert status == 400 and words in err["error"], (body, err)
    status, data = post(client, "graph", position=8)
    assert status == 200 and data["result"]["position"] == 8
    meta = data["result"]["graph"]["metadata"]
    assert meta["node_threshold"] == NODE_THRESHOLD == 0.8
    # one definition of the thresholds: the page's sliders open on them, in percent
    sliders = {c.name: c.default for c in P.spec_of("graph").controls if isinstance(c, Share)}
    assert sliders == {"node": 80, "edge": round(EDGE_THRESHOLD * 100)}
    kept = cached(registry, GRAPH, {"position": 8})
    assert kept.view.n_edges_full == data["result"]["n_edges_full"]
    computed = as_job(registry, monkeypatch, GRAPH, {"position": 8, "edge_threshold": 0.5})
    status, job = post(client, "graph", position=8, edge_threshold=0.5)
    assert status == 200 and computed() == 1
    assert job["result"]["logit"] == data["result"]["logit"]
    assert job["result"]["n_edges"] <= data["result"]["n_edges"]
