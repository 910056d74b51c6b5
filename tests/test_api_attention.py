"""/api/attention's selections (heads, query rows) and the server's JSON encoder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flask
import numpy as np
import pytest
import torch
from flask.json.provider import DefaultJSONProvider

from attention_lens.analysis.attention import attention_patterns
from attention_lens.api_json import JSONProvider, _round_sig, dumps_bytes, jsonable
from attention_lens.server import ServerConfig, create_server

PROMPT = "Mr and Mrs Dursley were proud. Mr and Mrs Dursley"


@pytest.fixture(scope="module")
def app():
    app = create_server(ServerConfig(cache_size=4))
    assert app.server.test_client().get("/").status_code == 200
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.server.test_client()


def strict(raw: bytes) -> object:
    """Parse a response body; NaN or Infinity literals fail (JSON has none)."""
    def refuse(name):
        raise AssertionError(f"{name} in the JSON")
    return json.loads(raw, parse_constant=refuse)


def post(client, body: dict) -> tuple[int, dict]:
    r = client.post("/api/attention", json={"text": PROMPT, **body})
    assert r.is_json, r.data[:200]
    return r.status_code, strict(r.data)


@pytest.fixture(scope="module")
def full(client) -> dict:
    status, data = post(client, {})
    assert status == 200
    return data


# ------------------------------------------------------------------------- selections
def test_full_response_is_the_analysis_rounded(app, full):
    """The all-heads answer equals the analysis through the exact list encoder (as before)."""
    reg = app.server.extensions["attention_lens"]["registry"]
    lm = reg.get()
    ref = jsonable(attention_patterns(lm, reg.forward(PROMPT, lm.name)))
    assert full["result"] == ref
    assert list(full) == ["model", "n_tokens", "token_ids", "tokens", "display", "truncated",
                          "layer", "result"]
    assert list(full["result"]) == ["patterns", "display", "entropy", "entropy_per_query",
                                     "max_entropy"]


def test_heads_are_slices_of_the_full_response(client, full):
    status, data = post(client, {"heads": ["L1H5", [0, 2], "L1H0"]})
    assert status == 200
    assert data["heads"] == [[1, 5], [0, 2], [1, 0]] and "layer" not in data
    res, ref = data["result"], full["result"]
    for i, (layer, head) in enumerate(data["heads"]):
        assert res["patterns"][i] == ref["patterns"][layer][head]
        assert res["entropy"][i] == ref["entropy"][layer][head]
        assert res["entropy_per_query"][i] == ref["entropy_per_query"][layer][head]
    assert res["display"] == ref["display"] and res["max_entropy"] == ref["max_entropy"]


def test_query_rows_are_slices_of_the_full_response(client, full):
    n = full["n_tokens"]
    ref = full["result"]
    for queries, rows in (([-1, 0, 3], [n - 1, 0, 3]), ({"start": 2, "stop": 5}, [2, 3, 4]),
                          ({"start": -3}, [n - 3, n - 2, n - 1]), ({"stop": -n + 2}, [0, 1])):
        status, data = post(client, {"queries": queries})
        assert status == 200, data
        assert data["queries"] == rows
        res = data["result"]
        for layer in range(len(ref["patterns"])):
            for head in range(len(ref["patterns"][layer])):
                assert res["patterns"][layer][head] == \
                    [ref["patterns"][layer][head][q] for q in rows]
                assert res["entropy_per_query"][layer][head] == \
                    [ref["entropy_per_query"][layer][head][q] for q in rows]
        assert res["entropy"] == ref["entropy"]  # per head, over every query
        assert res["max_entropy"] == [ref["max_entropy"][q] for q in rows]
        assert len(res["display"]) == n  # keys stay whole


def test_heads_layer_and_one_head_with_query_rows(client, full):
    ref = full["result"]
    _, data = post(client, {"heads": [[1, 5]], "queries": [4, 2]})
    assert data["result"]["patterns"] == [[ref["patterns"][1][5][4], ref["patterns"][1][5][2]]]
    assert data["result"]["entropy_per_query"] == [[ref["entropy_per_query"][1][5][4],
                                                    ref["entropy_per_query"][1][5][2]]]
    _, data = post(client, {"layer": 0, "queries": {"start": 1, "stop": 3}})
    assert data["layer"] == 0 and data["queries"] == [1, 2]
    assert data["result"]["patterns"] == [[row[1], row[2]] for row in ref["patterns"][0]]
    _, whole = post(client, {"layer": 1, "head": 5})
    _, rows = post(client, {"layer": 1, "head": 5, "queries": [-1]})
    assert rows["result"]["pattern"] == [whole["result"]["pattern"][-1]]
    assert rows["result"]["entropy"] == [whole["result"]["entropy"][-1]]
    for key in ("mean_entropy", "top_queries", "top_keys", "top_weights", "display"):
        assert rows["result"][key] == whole["result"][key]
    assert whole["result"]["pattern"][3] == ref["patterns"][1][5][3]


BAD = [
    ({"heads": [[0, 1]], "layer": 0}, "either"),
    ({"heads": []}, "empty"),
    ({"heads": "L1H5"}, "list"),
    ({"heads": ["L9H0"]}, "layer"),
    ({"heads": ["L0H99"]}, "head"),
    ({"heads": ["head five"]}, "L1H0"),
    ({"heads": [[0]]}, "pair"),
    ({"heads": [[0, 1.5]]}, "integer"),
    ({"queries": [99]}, "between"),
    ({"queries": [-99]}, "between"),
    ({"queries": []}, "empty"),
    ({"queries": [1.5]}, "integer"),
    ({"queries": [True]}, "integer"),
    ({"queries": [None]}, "integer"),
    ({"queries": "0:4"}, "window"),
    ({"queries": 3}, "list"),
    ({"queries": list(range(40))}, "entries"),
    ({"queries": {"start": 5, "stop": 5}}, "empty"),
    ({"queries": {"start": 4, "stop": 2}}, "empty"),
    ({"queries": {"begin": 0}}, "start"),
    ({"queries": {"start": 0, "stop": 99}}, "stop"),
    ({"queries": {"start": "0"}}, "integer"),
    ({"rows": [0]}, "unknown"),
]


@pytest.mark.parametrize("body,word", BAD, ids=[json.dumps(b)[:40] for b, _ in BAD])
def test_bad_selections_are_a_400_naming_the_problem(client, body, word):
    status, data = post(client, body)
    assert status == 400, data
    assert set(data) == {"error"} and word.lower() in data["error"].lower(), data["error"]


# ---------------------------------------------------------------------- the encoder
@dataclasses.dataclass
class Inner:
    values: np.ndarray
    scalar: float
    z: complex


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    items: tuple
    table: dict
    tensor: torch.Tensor
    counts: np.ndarray
    where: Path


def representative(big: bool) -> Outer:
    rng = np.random.default_rng(0)
    vals = (rng.standard_normal((3, 4, 5)) * 10.0 ** rng.integers(-30, 30, (3, 4, 5)))
    vals.flat[:8] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-310, 123456789.0, -2.5e-7]
    return Outer(
        name="naïve ✓ \"quoted\" \n", where=Path("/tmp/x"),
        inner=Inner(values=vals.astype(np.float32)[:, ::2], scalar=float("nan"),
                    z=complex(1 / 3, -0.0)),
        items=(np.float32(0.1), np.float64(-0.0), np.int64(7), True, None, float("inf"),
               np.array([1 + 2j, np.nan - 1j]), np.array(2.5), np.arange(3, dtype=np.uint8)),
        table={1: "one", "two": [np.bool_(False), 2 ** 70 if big else 2 ** 62],
               "nested": {"a": [[1.0e-8, 2]]}},
        tensor=torch.tensor([[1 / 3, float("nan")], [-0.0, 1e30]], dtype=torch.float32),
        counts=np.array([[1, -2], [3, 4]], dtype=np.int32),
    )


def same(a: object, b: object) -> bool:
    """Equal JSON values: same types, floats bit-equal (the sign of zero too)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and a == b and \
            math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def flask_before(obj: object) -> bytes:
    """What the server wrote before: Flask's own provider, keys in insertion order."""
    app = flask.Flask("before")
    app.json = DefaultJSONProvider(app)
    app.json.sort_keys = False
    with app.app_context():
        return app.json.response(obj).data


@pytest.mark.parametrize("big", [False, True], ids=["orjson", "beyond-64-bit-int"])
@pytest.mark.parametrize("digits", [7, None])
def test_fast_encoder_gives_the_same_json_as_before(digits, big):
    obj = representative(big)
    before = strict(flask_before(jsonable(obj, digits)))
    for arrays in (False, True):
        encoded = jsonable(obj, digits, arrays=arrays)
        app = flask.Flask("after")
        app.json = JSONProvider(app)
        with app.app_context():
            raw = flask.jsonify(encoded).data
        assert raw.endswith(b"\n")
        assert same(strict(raw), before), arrays
    got = strict(dumps_bytes(jsonable(obj, digits, arrays=True)))
    assert got["inner"]["values"][0][0][:4] == [None, None, None, -0.0]
    assert got["table"]["two"] == [False, 2 ** 70 if big else 2 ** 62]


def test_encoder_writes_raw_numpy():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2] / 7  # not C-contiguous
    got = strict(dumps_bytes({"a": a, "b": a.astype(np.float64), "s": np.float64(np.nan),
                              "i": np.int16(3)}))
    assert got["s"] is None and got["i"] == 3
    assert got["b"] == a.astype(np.float64).tolist()  # float64: exact
    assert np.array_equal(np.array(got["a"], dtype=np.float32), a)  # float32: reads back
    assert strict(dumps_bytes([float("nan"), float("-inf")])) == [None, None]
    assert dumps_bytes("a\ud800b") == b'"a\\ud800b"'  # a lone surrogate: escaped, as before
    assert strict(dumps_bytes({5: 2, None: 3, False: 4})) == {"5": 2, "null": 3, "false": 4}


def test_rounding_is_the_significant_digit_definition():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(5000) * 10.0 ** rng.integers(-300, 300, 5000)
    x[:6] = [0.0, -0.0, np.nan, np.inf, 0.5, 1e-310]
    with np.errstate(over="ignore"):  # float32 input too: out of its range is infinity
        x32 = x.astype(np.float32)
    for digits in (7, 3):
        got = _round_sig(x32 if digits == 3 else x, digits)
        src = x32.astype(np.float64) if digits == 3 else x
        for v, r in zip(src, got):
            if not math.isfinite(v) or v == 0:
                assert same(float(r), float(v)) or (math.isnan(v) and math.isnan(r))
                continue
            e = digits - 1 - math.floor(math.log10(abs(v)))
            if e > 308:  # 10**e overflows: the value is kept
                assert r == v
                continue
            p = float(np.power(10.0, np.int64(abs(e))))  # numpy's power, as always used
            ref = round(v * p) / p if e >= 0 else round(v / p) * p
            assert r == ref, (v, r, ref)
