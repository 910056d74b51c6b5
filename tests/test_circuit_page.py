"""/circuit and POST /api/circuit: the default example finds the induction circuit as a
background job; the exports hold the circuit; bad input is an alert or a 400."""

from __future__ import annotations

import json
from urllib.parse import unquote

import dash
import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import restored_background

from attention_lens.analysis import patching as PT
from attention_lens.analysis.circuit import Problem, edge_scores
from attention_lens.components import page as P
from attention_lens.server import ServerConfig, create_server

STATE = {"model": "attn-only-2l", "text": "Harry Potter went to the shop.", "pos": None}
PAIR = dict(clean=PT.DEFAULT_CLEAN, corrupted=PT.DEFAULT_CORRUPTED, correct=PT.DEFAULT_CORRECT,
            wrong=PT.DEFAULT_WRONG)


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


@pytest.fixture(scope="module")
def drawn(server):
    """The default /circuit page: its main callback asks for a job; the job draws it."""
    spec = P.spec_of("circuit")
    first = spec.render(STATE, compute=False)
    assert isinstance(first.request, dict) and "circuit discovery" in first.request["labels"][0]
    return spec.render(STATE)


def _links(tree) -> dict[str, str]:
    """href -> download file name ("" for a plain link) of every link in ``tree``."""
    out = {}

    def walk(node):
        if isinstance(node, (list, tuple)):
            for n in node:
                walk(n)
            return
        href = getattr(node, "href", None)
        if isinstance(href, str):
            out[href] = getattr(node, "download", None) or ""
        children = getattr(node, "children", None)
        if children is not None and not isinstance(children, str):
            walk(children)

    walk(tree)
    return out


def test_default_page_finds_the_induction_circuit(drawn):
    """Untold, the default pair's circuit is L0H2 (through its value) feeding the keys of the
    layer-1 induction heads, which write to the logits; few edges reach 80 %, random ones
    need almost all."""
    assert drawn.drew and not drawn.errors, drawn.alerts
    circuit = drawn.figures["circuit"]
    assert isinstance(circuit, go.Figure)
    note = " ".join(drawn.notes)
    assert "reach 80 % of the metric" in note, note
    hrefs = _links(drawn.extras["heads"])
    by_name = {name: h for h, name in hrefs.items() if name}
    assert set(by_name) == {"attn-only-2l-circuit.json", "attn-only-2l-circuit-edges.csv",
                            "attn-only-2l-circuit-curves.csv"}
    exported = json.loads(unquote(by_name["attn-only-2l-circuit.json"].split(",", 1)[1]))
    edges = {(e["sender"], e["receiver"], e["input"]) for e in exported["edges"]}
    assert ("input", "L0H2", "v") in edges
    for e in exported["edges"]:  # per position, adding up to the edge's score
        assert len(e["by_position"]) == 43
        assert sum(e["by_position"]) == pytest.approx(e["score"], rel=1e-9, abs=1e-12)
    assert {("L0H2", "L1H5", "k"), ("L0H2", "L1H6", "k")} <= edges
    assert {("L1H5", "logits", "resid"), ("L1H6", "logits", "resid")} <= edges
    assert exported["settings"]["method"] == "eap" and exported["settings"]["k"] == 20
    curve = exported["curve"]
    reach, rand = curve["edges_to_80"]["resample"], curve["random_edges_to_80"]["resample"]
    assert reach is not None and reach <= 20 and (rand is None or rand > 5 * reach)
    # the heads link to /attention, /qk and /patching through the prefix-aware helper
    assert any(h.startswith("/attention?") and "layer=0&head=2" in h for h in hrefs)
    assert any(h.startswith("/qk?") and "layer=1&head=5" in h for h in hrefs)
    assert any(h.startswith("/patching?") and "sender=L1H6" in h for h in hrefs)
    rows = unquote(by_name["attn-only-2l-circuit-edges.csv"].split(",", 1)[1]).splitlines()
    assert rows[0] == "sender,receiver,input,score,in_circuit" and len(rows) == 1 + 529


def test_circuit_is_drawn_position_by_position(drawn, server):
    """The drawing is on the (position, layer) grid: each drawn edge at a position carries
    EAP's score of that edge at that position; the induction circuit sits where the earlier
    copy is: the input's token t into L0H2's value at t, L0H2's output at t + 1 into the
    induction heads' keys at t + 1, those heads into the logits at the last position."""
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")
    res = edge_scores(lm, [PT.PromptPair(**PAIR)], method="eap")
    labels = res.graph.edge_labels()
    fig = drawn.figures["circuit"]
    cells = {}
    for t in fig.data:
        if t.mode == "markers" and t.customdata is not None and isinstance(
                t.customdata[0], str):
            for label in t.customdata:
                edge, _, pos = label.partition(" @ ")
                cells[(edge, int(pos))] = res.by_position[labels.index(edge), int(pos)]
    assert cells, "no edge drawn per position"
    ids = PT.pair_tokens(lm, PAIR["clean"], PAIR["corrupted"])[0]
    last = len(ids) - 1
    t = {(e, p) for e, p in cells if e == "input -> L0H2.v"}
    assert len(t) == 1
    (_, tp), = t
    assert {("L0H2 -> L1H5.k", tp + 1), ("L0H2 -> L1H6.k", tp + 1),
            ("L1H5 -> logits", last), ("L1H6 -> logits", last)} <= set(cells)
    # the earlier copy: the clean prompt's last token appears at t
    assert ids[tp] == ids[last]
    strongest = max(abs(v) for v in cells.values())
    assert min(abs(v) for v in cells.values()) >= 0.02 * strongest
    # heads in the drawing carry (layer, head, position) for a click
    heads = [t for t in fig.data if t.name and t.name.startswith("heads")]
    assert heads and [0, 2, tp + 1] in [list(c) for c in heads[0].customdata]


def test_acdc_from_the_page(server):
    """The page's ACDC choice gives the circuit the analysis gives (one-layer model)."""
    from attention_lens.analysis.circuit import acdc

    spec = P.spec_of("circuit")
    out = spec.render({**STATE, "model": "attn-only-1l"}, search="acdc", threshold="0.01")
    assert out.drew and not out.errors, out.alerts
    note = " ".join(out.notes)
    assert "ACDC, threshold 0.01:" in note, note
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-1l")
    prob = Problem(lm, [PT.PromptPair(**PAIR)], "logit_diff", -1, "resample")
    kept, _ = acdc(prob, 0.01)
    hrefs = _links(out.extras["heads"])
    by_name = {name: h for h, name in hrefs.items() if name}
    data = json.loads(unquote(by_name["attn-only-1l-circuit.json"].split(",", 1)[1]))
    assert data["settings"]["search"] == "acdc" and data["settings"]["threshold"] == 0.01
    assert data["n_edges_kept"] == int(kept.sum()) and 0 < kept.sum() < len(kept)


def test_click_on_a_head_opens_it(server):
    from attention_lens.pages.circuit import open_head

    click = {"points": [{"customdata": [0, 2, 20]}]}
    href = open_head(click, dict(STATE), PAIR["clean"], "")
    assert href.startswith("/attention?") and "layer=0" in href and "head=2" in href
    assert open_head({"points": [{"customdata": "L0H2 -> L1H5.k @ 20"}]}, dict(STATE),
                     PAIR["clean"], "") is dash.no_update


def test_page_numbers_are_the_analysis(drawn, server):
    """The page's strongest-edge bars are EAP's scores on the same pair."""
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")
    pair = PT.PromptPair(**PAIR)
    ours = edge_scores(lm, [pair], method="eap").scores
    bars = drawn.figures["edges"].data[0]
    top = np.sort(np.abs(ours))[::-1][:len(bars.x)]
    np.testing.assert_allclose(np.sort(np.abs(np.asarray(bars.x)))[::-1], top, rtol=1e-6)
    faith = drawn.figures["faithfulness"]
    assert len([t for t in faith.data if t.name and t.name.endswith("circuit")]) == 3
    # the page's own circuit, a star per ablation at its number of edges
    star = next(t for t in faith.data if t.name == "this circuit (top 20)")
    assert list(star.customdata) == ["resample", "mean", "zero"]
    note = " ".join(drawn.notes)
    for a, y in zip(star.customdata, star.y):
        assert f"{a} {y:.2f}" in note
    assert len(set(star.x)) == 1 and f"{star.x[0]} edges of 529 kept" in note


def test_bad_input_is_an_alert(server):
    spec = P.spec_of("circuit")
    out = spec.render(STATE, corrupted=" Anna gave Peter a book.", compute=False)
    assert any("same token length" in e for e in out.errors), out.alerts
    out = spec.render(STATE, correct=" holiday", compute=False)
    assert any("not a single token" in e for e in out.errors), out.alerts
    query, problems = spec.query({"k": "100000", "ablation": "half"}, spec.config(None))
    assert query["k"] == 529 and query["ablation"] == "resample"
    assert any("above the largest" in p for p in problems)
    assert any("ablation must be one of" in p for p in problems)
    for bad in ("-1", "half", "inf", "nan"):
        out = spec.render(STATE, search="acdc", threshold=bad, compute=False)
        assert any("ACDC threshold must be a number >= 0" in e for e in out.errors), out.alerts


def post(client, body):
    r = client.post("/api/circuit", json=body)
    assert r.is_json, r.data[:200]
    return r.status_code, r.get_json()


def test_api_circuit(client, server):
    status, data = post(client, {**PAIR, "k": 12, "n_sizes": 5, "n_random": 2,
                                 "method": "eap_ig", "steps": 3})
    assert status == 200, data
    circ = data["circuit"]
    assert circ["settings"]["method"] == "eap_ig" and circ["settings"]["steps"] == 3
    assert len(data["scores"]) == len(data["edges"]) == 529 == circ["n_edges_total"]
    assert sum(data["in_circuit"]) == circ["n_edges_kept"] == len(circ["edges"])
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-2l")
    prob = Problem(lm, [PT.PromptPair(**PAIR)], "logit_diff", -1, "resample")
    want = edge_scores(lm, [], method="eap_ig", steps=3, problem=prob).scores
    np.testing.assert_allclose(data["scores"], want, rtol=1e-6, atol=1e-9)
    assert len(circ["curve"]["k"]) == 5 and len(circ["curve"]["random"][0][0]) == 2
    # a set of pairs, averaged
    pairs = [PAIR, {**PAIR, "corrupted": PT.DEFAULT_CORRUPTED.replace(" and", " the", 1)}]
    status, data = post(client, {"pairs": pairs, "curve": False, "k": 5})
    assert status == 200, data
    assert data["circuit"]["settings"]["n_pairs"] == 2 and "curve" not in data["circuit"]


@pytest.mark.parametrize("body, message", [
    ({**PAIR, "corrupted": " Anna gave Peter"}, "same token length"),
    ({**PAIR, "ablation": "half"}, "'ablation' must be one of"),
    ({**PAIR, "k": 530}, "(attn-only-2l has 529 edges)"),
    ({**PAIR, "k": -1}, "'k'"),
    ({**PAIR, "method": "acdc"}, "'method' must be one of"),
    ({**PAIR, "steps": 0}, "'steps'"),
    ({**PAIR, "direction": "noising"}, "direction"),
    ({**PAIR, "pairs": [PAIR]}, "either 'pairs' or one pair"),
    ({"pairs": [PAIR, {**PAIR, "corrupted": " x"}]}, "pair 2"),
    ({**PAIR, "wrong": PT.DEFAULT_CORRECT}, "same token"),
    ({**PAIR, "search": "acdc", "threshold": -1}, "'threshold' must be a number >= 0"),
    ({**PAIR, "search": "beam"}, "'search' must be one of"),
])
def test_api_circuit_bad_input(client, body, message):
    status, data = post(client, body)
    assert status == 400, data
    assert message in data["error"], data["error"]


def test_api_acdc(client, server):
    """ACDC-style removal through the API (the one-layer model: 49 edges, one run each)
    gives the circuit the analysis gives."""
    from attention_lens.analysis.circuit import acdc

    status, data = post(client, {**PAIR, "model": "attn-only-1l", "search": "acdc",
                                 "threshold": 0.01, "curve": False})
    assert status == 200, data
    circ = data["circuit"]
    assert circ["settings"]["search"] == "acdc" and circ["settings"]["threshold"] == 0.01
    lm = server.server.extensions["attention_lens"]["registry"].get("attn-only-1l")
    prob = Problem(lm, [PT.PromptPair(**PAIR)], "logit_diff", -1, "resample")
    kept, _ = acdc(prob, 0.01)
    assert data["in_circuit"] == kept.tolist() and 0 < kept.sum() < len(kept)
