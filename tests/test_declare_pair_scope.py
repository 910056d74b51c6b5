"""The pair-scope analyses declared in analysis/ beside activation patching (path patching,
circuit discovery): each endpoint's 400 on a bad field, its result kept under the
declaration's key, and a background job with the same numbers when the one inline threshold
is forced."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare
from attention_lens.analysis import patching as PT
from attention_lens.server.app import create_app

MODEL = "attn-only-2l"
PAIR = dict(clean=" The cat sat on the mat. The cat sat on the",
            corrupted=" The man sat on the mat. The cat sat on the", correct=" mat", wrong=" man")


def post(client, name, **body):
    r = client.post(f"/api/{name}", json={"model": MODEL, **body})
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


def cached(registry, analysis, body, values):
    """The result kept in the registry's weight-analysis cache under the declaration's key."""
    lm = registry.get(MODEL)
    pair = PT.PairInput.read(body, lm, lm.cfg.n_ctx)
    key = analysis.key(analysis.values(values), given=pair)
    return registry.weights(MODEL, key, lambda m: pytest.fail(f"no entry under {key}"))


def as_job(registry, monkeypatch, analysis, body, values):
    """Force the threshold: the store's request and how often it was computed."""
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    lm = registry.get(MODEL)
    pair = PT.PairInput.read(body, lm, lm.cfg.n_ctx)
    req = W.declared(analysis, lm, pair, analysis.values(values))
    assert req is not None and req.label == analysis.label.format(**analysis.values(values))
    return lambda: W.store().stats(lm, req)["computed"]


def test_path_patching(client, registry, monkeypatch):
    spec = declare.find("path-patching")
    assert spec is PT.PATH_PATCHING and spec.scope == "pair"
    for body, words in [({}, "missing field 'sender'"),
                        ({"sender": "L0H1"}, "'sender' must be [layer, head], got 'L0H1'"),
                        ({"sender": [0, True]}, "'sender' must be [layer, head]"),
                        ({"sender": [5, 0]}, "layer 5 does not exist: the model has 2 layer"),
                        ({"sender": [0, 12]}, "head 12 does not exist: each layer has 12"),
                        ({"sender": [0, 1], "table": True}, "not both"),
                        ({"sender": [0, 1], "table": "yes"}, "'table' must be true or false"),
                        ({"sender": [0, 1], "mlps": "skipped"}, "'mlps' must be one of"),
                        ({"sender": [0, 1], "ln_mode": "x"}, "'ln_mode' must be one of"),
                        ({"sender": [0, 1], "position": 14}, "'position' must be between"),
                        ({"sender": [0, 1], "pairs": [PAIR]}, "unknown field(s) 'pairs'")]:
        status, err = post(client, "path-patching", **PAIR, **body)
        assert status == 400 and words in err["error"], (body, err)
    lm = registry.get(MODEL)
    status, data = post(client, "path-patching", **PAIR, sender=[-2, 7])
    assert status == 200 and data["result"]["sender"] == [0, 7], data
    kept = cached(registry, spec, PAIR, {"sender": [0, 7]})
    ours = PT.path_patching(lm, **PAIR, sender=(0, 7))
    np.testing.assert_array_equal(kept.values, ours.values)
    got = np.array(data["result"]["values"], dtype=float)
    np.testing.assert_allclose(got, ours.values, rtol=1e-6, atol=1e-6)
    # the table is the same analysis, sent from every head, and kept under its own key
    status, table = post(client, "path-patching", **PAIR, table=True, mlps="frozen")
    assert status == 200 and table["result"]["mlps"] == "frozen"
    assert cached(registry, spec, PAIR, {"table": True, "mlps": "frozen"}).values.shape == \
        (2, 12, 2, 12, 3)
    # over the one threshold: a job through the store, the same numbers
    computed = as_job(registry, monkeypatch, spec, PAIR, {"sender": [0, 7], "ln_mode": "frozen"})
    status, job = post(client, "path-patching", **PAIR, sender=[0, 7], ln_mode="frozen")
    assert status == 200 and computed() == 1
    ref = PT.path_patching(lm, **PAIR, sender=(0, 7), ln_mode="frozen")
    np.testing.assert_allclose(np.array(job["result"]["values"], dtype=float), ref.values,
                               rtol=1e-6, atol=1e-6)


def test_path_patching_cost_from_the_shape(registry):
    """The table's cost is the single sender's times the heads; both grow with the tokens."""
    cfg = registry.get(MODEL).cfg
    spec = PT.PATH_PATCHING
    one = spec.gflop(cfg, 14, spec.values({"sender": [0, 1]}))
    assert one == pytest.approx(PT.path_gflop(cfg, 14))
    assert spec.gflop(cfg, 14, spec.values({"table": True})) == pytest.approx(24 * one)
    assert spec.gflop(cfg, 28, spec.values({"sender": [0, 1]})) > 2 * one


def test_the_patching_page_reads_path_patching_from_the_declaration(registry, bg,
                                                                    monkeypatch):
    """/patching's path panel is the declared analysis: kept under its key inline, and a
    job of the store over the threshold."""
    from attention_lens.components import page as P

    create_app(registry, background=bg)
    spec = P.spec_of("patching")
    state = {"model": MODEL, "text": PAIR["clean"], "pos": None}
    drawn = spec.render(state, **PAIR, sender="L0H7", mlps="frozen", compute=True)
    assert not drawn.errors, drawn.errors
    kept = cached(registry, PT.PATH_PATCHING, PAIR, {"sender": [0, 7], "mlps": "frozen"})
    assert kept.sender == (0, 7) and kept.mlps == "frozen"
    computed = as_job(registry, monkeypatch, PT.PATH_PATCHING, PAIR, {"sender": [1, 2]})
    first = spec.render(state, **PAIR, sender="L1H2", compute=False)
    assert isinstance(first.request, dict), first.errors  # the page asks for a job
    drawn = spec.render(state, **PAIR, sender="L1H2", compute=True)
    assert not drawn.errors and computed() == 1
    assert drawn.figures["path"].layout.title.text.startswith("path patching from L1H2")


def test_circuit_discovery(client, registry, monkeypatch):
    from attention_lens.analysis.circuit.declared import CIRCUIT

    assert declare.find("circuit") is CIRCUIT and CIRCUIT.scope == "pair"
    for body, words in [({"method": "acdc"}, "'method' must be one of"),
                        ({"ablation": "half"}, "'ablation' must be one of"),
                        ({"steps": 0}, "'steps' must be between 1 and"),
                        ({"k": 530}, "'k' must be between 0 and 529 (attn-only-2l has 529 "
                                     "edges)"),
                        ({"n_sizes": 1}, "'n_sizes' must be between 2 and 40"),
                        ({"n_random": 51}, "'n_random' must be between 0 and 50"),
                        ({"curve": 1}, "'curve' must be true or false"),
                        ({"search": "beam"}, "'search' must be one of"),
                        ({"threshold": -1}, "'threshold' must be a number >= 0"),
                        ({"threshold": "0.1"}, "'threshold' must be a number >= 0"),
                        ({"direction": "noising"}, "unknown field(s) 'direction'"),
                        ({"pairs": [PAIR]}, "either 'pairs' or one pair")]:
        status, err = post(client, "circuit", **PAIR, **body)
        assert status == 400 and words in err["error"], (body, err)
    values = {"k": 10, "curve": False, "ablation": "mean"}
    status, data = post(client, "circuit", **PAIR, **values)
    assert status == 200, data
    kept = cached(registry, CIRCUIT, PAIR, values)
    assert kept.kept.tolist() == data["in_circuit"] and kept.curve is None
    assert data["circuit"]["settings"]["ablation"] == "mean"
    # over the one threshold: a job through the store, the same circuit
    values = {"k": 8, "n_sizes": 3, "n_random": 2, "method": "eap_ig", "steps": 2}
    computed = as_job(registry, monkeypatch, CIRCUIT, PAIR, values)
    status, job = post(client, "circuit", **PAIR, **values)
    assert status == 200 and computed() == 1
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", 1e9)
    status, inline = post(client, "circuit", **PAIR, **values)
    assert status == 200 and inline["in_circuit"] == job["in_circuit"]
    np.testing.assert_allclose(inline["scores"], job["scores"], rtol=1e-6, atol=1e-9)
    assert len(job["circuit"]["curve"]["k"]) == 3


def test_circuit_cost_from_the_shape(registry):
    """More masked runs, more work: the curve, exact scores, ACDC, EAP-IG steps, pairs."""
    from attention_lens.analysis.circuit.declared import CIRCUIT

    cfg = registry.get(MODEL).cfg

    def gflop(n_tokens=20, **given):
        return CIRCUIT.gflop(cfg, n_tokens, CIRCUIT.values(given))

    eap = gflop(curve=False)
    assert 0 < eap < gflop() and eap < gflop(curve=False, method="exact")
    assert eap < gflop(curve=False, method="eap_ig", steps=2) < gflop(curve=False,
                                                                      method="eap_ig", steps=9)
    assert eap < gflop(curve=False, search="acdc") and eap < gflop(40, curve=False)
    per_pair = CIRCUIT.gflop(cfg, 20, {**CIRCUIT.values({}), "n_pairs": 3})
    assert per_pair == pytest.approx(3 * gflop())


def test_the_circuit_page_runs_the_declaration_in_two_jobs(registry, bg, monkeypatch):
    """/circuit on a model whose curve is too much for the circuit's job (forced): the
    declared circuit is one job, the curve a second one that reads the first's result from
    the store instead of computing it again."""
    from attention_lens.analysis.circuit.declared import CIRCUIT
    from attention_lens.components import page as P

    create_app(registry, background=bg)
    from attention_lens.pages import circuit as page

    monkeypatch.setenv("ATTENTION_LENS_CIRCUIT_INLINE_FLOP", "0")
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    spec = P.spec_of("circuit")
    state = {"model": "attn-only-1l", "text": "Harry Potter went.", "pos": None}
    asked = spec.render(state, compute=False)
    assert asked.request["labels"] == ["eap circuit discovery"], asked.request
    first = spec.render(state)
    assert not first.errors and page.curve_due(first), first.errors
    lm = registry.get("attn-only-1l")
    query, _ = spec.query({}, spec.config(None))
    pair, _ = page.resolve(lm, query)
    pin = page.pair_input(lm, query, pair)
    sizes, rand, _, inline = page.curve_plan(lm, query, pin.n_tokens)
    values = page.circuit_values(query, (sizes, rand))
    job = W.declared(CIRCUIT, lm, pin, {**values, "curve": False})
    assert not inline and W.store().stats(lm, job)["computed"] == 1
    second = spec.render(state)
    assert not page.curve_due(second) and "resample: circuit" in [
        t.name for t in second.figures["faithfulness"].data]
    curve = page.curve_request(lm, pin, values)
    assert W.store().stats(lm, curve)["computed"] == 1
    assert W.store().stats(lm, job)["computed"] == 1  # the curve's job read it


def test_a_stored_set_of_pairs_is_sent_to_jobs_by_its_hash(registry, bg, monkeypatch):
    """/circuit on an uploaded set: the job's request names the set by the content hash it
    is stored under, not by its text, and the job reads it from the store."""
    import base64

    from attention_lens.analysis.circuit.declared import CIRCUIT
    from attention_lens.components import page as P

    create_app(registry, background=bg)
    from attention_lens.pages import circuit as page

    other = {**PAIR, "wrong": " car"}
    csv = "clean,corrupted,correct,wrong\n" + "".join(
        ",".join(p[k] for k in ("clean", "corrupted", "correct", "wrong")) + "\n"
        for p in (PAIR, other))
    digest, status = page.upload_pairs(
        "data:text/csv;base64," + base64.b64encode(csv.encode()).decode(), "pairs.csv")
    assert "2 pairs" in str(status.children)
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    spec = P.spec_of("circuit")
    state = {"model": "attn-only-1l", "text": "Harry Potter went.", "pos": None}
    lm = registry.get("attn-only-1l")
    query, _ = spec.query({"pairs": digest, "k": "10"}, spec.config(None))
    pin = page.pair_input(lm, query, {})
    assert pin.stored == digest and len(pin.pairs) == 2 and pin.is_set
    sizes, rand, _, inline = page.curve_plan(lm, query, None)
    assert inline
    req = W.declared(CIRCUIT, lm, pin, page.circuit_values(query, (sizes, rand)))
    assert req is not None and " man sat" not in json.dumps(req.as_json())
    assert json.loads(dict(req.params)["tokens"])["stored"] == digest
    drawn = spec.render(state, pairs=digest, k="10")
    assert not drawn.errors, drawn.errors
    assert W.store().stats(lm, req)["computed"] == 1
    again = spec.render(state, pairs=digest, k="10", compute=False)
    assert not again.errors and not isinstance(again.request, dict)  # from the store
    assert again.figures["circuit"] is not None


def test_acdc_threshold_is_one_default_and_keys_only_acdc():
    """The ACDC threshold is declared once: the page's box starts at the declaration's
    default, the API uses it when none is sent, and a search that is not ACDC keys it as 0
    (the page and the API share the entry whatever threshold either sends)."""
    from attention_lens.analysis.circuit.declared import CIRCUIT, DEFAULT_THRESHOLD
    from attention_lens.pages import circuit as page

    assert float(page.DEFAULT_THRESHOLD) == DEFAULT_THRESHOLD > 0
    shape = declare.Shape()
    acdc = CIRCUIT.read({"search": "acdc"}, shape)
    assert acdc["threshold"] == DEFAULT_THRESHOLD
    top_k = CIRCUIT.read({"search": "top_k", "threshold": 0.3}, shape)
    assert top_k["threshold"] == 0.0
    assert CIRCUIT.key(top_k) == CIRCUIT.key(CIRCUIT.values({"search": "top_k"}))
    assert CIRCUIT.key(acdc) != CIRCUIT.key(CIRCUIT.read({"search": "acdc", "threshold": 0.3},
                                                         shape))
    query = {"method": "eap", "ablation": "resample", "steps": 5, "k": 10, "search": "acdc",
             "threshold": ""}
    assert page.circuit_values(query, (4, 2))["threshold"] == DEFAULT_THRESHOLD
