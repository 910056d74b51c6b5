"""The prompt-scope analyses declared in analysis/ (logit lens, ablation, attribution graph):
each endpoint's 400 on a bad field, its result kept under the declaration's key, and a
background job with the same numbers when the one inline threshold is forced."""

from __future__ import annotations

import numpy as np
import pytest

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare
from attention_lens.server.api import create_api
from attention_lens.server.app import create_app

TEXT = "Harry Potter went home. Harry Potter went home."
MODEL = "attn-only-2l"


@pytest.fixture
def client(registry, bg):
    app = create_app(registry, background=bg)
    app.server.register_blueprint(create_api(registry), url_prefix="/api")
    return app.server.test_client()


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
    assert req is not None and req.label == analysis.label
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
