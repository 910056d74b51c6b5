"""Nonsense in, a clear 4xx out: never a 500, never a traceback, and the server keeps serving."""

from __future__ import annotations

import json

import pytest

from attention_lens.server import ServerConfig, create_server

MB = 1 << 20
OK_TEXT = "Mr and Mrs Dursley were proud."


@pytest.fixture(scope="module")
def app():
    app = create_server(ServerConfig(max_body=MB))
    assert app.server.test_client().get("/").status_code == 200
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.server.test_client()


def raw(body: str | bytes) -> dict:
    return {"data": body if isinstance(body, bytes) else body.encode("utf-8"),
            "content_type": "application/json"}


def js(body) -> dict:
    return {"json": body}


# (name, method, path, request kwargs, expected status, a word the message must contain)
API_CASES = [
    ("empty body", "POST", "/api/predict", raw(""), 400, "empty"),
    ("whitespace body", "POST", "/api/predict", raw("  \n "), 400, "empty"),
    ("empty text", "POST", "/api/predict", js({"text": ""}), 400, "empty"),
    ("whitespace text", "POST", "/api/predict", js({"text": " \n\t "}), 400, "empty"),
    ("1 MB of text", "POST", "/api/predict", js({"text": "a" * MB}), 413, "too large"),
    ("NUL byte", "POST", "/api/predict", js({"text": "abc\x00def"}), 400, "NUL"),
    ("invalid UTF-8", "POST", "/api/predict", raw(b'{"text": "\xff\xfe abc"}'), 400, "UTF-8"),
    ("lone surrogate", "POST", "/api/predict", raw('{"text": "a\\ud800b"}'), 400, "Unicode"),
    ("malformed JSON", "POST", "/api/predict", raw('{"text": "abc"'), 400, "malformed"),
    ("form body", "POST", "/api/predict", {"data": "text=hello"}, 415, "Content-Type"),
    ("NaN literal", "POST", "/api/predict", raw('{"text": "a", "top_k": NaN}'), 400, "NaN"),
    ("deep nesting", "POST", "/api/predict", raw("[" * 100_000), 400, "JSON"),
    ("array body", "POST", "/api/predict", js(["text"]), 400, "object"),
    ("string body", "POST", "/api/predict", js("hello"), 400, "object"),
    ("text is a number", "POST", "/api/predict", js({"text": 42}), 400, "string"),
    ("text is a list", "POST", "/api/attention", js({"text": ["a", "b"]}), 400, "string"),
    ("missing text", "POST", "/api/predict", js({"top_k": 3}), 400, "missing"),
    ("unknown field", "POST", "/api/predict", js({"text": "a", "topk": 3}), 400, "topk"),
    ("top_k 0", "POST", "/api/predict", js({"text": "a", "top_k": 0}), 400, "top_k"),
    ("top_k negative", "POST", "/api/predict", js({"text": "a", "top_k": -3}), 400, "top_k"),
    ("top_k huge", "POST", "/api/predict", js({"text": "a", "top_k": 10**12}), 400, "top_k"),
    ("top_k string", "POST", "/api/predict", js({"text": "a", "top_k": "5"}), 400, "integer"),
    ("top_k float", "POST", "/api/predict", js({"text": "a", "top_k": 2.5}), 400, "integer"),
    ("top_k bool", "POST", "/api/predict", js({"text": "a", "top_k": True}), 400, "integer"),
    ("grid top_k huge", "POST", "/api/token-predictions", js({"text": "a", "top_k": 4000}),
     400, "top_k"),
    ("position outside", "POST", "/api/predict", js({"text": "a b", "position": 99}), 400,
     "position"),
    ("layer out of range", "POST", "/api/attention", js({"text": "a", "layer": 2, "head": 0}),
     400, "layer"),
    ("layer negative", "POST", "/api/attention", js({"text": "a", "layer": -1}), 400, "layer"),
    ("head out of range", "POST", "/api/attention", js({"text": "a", "layer": 0, "head": 12}),
     400, "head"),
    ("layer not integer", "POST", "/api/attention", js({"text": "a", "layer": "1"}), 400,
     "integer"),
    ("head not integer", "POST", "/api/attention", js({"text": "a", "layer": 0, "head": 1.5}),
     400, "integer"),
    ("head without layer", "POST", "/api/eigenvalues", js({"text": "a", "head": 1}), 400,
     "layer"),
    ("query layer not integer", "GET", "/api/weights?layer=abc", {}, 400, "integer"),
    ("query head out of range", "GET", "/api/weights?layer=0&head=40", {}, 400, "head"),
    ("query unknown circuit", "GET", "/api/weights?circuit=XY", {}, 400, "circuit"),
    ("query repeated", "GET", "/api/weights?layer=0&layer=1", {}, 400, "more than once"),
    ("query unknown parameter", "GET", "/api/embeddings?colour=red", {}, 400, "colour"),
    ("query NUL", "GET", "/api/embeddings?matrix=W_E%00", {}, 400, "NUL"),
    ("embeddings filter", "GET", "/api/embeddings?filter=rare", {}, 400, "filter"),
    ("embeddings clusters 0", "GET", "/api/embeddings?n_clusters=0", {}, 400, "n_clusters"),
    ("analogy unknown word", "POST", "/api/analogy",
     js({"positive": ["🙂🙂🙂🙂"], "negative": ["man"]}), 400, "tokens"),
    ("analogy empty word", "POST", "/api/analogy", js({"positive": ["king", " "]}), 400,
     "empty"),
    ("analogy missing positive", "POST", "/api/analogy", js({"negative": ["man"]}), 400,
     "positive"),
    ("analogy positive not words", "POST", "/api/analogy", js({"positive": [1, 2]}), 400,
     "strings"),
    ("analogy empty positive", "POST", "/api/analogy", js({"positive": []}), 400, "positive"),
    ("analogy too many terms", "POST", "/api/analogy", js({"positive": ["a"] * 100}), 400,
     "at most"),
    ("unknown model", "POST", "/api/predict", js({"text": "a", "model": "gpt-9"}), 400,
     "attn-only-2l"),
    ("model not a string", "POST", "/api/predict", js({"text": "a", "model": 7}), 400,
     "attn-only-2l"),
    ("unknown model in query", "GET", "/api/weights?model=nope", {}, 400, "attn-only-1l"),
    ("target not one token", "POST", "/api/attribution", js({"text": "a", "target": " Dursley"}),
     400, "single token"),
    ("target id outside vocab", "POST", "/api/logit-lens", js({"text": "a", "target": 10**7}),
     400, "vocabulary"),
    ("target wrong type", "POST", "/api/logit-lens", js({"text": "a", "target": [1]}), 400,
     "target"),
    ("granularity unknown", "POST", "/api/logit-lens", js({"text": "a", "granularity": "x"}),
     400, "granularity"),
    ("ablation no heads", "POST", "/api/ablation", js({"text": "a", "heads": []}), 400, "heads"),
    ("ablation bad pair", "POST", "/api/ablation", js({"text": "a", "heads": [[0]]}), 400,
     "pair"),
    ("ablation head out of range", "POST", "/api/ablation",
     js({"text": "a", "heads": [[0, 99]]}), 400, "head"),
    ("ablation method", "POST", "/api/ablation",
     js({"text": "a", "heads": [[0, 1]], "method": "half"}), 400, "method"),
    ("activations vectors not bool", "POST", "/api/activations",
     js({"text": "a", "vectors": "yes"}), 400, "true or false"),
    ("metric unknown", "POST", "/api/induction-score", js({"text": "a", "metric": "max"}), 400,
     "metric"),
    ("unknown endpoint", "GET", "/api/nothing-here", {}, 404, "no API endpoint"),
    ("wrong method", "GET", "/api/predict", {}, 405, "use POST"),
    ("wrong method on GET endpoint", "POST", "/api/models", js({}), 405, "method"),
]

# Unusual but valid prompts: 200 with a result.
ODD_BUT_VALID = ["🙂🎉 emoji only 🙂", "שלום עולם مرحبا بالعالم", "\u202eright-to-left override",
                 "漢字とかなカナ", "<img src=x onerror=alert(1)>", "a", "\r\n\t\x07\x1b[31m",
                 "x" * 50_000]


def assert_alive(client) -> None:
    r = client.post("/api/predict", json={"text": OK_TEXT, "top_k": 2})
    assert r.status_code == 200 and len(r.get_json()["predictions"]) == 2


@pytest.mark.parametrize("name,method,path,kwargs,status,word", API_CASES,
                         ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_a_clear_4xx(client, name, method, path, kwargs, status, word):
    r = client.open(path, method=method, **kwargs)
    assert r.status_code == status, (r.status_code, r.data[:300])
    data = r.get_json()
    assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"]
    assert word.lower() in data["error"].lower(), data["error"]
    assert "Traceback" not in data["error"] and 'File "' not in data["error"]
    assert_alive(client)


def test_there_are_at_least_thirty_distinct_cases():
    assert len({c[0] for c in API_CASES}) >= 30


@pytest.mark.parametrize("text", ODD_BUT_VALID, ids=range(len(ODD_BUT_VALID)))
def test_odd_but_valid_prompts_are_answered(client, text):
    r = client.post("/api/token-predictions", json={"text": text, "top_k": 2})
    assert r.status_code == 200, r.data[:300]
    data = r.get_json()
    assert data["n_tokens"] >= 1 and len(data["tokens"]) == data["n_tokens"]
    assert (data["truncated"] is not None) == (len(text) > 1000)
    if text.startswith("<img"):  # JSON carries it as text; nothing is interpreted
        assert "".join(data["tokens"]) == text


# ----------------------------------------------------------------------- page callbacks
def callback_body(app, match_output: str, values: dict[str, object],
                  changed: list[str]) -> dict:
    """A /_dash-update-component body for the callback whose output key contains
    ``match_output``, with inputs/state set from ``values`` ("id.prop" -> value)."""
    key = next(k for k in app.callback_map if match_output in k)
    spec = app.callback_map[key]

    def fill(items):
        return [{"id": i["id"], "property": i["property"],
                 "value": values.get(f"{i['id']}.{i['property']}")} for i in items]

    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]}
               for o in key.strip(".").split("...")]
    return {"output": key, "outputs": outputs if key.startswith("..") else outputs[0],
            "inputs": fill(spec["inputs"]), "state": fill(spec.get("state", [])),
            "changedPropIds": changed}


def shell_body(app, text=None, search="", model=None):
    """The shell callback that reads the prompt box and the URL."""
    from attention_lens.components import shell

    values = {f"{shell.TEXT}.value": text, f"{shell.LOCATION}.search": search,
              f"{shell.ANALYSE}.n_clicks": 1, f"{shell.MODEL}.value": model}
    changed = [f"{shell.ANALYSE}.n_clicks"] if text is not None else \
        [f"{shell.LOCATION}.search"]
    return callback_body(app, f"{shell.STATE}.data", values, changed)


CALLBACK_GUARD_CASES = [
    ("malformed JSON", raw('{"output": ')),
    ("not an object", js([1, 2, 3])),
    ("unknown output", js({"output": "nope.children", "outputs": {}, "inputs": []})),
    ("inputs not a list", js({"output": None, "outputs": {}, "inputs": "x"})),
    ("invalid UTF-8", raw(b'{"output": "\xff"}')),
    ("oversized", js({"output": "x" * (MB + 10)})),
]


@pytest.mark.parametrize("name,kwargs", CALLBACK_GUARD_CASES,
                         ids=[c[0] for c in CALLBACK_GUARD_CASES])
def test_malformed_callback_requests_are_4xx(client, name, kwargs):
    r = client.post("/_dash-update-component", **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.data[:200])
    assert r.get_json()["error"]
    assert_alive(client)


def test_callback_with_wrong_shapes_is_4xx(app, client):
    body = shell_body(app, text=OK_TEXT)
    for key, value in (("inputs", {"a": 1}), ("state", [1, 2]), ("changedPropIds", [3])):
        r = client.post("/_dash-update-component", json={**body, key: value})
        assert r.status_code == 400, (key, r.data[:200])
    bad_surrogate = json.dumps(shell_body(app, text="x")).replace('"x"', '"\\ud800"')
    r = client.post("/_dash-update-component", **raw(bad_surrogate))
    assert r.status_code < 500


BAD_PROMPTS = [("", "empty"), ("   \n", "whitespace"), ("a\x00b", "NUL"),
               ("x" * 200_000, "too long"), ("a\ud800b", "lone surrogate")]


@pytest.mark.parametrize("text,name", BAD_PROMPTS, ids=[b[1] for b in BAD_PROMPTS])
def test_page_bad_prompt_gives_an_alert_or_4xx(app, client, text, name):
    body = json.dumps(shell_body(app, text="PLACEHOLDER"))
    body = body.replace('"PLACEHOLDER"', json.dumps(text))
    r = client.post("/_dash-update-component", **raw(body))
    assert r.status_code < 500, r.data[:300]
    if r.status_code == 200:
        from attention_lens.components import shell

        resp = r.get_json()["response"]
        alerts = resp.get(shell.ALERTS, {}).get("children")
        assert alerts, f"no alert for a {name} prompt: {str(resp)[:300]}"
    assert_alive(client)


@pytest.mark.parametrize("search", ["?model=gpt-9", "?text=%00", "?text=&model=", "?pos=abc",
                                    "?layer=-5&head=x", "?text=" + "%F0" * 10])
def test_page_bad_url_parameters_do_not_break_the_server(app, client, search):
    r = client.post("/_dash-update-component", json=shell_body(app, search=search))
    assert r.status_code < 500, r.data[:300]
    assert_alive(client)


@pytest.mark.parametrize("text", ODD_BUT_VALID[:5])
def test_page_odd_but_valid_prompts(app, client, text):
    r = client.post("/_dash-update-component", json=shell_body(app, text=text))
    assert r.status_code == 200, r.data[:300]
