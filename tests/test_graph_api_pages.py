"""/api/qk-attribution, /api/graph and the /qk and /graph pages (callbacks called directly)."""

from __future__ import annotations

import json

import dash
import numpy as np
import pytest
from conftest import restored_background

from attention_lens import weight_analyses as W
from attention_lens.components import page as P
from attention_lens.components.shell import DEFAULT_PROMPT
from attention_lens.server import ServerConfig, create_server

PROMPT = "Harry Potter and Hermione Granger walked. Harry Potter and Hermione"
STATE = {"model": "attn-only-2l", "text": DEFAULT_PROMPT, "pos": None}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with restored_background():
        app = create_server(ServerConfig(cache_size=8,
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
        assert app.server.test_client().get("/").status_code == 200
        yield app


@pytest.fixture(scope="module")
def client(server):
    return server.server.test_client()


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


# ------------------------------------------------------------------------------- API
def test_api_qk_attribution_cell_and_row(client):
    code, data = post(client, "/api/qk-attribution",
                      {"text": PROMPT, "layer": 1, "head": 5, "query": -1, "key": 4})
    assert code == 200, data
    res = data["result"]
    assert abs(res["total"] - res["score"]) <= 1e-4
    assert len(res["terms"]) == len(res["q_labels"]) and res["top_terms"][0]["text"]
    code, data = post(client, "/api/qk-attribution",
                      {"text": PROMPT, "layer": 1, "head": 5, "query": 10, "row": True})
    assert code == 200, data
    terms = np.asarray(data["result"]["terms"])
    assert terms.shape[0] == 11
    np.testing.assert_allclose(terms.sum((1, 2)), data["result"]["scores"], atol=1e-4)


@pytest.mark.parametrize("body, message", [
    ({"layer": 1, "head": 5, "query": 3, "key": 4}, "comes after query"),
    ({"layer": 1, "head": 12, "query": 3, "key": 1}, "'head' must be between 0 and 11"),
    ({"layer": 1, "head": 5, "query": 3}, "missing field 'key'"),
    ({"layer": 1, "query": 3, "key": 1}, "'layer' and 'head' are required"),
    ({"layer": 1, "head": 5, "query": 3, "key": 1, "contrast_key": 9}, "comes after query"),
    ({"layer": 1, "head": 5, "query": 300, "key": 1}, "'query' must be between"),
])
def test_api_qk_attribution_bad_input(client, body, message):
    code, data = post(client, "/api/qk-attribution", {"text": PROMPT, **body})
    assert code == 400 and message in data["error"], data


def test_api_graph(client):
    code, data = post(client, "/api/graph", {"text": PROMPT, "node_threshold": 0.9})
    assert code == 200, data
    res = data["result"]
    share = res["sum_into_target"] / (res["logit"] - res["bias"])
    assert abs(share - res["kept_target_share"]) <= 1e-9 and 0.5 < share < 1.5
    graph = res["graph"]
    assert graph["metadata"]["node_threshold"] == 0.9
    assert {n["feature_type"] for n in graph["nodes"]} >= {"embedding", "logit",
                                                           "cross layer transcoder"}
    assert len(graph["links"]) == res["n_edges"] <= res["n_edges_full"]
    code, everything = post(client, "/api/graph", {"text": PROMPT, "node_threshold": 1,
                                                   "edge_threshold": 1.0})
    assert code == 200
    res = everything["result"]
    assert res["n_edges"] == res["n_edges_full"] and res["n_nodes"] == res["n_nodes_full"]
    assert abs(res["sum_into_target"] - (res["logit"] - res["bias"])) <= 1e-4


@pytest.mark.parametrize("body, message", [
    ({"node_threshold": 0}, "must be a number in (0, 1]"),
    ({"node_threshold": 1.5}, "must be a number in (0, 1]"),
    ({"edge_threshold": -0.2}, "must be a number in (0, 1]"),
    ({"edge_threshold": "0.9"}, "must be a number in (0, 1]"),
    ({"node_threshold": True}, "must be a number in (0, 1]"),
    ({"target": " Hermione Granger"}, "is not a single token"),
    ({"position": 500}, "'position' must be between"),
])
def test_api_graph_bad_input(client, body, message):
    code, data = post(client, "/api/graph", {"text": PROMPT, **body})
    assert code == 400 and message in data["error"], data


@pytest.mark.parametrize("path, extra", [
    ("/api/graph", {}), ("/api/qk-attribution", {"layer": 1, "head": 5, "query": 3, "key": 1})])
def test_api_prompt_over_the_context(client, path, extra):
    long = "Harry Potter went to the shop. " * 60
    code, data = post(client, path, {"text": long, **extra})
    assert code == 400 and "reads at most 128" in data["error"], data
    code, data = post(client, path, {"text": long, "truncate": True, **extra})
    assert code == 200 and data["truncated"]["n_tokens_kept"] == 128


# ----------------------------------------------------------------------------- pages
def test_graph_page_draws_the_default_prompts_graph(server):
    spec = P.spec_of("graph")
    d = spec.render(STATE, compute=False)
    assert d.request is dash.no_update
    fig = d.figures["graph"]
    text = " ".join(t for _, t in d.alerts)
    assert "Position 38" in text and "logit − b_U" in text, text
    assert "Logit '·ang'" in fig.layout.title.text or "Logit 'ang'" in fig.layout.title.text
    nodes = fig.data[-1]
    kinds = {c[0] for c in nodes.customdata}
    assert {"token", "head", "target"} <= kinds
    (extra,) = d.extras.values()
    assert "L0H" in str(extra) and "QK attribution" in str(extra)
    # a bad threshold from a link is a warning, never an error
    alerts = spec.render(STATE, compute=False, node="150").alerts
    assert any("must lie in (0, 100]" in text and color == "warning"
               for color, text in alerts), alerts


def test_graph_page_second_visit_draws_the_same_figure_from_the_cache(server, monkeypatch):
    """A second visit copies the figure built on the first (the page styles it in place, so
    each visit gets its own) and does not build it again; both equal a fresh build."""
    from attention_lens.figures.graph import graph_figure
    from attention_lens.figures.theme import styled
    from attention_lens.pages import graph as G

    spec = P.spec_of("graph")
    state = {**STATE, "text": PROMPT, "theme": "light"}
    first = spec.render(state, compute=False, node="70")
    built = []
    monkeypatch.setattr(G, "graph_figure", lambda view: built.append(view) or graph_figure(view))
    again = spec.render(state, compute=False, node="70")
    other = spec.render({**state, "theme": "dark"}, compute=False, node="70")
    assert built == []
    assert first.figures["graph"] is not again.figures["graph"]
    ctx = P.PageContext(state)
    q, _ = spec.query({"node": "70"}, spec.config(state["model"]))
    explained, _ = G.view_of(ctx, q)
    fresh = styled(graph_figure(explained.view), "light")
    for d in (first, again):
        assert d.figures["graph"].to_plotly_json() == fresh.to_plotly_json()
    assert other.figures["graph"].to_plotly_json() == styled(graph_figure(explained.view),
                                                             "dark").to_plotly_json()
    assert first.notes == again.notes


def test_graph_page_runs_big_graphs_as_a_job(server, monkeypatch):
    from attention_lens.analysis import declare

    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)  # every graph counts as large
    spec = P.spec_of("graph")
    state = {**STATE, "text": PROMPT + " job"}
    d = spec.render(state, compute=False)
    assert d.request["labels"] == ["attribution graph"] and d.figures["graph"] is dash.no_update
    progress = []
    values = [c.default for c in spec.controls]
    out = spec.run_job(progress.append, d.request, state, *values)
    assert progress and out[0].layout.title.text.startswith("Logit")
    # drawn from the store the next time
    d = spec.render(state, compute=False)
    assert d.request is dash.no_update and d.figures["graph"].layout.title.text.startswith("Logit")


def test_graph_page_node_click_and_graph_file(server):
    from attention_lens.pages import graph as graph_page

    spec = P.spec_of("graph")
    nodes = spec.render(STATE, compute=False).figures["graph"].data[-1]
    i = next(i for i, c in enumerate(nodes.customdata) if c[0] == "head")
    detail = graph_page.node_detail({"points": [{"customdata": list(nodes.customdata[i]),
                                                 "hovertext": nodes.hovertext[i]}]}, STATE)
    assert "/qk?" in str(detail) and "/weights?" in str(detail) and "value" in str(detail)
    sent, status = graph_page.graph_file(1, STATE, {"node": 80, "edge": 98})
    data = json.loads(sent["content"])
    assert set(data) == {"metadata", "qParams", "nodes", "links"} and status == ""


def test_qk_page_defaults_to_an_induction_cell(server):
    spec = P.spec_of("qk")
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")
    W.store().compute(lm, W.probe_head_scores())
    d = spec.render(STATE, compute=False)
    assert d.request is dash.no_update
    text = " ".join(t for _, t in d.alerts)
    assert "strongest induction head" in text and "terms sum to" in text, text
    assert d.figures["terms"].layout.title.text.startswith("L1H")
    assert "token" in str(d.extras["words"]) and "output of L0H" in str(d.extras["words"])
    d = spec.render(STATE, compute=False, layer=1, head=5, query=3, key=7)
    assert any("comes after query" in text for text in d.errors), d.alerts


def test_page_downloads_and_export_data(server):
    from attention_lens import export

    (panel,) = P.page_panels("graph", STATE, {"node": "90"})
    assert panel.name == "graph" and set(panel.data) == {"metadata", "qParams", "nodes",
                                                         "links"}
    assert panel.data["metadata"]["node_threshold"] == 0.9
    assert json.loads(export.panel_json(panel, STATE))["data"]["links"]
    panels = P.page_panels("qk", STATE, {"layer": "1", "head": "5", "query": "29", "key": "4"})
    assert [p.name for p in panels] == ["terms", "top", "dims", "row"]
    csv = export.figure_csv(panels[0].figure)
    assert "L0H2" in csv and len(csv.splitlines()) > 100


def test_attention_click_link(server):
    from attention_lens.pages import qk as qk_page

    figure = {"layout": {"title": {"text": "Layer 1, head 5: attention pattern"}},
              "data": [{"x": ["a", "b", "c"], "y": ["a", "b", "c"],
                        "meta": {"layer": 1, "head": 5}}]}
    click = {"points": [{"pointNumber": [2, 1], "x": "b", "y": "c"}]}
    href = qk_page.cell_href(click, figure, STATE, {"layer": None, "head": None})
    assert href.startswith("/qk?") and "layer=1&head=5&query=2&key=1" in href
    href = qk_page.cell_href(click, figure, STATE, {"layer": 0, "head": 3})
    assert "layer=0&head=3&query=2&key=1" in href
    with pytest.raises(dash.exceptions.PreventUpdate):  # the masked upper triangle
        qk_page.cell_href({"points": [{"pointNumber": [0, 2]}]}, figure, STATE, {})
    # the head comes from the drawn heatmap's meta, never from its title's wording
    untitled = {"data": [dict(figure["data"][0])], "layout": {}}
    assert "layer=1&head=5" in qk_page.cell_href(click, untitled, STATE, {})
    del untitled["data"][0]["meta"]
    with pytest.raises(dash.exceptions.PreventUpdate):
        qk_page.cell_href(click, untitled, STATE, {})


def test_graphs_beyond_the_edge_budget_are_refused_and_the_default_moves(client,
                                                                         monkeypatch):
    from attention_lens import registry as R
    from attention_lens.analysis.graph import budget as G

    cfg = R.current().get("attn-only-2l").cfg
    monkeypatch.setattr(G, "MAX_EDGES", G.estimated_edges(cfg, 20))  # reach: position 19
    code, data = post(client, "/api/graph", {"text": PROMPT})
    assert code == 400 and "choose a position up to 19" in data["error"], data
    assert post(client, "/api/graph", {"text": PROMPT, "position": 19})[0] == 200
    # the page's default position stays within the reach and says so
    spec = P.spec_of("graph")
    text = " ".join(t for _, t in spec.render(STATE, compute=False).alerts)
    assert "reach position 19" in text, text
    assert int(text.split("Position ")[1].split()[0]) <= 19
    alerts = spec.render(STATE, compute=False, pos="25").alerts
    assert any("choose a position up to 19" in t for _, t in alerts)
