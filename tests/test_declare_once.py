"""An analysis declared once: one module (function, declaration, figure, page) gets its page,
its API endpoint with its 400s, its cache entry and its job policy, with no other file."""

from __future__ import annotations

import textwrap

import dash
import numpy as np
import pytest
import torch

from attention_lens import weight_analyses as W
from attention_lens.analysis import declare
from attention_lens.server.api import create_api
from attention_lens.server.app import create_app
from attention_lens.components import page as P

#: The whole throwaway analysis: what a contributor writes to add one.
MODULE = textwrap.dedent('''
    """/sink: how much each head attends to one key position."""

    import numpy as np
    import plotly.graph_objects as go

    from attention_lens.analysis.declare import Choice, Position, declare
    from attention_lens.components import page as P


    def attention_to(lm, fp, *, key, reduce):
        """[layer, head]: the attention paid to ``key`` by the queries that can see it."""
        out = np.zeros((lm.cfg.n_layers, lm.cfg.n_heads))
        for layer in range(lm.cfg.n_layers):
            col = fp.cache[f"blocks.{layer}.attn.hook_pattern"][:, key:, key].double().numpy()
            out[layer] = col.mean(axis=1) if reduce == "mean" else col.max(axis=1)
        return out


    SINK = declare("sink", attention_to,
                   params=[Position("key", 0, label="key position"),
                           Choice("reduce", "mean", ("mean", "max"), label="over queries")],
                   to_json=lambda res: {"scores": res})


    def panels(ctx, query):
        scores = ctx.run(SINK, query)
        return [P.Panel("sink", go.Figure(go.Heatmap(z=scores)), {"scores": scores})]


    P.register_page(__name__, path="/sink", name="Sink", order=99, heading="Attention sink",
                    panels=panels, graphs=["sink"], analysis=SINK)
''')

TEXT = "Harry Potter went home. Harry Potter went home."
MODEL = "attn-only-2l"


@pytest.fixture
def sink_app(tmp_path, registry, bg):
    """An app whose pages folder holds only the throwaway module, with the JSON API."""
    before = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "sink.py").write_text(MODULE, encoding="utf-8")
    written = {p for p in tmp_path.rglob("*.py")} - {tmp_path / n for n in before}
    app = create_app(registry, background=bg, pages_folder=pages)
    app.server.register_blueprint(create_api(registry), url_prefix="/api")
    yield app, written


def oracle(lm, text: str, key: int, reduce: str) -> np.ndarray:
    """The same scores from TransformerLens' own forward pass (float32 through another
    implementation: compared at 1e-5 relative, as the other TransformerLens checks)."""
    from tl_oracle import tl_tokens, to_transformer_lens

    model = to_transformer_lens(lm)
    with torch.no_grad():
        _, cache = model.run_with_cache(tl_tokens(lm, text))
    out = []
    for layer in range(lm.cfg.n_layers):
        col = cache["pattern", layer][0][:, key:, key].double().numpy()
        out.append(col.mean(axis=1) if reduce == "mean" else col.max(axis=1))
    return np.array(out)


def test_one_module_gives_page_endpoint_cache_and_job(sink_app, registry, bg, monkeypatch):
    app, written = sink_app
    # one source file: function, declaration, figure and page (at most 3 allowed)
    assert len(written) == 1 <= 3
    lm = registry.get(MODEL)
    client = app.server.test_client()

    # the page: found in dash.page_registry, its controls derived from the declaration
    entry = next(p for p in dash.page_registry.values() if p["path"] == "/sink")
    spec = entry["attention_lens"]
    assert spec.control_names == ["key", "reduce"] and spec.analysis.name == "sink"
    layout = str(entry["layout"](key="2", reduce="max", model=MODEL))
    assert "sink-key" in layout and "sink-reduce" in layout and "'name': 'sink'" in layout
    assert "reduce must be one of mean, max" in str(entry["layout"](reduce="median"))
    state = {"model": MODEL, "text": TEXT, "pos": None}
    drawn = spec.render(state, key=2, reduce="max")
    assert drawn.errors == [] and drawn.query["key"] == 2
    expected = oracle(lm, TEXT, 2, "max")
    np.testing.assert_allclose(np.array(drawn.figures["sink"].data[0].z, dtype=float),
                               expected, rtol=1e-5, atol=1e-6)

    # the endpoint: 200 with the result, listed in the index, 400 on each kind of bad field
    r = client.post("/api/sink", json={"text": TEXT, "model": MODEL, "key": 1})
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    assert data["model"] == MODEL and data["n_tokens"] == len(data["token_ids"])
    np.testing.assert_allclose(data["scores"], oracle(lm, TEXT, 1, "mean"),
                               rtol=1e-5, atol=1e-6)
    assert "POST /api/sink" in client.get("/api/").get_json()["endpoints"]
    n = data["n_tokens"]
    for body, status, words in [
        ({"key": n}, 400, f"'key' must be between -{n} and {n - 1} (the prompt has {n} "
                          "tokens)"),
        ({"key": "one"}, 400, "'key' must be an integer"),
        ({"key": True}, 400, "'key' must be an integer"),
        ({"reduce": "median"}, 400, "'reduce' must be one of 'mean', 'max'"),
        ({"keys": 1}, 400, "unknown field(s) 'keys'"),
    ]:
        bad = client.post("/api/sink", json={"text": TEXT, "model": MODEL, **body})
        assert bad.status_code == status and words in bad.get_json()["error"], bad.data[:300]
    assert client.get("/api/sink").status_code == 405

    # the cache: the API's result is kept with the forward pass under the declaration's key,
    # and the page with the same parameters reads it (-1 and n - 1 are one key)
    fp = registry.forward(TEXT, MODEL)
    key = spec.analysis.key({"key": 1, "reduce": "mean"}, declare.Shape(lm.cfg, n))
    assert key == ("prompt", "sink", (("key", 1), ("reduce", "mean")))
    cached = registry.per_prompt(fp, key, lambda: pytest.fail("the API's result was not kept"))
    np.testing.assert_allclose(cached, data["scores"], rtol=1e-6)  # the API rounds to 7 digits
    entries = registry.cache_info()["per_prompt"]
    again = client.post("/api/sink", json={"text": TEXT, "model": MODEL, "key": 1 - n})
    assert again.get_json()["scores"] == data["scores"]
    assert registry.cache_info()["per_prompt"] == entries

    # the job policy: over the one inline threshold, the page asks for a background job
    # (progress strip) and the API computes through the store; the numbers are the same
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    out = spec.update(state, 3, "mean", 0, None)
    request = out[len(spec.graphs) + 2]
    assert request["labels"] == ["sink"] and request["token"]
    job = spec.run_job(lambda _: None, request, state, 3, "mean")
    np.testing.assert_allclose(np.array(job[0].data[0].z, dtype=float),
                               oracle(lm, TEXT, 3, "mean"), rtol=1e-5, atol=1e-6)
    assert bg.slots.active() == []
    req = W.declared(spec.analysis, lm, fp, {"key": 3, "reduce": "mean"})
    assert W.store().stats(lm, req)["computed"] == 1
    r = client.post("/api/sink", json={"text": TEXT, "model": MODEL, "key": 3})
    np.testing.assert_allclose(r.get_json()["scores"], oracle(lm, TEXT, 3, "mean"),
                               rtol=1e-5, atol=1e-6)
    assert W.store().stats(lm, req)["computed"] == 1  # read from the store, not recomputed


def test_declared_endpoints_keep_their_old_paths(sink_app):
    """The analyses moved onto declarations answer at their new and their old paths alike."""
    app, _ = sink_app
    client = app.server.test_client()
    for new, old, body in [("next-token", "predict", {"top_k": 3}),
                           ("head-detection", "induction-score", {"rows": "all"}),
                           ("attribution", "attribution", {"position": 3})]:
        a = client.post(f"/api/{new}", json={"text": TEXT, **body})
        b = client.post(f"/api/{old}", json={"text": TEXT, **body})
        assert a.status_code == b.status_code == 200 and a.get_json() == b.get_json()
    assert client.post("/api/no-such-analysis", json={}).status_code == 404
    r = client.post("/api/models", json={})
    assert r.status_code == 405 and "use GET" in r.get_json()["error"]


def ov_norm(lm, *, layer):
    """[head]: the Frobenius norm of each head's OV circuit W_V W_O, in float64."""
    w_v = lm.model.W_V[layer].double()
    w_o = lm.model.W_O[layer].double()
    return torch.linalg.matrix_norm(w_v @ w_o).numpy()


OV_NORM = declare.declare(
    "ov-norm", ov_norm, scope="weights",
    params=[declare.Int("layer", 0, 0, lambda cfg: cfg.n_layers - 1, label="layer")],
    to_json=lambda res: {"norms": res})


def test_weight_scope_is_kept_in_the_weight_analysis_store(sink_app, registry):
    app, _ = sink_app
    client = app.server.test_client()
    lm = registry.get(MODEL)
    r = client.post("/api/ov-norm", json={"model": MODEL, "layer": 1})
    assert r.status_code == 200, r.data[:300]
    from tl_oracle import to_transformer_lens

    with torch.no_grad():
        ov = to_transformer_lens(lm).OV
        theirs = [float(ov[1, h].norm()) for h in range(lm.cfg.n_heads)]
    np.testing.assert_allclose(r.get_json()["norms"], theirs, rtol=1e-5)
    req = W.declared(OV_NORM, lm, None, {"layer": 1})
    assert W.store().stats(lm, req)["computed"] == 1
    assert client.post("/api/ov-norm", json={"model": MODEL, "layer": 1}).get_json() == \
        r.get_json()
    assert W.store().stats(lm, req)["computed"] == 1
    bad = client.post("/api/ov-norm", json={"model": MODEL, "layer": 2})
    assert bad.status_code == 400 and "'layer' must be between 0 and 1" in \
        bad.get_json()["error"]
    assert client.post("/api/ov-norm", json={"text": "a"}).status_code == 400  # no prompt


def test_page_and_api_share_one_cache_entry(sink_app, registry):
    """The /induction page's controls and the API's fields are one declaration's parameters:
    the page reads the entry the API computed (same key), with the same numbers."""
    from attention_lens.analysis.heads import HEAD_DETECTION
    from attention_lens.api_json import jsonable
    from attention_lens.components.controls import controls_of, parse_all

    app, _ = sink_app
    lm = registry.get(MODEL)
    r = app.server.test_client().post("/api/induction-score",
                                      json={"text": TEXT, "model": MODEL, "rows": "all"})
    assert r.status_code == 200, r.data[:300]
    query, problems = parse_all(controls_of(HEAD_DETECTION), {"rows": "all"}, lm.cfg)
    assert query == {"metric": "mul", "rows": "all", "n": 8} and problems == []
    before = registry.cache_info()["per_prompt"]
    hd = P.PageContext({"model": MODEL, "text": TEXT}).run(HEAD_DETECTION, query)
    assert registry.cache_info()["per_prompt"] == before  # read, not computed again
    assert jsonable(hd.scores["induction"]) == r.get_json()["induction_scores"]
    # one default for both: 8 examples per head
    assert len(r.get_json()["result"]["example_weights"]["induction"][1][5]) == 8
