"""Head metrics over a dataset, declared with scope dataset: the endpoint's 400 on each bad
field, the result kept under the declaration's key (the dataset's identity: its content
hash, never its text), and a background job carrying that identity when the one inline
threshold is forced; /heads runs the same declaration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare
from attention_lens.analysis.datasets import SHIPPED, DatasetInput
from attention_lens.analysis.head_metrics import HEAD_METRICS
from attention_lens.server.app import create_app

MODEL = "attn-only-2l"
WINDOWS = {"windows": 3, "length": 24}
TEXT = ("The cat sat on the mat. The cat sat on the mat again and again.\n\n"
        "Another document about dogs and dogs, and more dogs.")


def post(client, **body):
    r = client.post("/api/head-metrics", json={"model": MODEL, **body})
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


def identity(data) -> DatasetInput:
    d = data["dataset"]
    return DatasetInput(d["name"], d["sha256"], d["length"], d["stride"], WINDOWS["windows"])


def test_the_dataset_scope_is_derived():
    assert "dataset" in declare.DERIVED_SCOPES
    assert declare.find("head-metrics") is HEAD_METRICS and HEAD_METRICS.scope == "dataset"


def test_bad_fields_are_400s(client):
    for body, words in [({"text": "x", "dataset": "y"}, "either 'dataset' (a name) or 'text'"),
                        ({"dataset": ""}, "'dataset' must be a dataset name"),
                        ({"dataset": "nope"}, "unknown dataset 'nope'"),
                        ({"dataset": "upload:" + "0" * 64}, "upload"),
                        ({"windows": 0}, "'windows' must be between 1 and 2000"),
                        ({"length": 3}, "'length' must be between 4 and 128 (the context of "
                                        "attn-only-2l)"),
                        ({"stride": 0}, "'stride' must be between 1 and 100000"),
                        ({"metric": "copying"}, "'metric' must be one of"),
                        ({"layer": 2}, "'layer' must be between 0 and 1 (the model "
                                       "attn-only-2l has 2 layer(s))"),
                        ({"head": 3}, "'head' needs a 'layer' too"),
                        ({"top": 25}, "'top' must be between 1 and 24 (attn-only-2l has 24 "
                                      "heads)"),
                        ({"n_examples": 21}, "'n_examples' must be between 0 and 20"),
                        ({"copying": "no"}, "'copying' must be true or false"),
                        ({"text": ""}, "'text' is empty"),
                        ({"queries": 3}, "unknown field(s) 'queries'")]:
        status, err = post(client, **{**WINDOWS, **body})
        assert status == 400 and words in err["error"], (body, err)


def test_kept_under_the_datasets_identity(client, registry):
    status, data = post(client, **WINDOWS, metric="self", top=2)
    assert status == 200, data
    assert data["dataset"]["name"] == SHIPPED and len(data["ranking"]["self"]) == 2
    key = HEAD_METRICS.key({}, given=identity(data))
    kept = registry.weights(MODEL, key, lambda m: pytest.fail(f"no entry under {key}"))
    np.testing.assert_allclose(kept.metrics["induction"], data["metrics"]["induction"],
                               rtol=1e-6)
    # the views (metric, top, examples) are not part of the key: the same entry answers
    status, other = post(client, **WINDOWS, metric="induction", n_examples=0, copying=False)
    assert status == 200 and other["metrics"]["induction"] == data["metrics"]["induction"]
    assert "copying" not in other["metrics"] and other["examples"]["windows"] == []
    # documents sent as text: their content hash is their identity and their name
    status, up = post(client, text=TEXT, windows=2, length=8)
    assert status == 200, up
    sha = up["dataset"]["sha256"]
    assert up["dataset"]["name"] == f"upload:{sha}"
    status, again = post(client, dataset=f"upload:{sha}", windows=2, length=8)
    assert status == 200 and again["metrics"] == up["metrics"]
    registry.weights(MODEL, HEAD_METRICS.key({}, given=DatasetInput(
        f"upload:{sha}", sha, 8, 8, 2)), lambda m: pytest.fail("the upload's run was not kept"))


def test_a_job_carries_the_identity_not_the_text(client, registry, monkeypatch):
    status, inline = post(client, text=TEXT, windows=2, length=8)
    assert status == 200, inline
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    lm = registry.get(MODEL)
    sha = inline["dataset"]["sha256"]
    data = DatasetInput(f"upload:{sha}", sha, 8, 8, 2)
    req = W.declared(HEAD_METRICS, lm, data, {})
    assert req is not None and req.label == "head metrics"
    carried = dict(req.params)["tokens"]
    assert json.loads(carried) == {"name": f"upload:{sha}", "sha256": sha, "length": 8,
                                   "stride": 8, "windows": 2}
    assert "dogs" not in json.dumps(req.as_json())
    status, job = post(client, text=TEXT, windows=2, length=8)
    assert status == 200 and W.store().stats(lm, req)["computed"] == 1
    np.testing.assert_allclose(job["metrics"]["induction"], inline["metrics"]["induction"],
                               rtol=1e-6)
    assert job["examples"] == inline["examples"]


def test_the_heads_page_runs_the_declaration(registry, bg, monkeypatch):
    from attention_lens.components import page as P

    create_app(registry, background=bg)
    spec = P.spec_of("heads")
    state = {"model": MODEL, "text": "Harry Potter went home.", "pos": None}
    drawn = spec.render(state, **WINDOWS)
    assert not drawn.errors, drawn.errors
    lm = registry.get(MODEL)
    ds = W.load_dataset(SHIPPED)
    data = DatasetInput(ds.name, ds.sha256, 24, 24, 3)
    registry.weights(MODEL, HEAD_METRICS.key({}, given=data),
                     lambda m: pytest.fail("the page's run was not kept"))
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    asked = spec.render(state, **WINDOWS, compute=False)
    assert asked.request["labels"] == ["head metrics"], asked.request
    drawn = spec.render(state, **WINDOWS)
    assert not drawn.errors
    assert W.store().stats(lm, W.declared(HEAD_METRICS, lm, data, {}))["computed"] == 1
