"""POST /api/patching and /api/path-patching: the analysis' numbers, and 400s naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from attention_lens.analysis import patching as P
from attention_lens.server import ServerConfig, create_server

PAIR = dict(clean=" The cat sat on the mat. The cat sat on the",
            corrupted=" The man sat on the mat. The cat sat on the", correct=" mat", wrong=" man")


@pytest.fixture(scope="module")
def server():
    app = create_server(ServerConfig(cache_size=8))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    return app


@pytest.fixture(scope="module")
def client(server):
    return server.server.test_client()


@pytest.fixture(scope="module")
def lm(server):
    return server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


def test_patching_returns_the_analysis_grid(client, lm):
    status, data = post(client, "/api/patching", {**PAIR, "granularity": "head_out"})
    assert status == 200, data
    res = data["result"]
    ours = P.activation_patching(lm, **PAIR, granularity="head_out")
    np.testing.assert_allclose(np.array(res["values"]), ours.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(res["attribution"]), ours.attribution, rtol=1e-6,
                               atol=1e-6)
    assert res["axes"] == ["layer", "head"] and res["clean_display"][1] == "·cat"
    status, data = post(client, "/api/patching", {**PAIR, "granularity": "resid_pre",
                                                  "direction": "noising",
                                                  "metric": "normalized",
                                                  "attribution": False})
    assert status == 200, data
    assert data["result"]["base_metric"] == pytest.approx(1.0)
    assert all(v is None for row in data["result"]["attribution"] for v in row)


def test_patching_over_pairs(client):
    pairs = [PAIR, {**PAIR, "wrong": " car"}]
    status, data = post(client, "/api/patching", {"pairs": pairs, "granularity": "head_v"})
    assert status == 200, data
    per = np.array(data["result"]["per_pair"])
    assert per.shape == (2, 2, 12) and data["n_pairs"] == 2
    np.testing.assert_allclose(np.array(data["result"]["mean"]), per.mean(0), atol=1e-5)
    csv = "clean,corrupted,correct,wrong\n" + ",".join(PAIR.values()) + "\n"
    status, data = post(client, "/api/patching", {"pairs": csv, "granularity": "head_v"})
    assert status == 200 and data["n_pairs"] == 1


def test_path_patching(client, lm):
    status, data = post(client, "/api/path-patching", {**PAIR, "sender": [0, 7]})
    assert status == 200, data
    ours = P.path_patching(lm, **PAIR, sender=(0, 7))
    vals = np.array([[[np.nan if v is None else v for v in h] for h in layer]
                     for layer in data["result"]["values"]])
    np.testing.assert_allclose(vals, ours.values, atol=1e-5)
    assert data["components"] == ["q", "k", "v"]
    status, data = post(client, "/api/path-patching", {**PAIR, "table": True})
    assert status == 200 and len(data["result"]["direct"]) == 2


def test_path_patching_variants(tmp_path, tiny_tokenizer):
    """``mlps`` names the variant; on a model with MLPs the two differ and each equals the
    analysis; the page names the variant it drew."""
    from attention_lens.components import page as page_spec
    from attention_lens.model import save_model
    from tests.conftest import make_tiny

    deep = make_tiny(tiny_tokenizer, seed=3, n_layers=4, attn_only=False, d_mlp=64,
                     act_fn="gelu", normalization_type="LN", name="tiny-deep")
    save_model(deep.model, tiny_tokenizer, tmp_path / "tiny-deep")
    app = create_server(ServerConfig(models_dirs=[tmp_path], model="tiny-deep", cache_size=4))
    client = app.server.test_client()
    pair = dict(clean="Harry Potter went to the shop, and Harry",
                corrupted="Harry Potter went to and shop, and Harry", correct=" Potter",
                wrong=" the")
    got = {}
    for mlps in (None, "recomputed", "frozen"):
        body = {**pair, "sender": [0, 1], **({} if mlps is None else {"mlps": mlps})}
        status, data = post(client, "/api/path-patching", body)
        assert status == 200, data
        got[mlps] = np.array(data["result"]["values"], dtype=float)
        assert data["result"]["mlps"] == (mlps or "recomputed")
        ref = P.path_patching(deep, **pair, sender=(0, 1), mlps=mlps or "recomputed")
        np.testing.assert_allclose(got[mlps], ref.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[None], got["recomputed"])
    assert np.nanmax(np.abs(got["frozen"] - got["recomputed"])) > 1e-3
    status, data = post(client, "/api/path-patching", {**pair, "table": True, "mlps": "frozen"})
    assert status == 200 and data["result"]["mlps"] == "frozen"
    status, data = post(client, "/api/path-patching", {**pair, "sender": [0, 1],
                                                       "mlps": "skipped"})
    assert status == 400 and "'mlps' must be one of 'recomputed', 'frozen'" in data["error"]
    state = {"model": "tiny-deep", "text": pair["clean"], "pos": None}
    for mlps in P.MLP_MODES:
        drawn = page_spec.spec_of("patching").render(state, **pair, sender="L0H1", mlps=mlps)
        assert not drawn.errors, drawn.errors
        title = drawn.figures["path"].layout.title.text.replace("<br>", " ")
        assert f"MLPs {mlps}" in title, title


def test_kl_needs_no_answer_tokens(client, lm):
    pair = {k: PAIR[k] for k in ("clean", "corrupted")}
    status, data = post(client, "/api/patching", {**pair, "metric": "kl",
                                                  "granularity": "head_out"})
    assert status == 200, data
    res = data["result"]
    ours = P.activation_patching(lm, **PAIR, metric="kl", granularity="head_out")
    np.testing.assert_allclose(np.array(res["values"]), ours.values, rtol=1e-6, atol=1e-6)
    assert res["correct_id"] is None and res["wrong_id"] is None
    assert res["clean_metric"] == pytest.approx(0.0, abs=1e-5) and res["base_metric"] > 0.1
    status, data = post(client, "/api/path-patching", {**pair, "metric": "kl", "sender": [0, 7]})
    assert status == 200, data
    ref = P.path_patching(lm, **pair, metric="kl", sender=(0, 7))
    np.testing.assert_allclose(np.array(data["result"]["values"], dtype=float), ref.values,
                               rtol=1e-6, atol=1e-6)
    # the metrics that read answer tokens still ask for them
    status, data = post(client, "/api/patching", {**pair, "metric": "logprob"})
    assert status == 400 and "missing field 'correct'" in data["error"]


@pytest.mark.parametrize("path, body, message", [
    ("/api/patching", {**PAIR, "corrupted": " The dog sat on the mat. The cat sat on the"},
     "14 tokens and the corrupted prompt 15"),
    ("/api/patching", {**PAIR, "clean": ""}, "'clean' is empty"),
    ("/api/patching", {k: v for k, v in PAIR.items() if k != "corrupted"},
     "missing field 'corrupted'"),
    ("/api/patching", {**PAIR, "correct": " matress"}, "not a single token"),
    ("/api/patching", {**PAIR, "correct": 10 ** 9}, "outside the vocabulary"),
    ("/api/patching", {k: v for k, v in PAIR.items() if k != "correct"},
     "missing field 'correct'"),
    ("/api/patching", {**PAIR, "wrong": " mat"}, "the same token"),
    ("/api/patching", {**PAIR, "position": 14}, "position"),
    ("/api/patching", {**PAIR, "granularity": "neurons"}, "'granularity' must be one of"),
    ("/api/patching", {**PAIR, "granularity": "mlp_out"}, "no MLPs"),
    ("/api/patching", {**PAIR, "pairs": []}, "either 'pairs' or one pair"),
    ("/api/patching", {"pairs": 5}, "'pairs' must be a list"),
    ("/api/patching", {"pairs": "clean,corrupted\na,b\n"}, "lacks the column"),
    ("/api/patching", {"pairs": "clean,corrupted,correct,wrong\n" + "a b,a c, d, e\n" * 10_000},
     "10,000 pairs; at most 100"),
    ("/api/patching", {**PAIR, "shoe": 1}, "shoe"),
    ("/api/path-patching", PAIR, "missing field 'sender'"),
    ("/api/path-patching", {**PAIR, "sender": [5, 0]}, "layer 5 does not exist"),
    ("/api/path-patching", {**PAIR, "sender": "L0H1"}, "'sender' must be \\[layer, head\\]"),
    ("/api/path-patching", {**PAIR, "sender": [0, 1], "table": True}, "not both"),
])
def test_bad_requests_are_400_naming_the_problem(client, path, body, message):
    status, data = post(client, path, body)
    assert status == 400, data
    assert __import__("re").search(message, data["error"]), data["error"]


def test_patching_is_declared_once_with_the_pair_scope(server, client, lm, monkeypatch):
    """/api/patching comes from the declaration (scope pair): its route, its 400s, its cache
    entry and its job policy (the one inline threshold)."""
    from attention_lens import weight_analyses as W
    from attention_lens.analysis import declare

    spec = declare.find("patching")
    assert spec is P.PATCHING and spec.scope == "pair"
    assert "POST /api/patching" in client.get("/api/").get_json()["endpoints"]
    assert not [r for r in server.server.url_map.iter_rules() if r.rule == "/api/patching"]
    body = {**PAIR, "granularity": "head_out"}
    status, data = post(client, "/api/patching", body)
    assert status == 200, data
    registry = server.server.extensions["attention_lens"]["registry"]
    pair = P.PairInput.read(body, lm, lm.cfg.n_ctx)
    values = {"granularity": "head_out", "attribution": True}
    cached = registry.weights(lm.name, spec.key(values, given=pair),
                              lambda m: pytest.fail("the API's result was not kept"))
    np.testing.assert_allclose(cached.values, data["result"]["values"], rtol=1e-6)
    status, data = post(client, "/api/patching", {**PAIR, "attribution": "yes"})
    assert status == 400 and "'attribution' must be true or false" in data["error"]
    # over the one threshold the API computes through the store; the numbers are the same
    assert declare.runs_inline(spec, lm.cfg, pair.n_tokens, values)
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    noising = {**body, "direction": "noising"}
    req = W.declared(spec, lm, P.PairInput.read(noising, lm, lm.cfg.n_ctx), values)
    assert req is not None and req.label == "head_out activation patching"
    status, data = post(client, "/api/patching", noising)
    assert status == 200, data
    ours = P.activation_patching(lm, **PAIR, granularity="head_out", direction="noising")
    np.testing.assert_allclose(np.array(data["result"]["values"]), ours.values, rtol=1e-6,
                               atol=1e-6)
    assert W.store().stats(lm, req)["computed"] == 1
    pairs = {"pairs": [PAIR, {**PAIR, "wrong": " car"}], "granularity": "head_v"}
    status, data = post(client, "/api/patching", pairs)
    assert status == 200 and data["n_pairs"] == 2
    req = W.declared(spec, lm, P.PairInput.read(pairs, lm, lm.cfg.n_ctx),
                     {"granularity": "head_v", "attribution": True})
    assert W.store().stats(lm, req)["computed"] == 1


def test_the_cost_estimate_follows_the_model_shape(lm):
    """The engine's estimated work grows with the cells and tokens; attention-only-2l at its
    whole context runs inline, a GPT-2-small-shaped grid over 40 tokens as a job."""
    from attention_lens.analysis import declare
    from attention_lens.model.shapes import GPT2_SHAPE
    from attention_lens.model.config import ModelConfig

    GPT2_SMALL = ModelConfig(**GPT2_SHAPE)
    cfg = lm.cfg
    small = P.grid_gflop(cfg, cfg.n_ctx, "head_out_by_pos")
    assert small <= declare.INLINE_MAX_GFLOP
    assert P.grid_gflop(cfg, 64, "head_out") < P.grid_gflop(cfg, 64, "head_out_by_pos")
    assert P.grid_gflop(cfg, 64, "resid_pre", n_pairs=3) == pytest.approx(
        3 * P.grid_gflop(cfg, 64, "resid_pre"))
    assert P.grid_gflop(GPT2_SMALL, 40, "head_out_by_pos") > declare.INLINE_MAX_GFLOP
    assert P.path_gflop(GPT2_SMALL, 40) > declare.INLINE_MAX_GFLOP
