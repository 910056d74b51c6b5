"""Everything a client sends is checked: forged callbacks, unknown assets, huge integers,
content types, bodies over the limit (chunked too), and security headers on every response."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest

from attention_lens.server import ServerConfig, create_server, write_user

PASSWORD = "correct horse battery"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    users = tmp_path_factory.mktemp("req") / "users.txt"
    write_user(users, "alice", PASSWORD)
    env = {"ATTENTION_LENS_AUTH_RATE": "1000/minute"}  # deliberate failures below
    return create_server(ServerConfig.from_env(env, auth_file=users, cache_size=4,
                                               max_body=65536))


@pytest.fixture(scope="module")
def client(app):
    c = app.server.test_client()
    assert c.get("/", headers=AUTH).status_code == 200
    return c


def shell_callback(app) -> dict:
    output = next(k for k in app.callback_map if k.startswith("..shell-state.data"))
    spec = app.callback_map[output]
    return {"output": output,
            "outputs": [dict(zip(("id", "property"), o.split(".")))
                        for o in output[2:-2].split("...")],
            "inputs": [{**i, "value": None} for i in spec["inputs"]],
            "state": [{**s, "value": None} for s in spec["state"]],
            "changedPropIds": ["shell-analyse.n_clicks"]}


def forged(app) -> dict[str, object]:
    """Forged /_dash-update-component bodies, by name (JSON text or an object)."""
    base = shell_callback(app)

    def edit(fn):
        body = json.loads(json.dumps(base))
        fn(body)
        return body

    deep = "[" * 5000 + "]" * 5000
    return {
        "prompt state an int": edit(lambda b: b["state"][0].update(value=5)),
        "shared state a string": edit(lambda b: b["state"][1].update(value="x")),
        "shared state a list": edit(lambda b: b["state"][1].update(value=[1, 2])),
        "inputs missing": edit(lambda b: b.update(inputs=b["inputs"][:1])),
        "inputs extra": edit(lambda b: b["inputs"].append(b["inputs"][0])),
        "input of another component": edit(lambda b: b["inputs"][0].update(id="nope")),
        "input property wrong": edit(lambda b: b["inputs"][0].update(property="nope")),
        "input id an object": edit(lambda b: b["inputs"][0].update(id={"type": "x"})),
        "outputs fewer": edit(lambda b: b.update(outputs=b["outputs"][:1])),
        "outputs an object": edit(lambda b: b.update(outputs={"id": "x", "property": "y"})),
        "outputs missing": edit(lambda b: b.pop("outputs")),
        "unknown output": edit(lambda b: b.update(output="nope.children")),
        "output not a string": edit(lambda b: b.update(output=[1])),
        "inputs not a list": edit(lambda b: b.update(inputs={"a": 1})),
        "state entries not objects": edit(lambda b: b.update(state=[1, 2])),
        "changedPropIds numbers": edit(lambda b: b.update(changedPropIds=[1])),
        "body a list": [],
        "body a string": "x",
        "deeply nested": json.dumps(base)[:-1] + ', "x": ' + deep + "}",
        "nested 100 levels": json.dumps(base)[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}",
        "5000-digit integer": json.dumps(base)[:-1] + ', "x": 1' + "0" * 5000 + "}",
        "not JSON": "{not json",
        "not UTF-8": b"\xff\xfe{}",
    }


def test_forged_callbacks_are_400_with_one_log_line(app, client, caplog):
    for name, body in forged(app).items():
        caplog.clear()
        caplog.set_level(logging.INFO, logger="attention_lens")
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        r = client.post("/_dash-update-component", data=data, headers=AUTH,
                        content_type="application/json")
        assert r.status_code == 400, (name, r.status_code, r.data[:200])
        assert "error" in r.get_json(), name
        records = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(records) == 1, (name, [rec.getMessage() for rec in records])
        assert records[0].exc_info is None and len(records[0].getMessage()) < 500, name


def test_unknown_component_suite_paths_are_404(client, caplog):
    caplog.set_level(logging.WARNING, logger="attention_lens")
    for path in ("/_dash-component-suites/nope/x.js", "/_dash-component-suites/dash/nope.js",
                 "/_dash-component-suites/dash/deps/react@99.0.0.min.js",
                 "/_dash-component-suites/dash/dash-renderer/build/nope.min.js"):
        caplog.clear()
        r = client.get(path, headers=AUTH)
        assert r.status_code == 404, (path, r.status_code)
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is None


@pytest.mark.parametrize("path,body", [
    ("/api/predict", '{"text": "hi", "top_k": 1' + "0" * 5000 + "}"),
    ("/api/ablation", '{"text": "hi", "heads": [[1' + "0" * 5000 + ", 0]]}"),
])
def test_huge_integers_are_400(client, path, body):
    r = client.post(path, data=body, headers=AUTH, content_type="application/json")
    assert r.status_code == 400 and "error" in r.get_json()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_api_bodies_must_be_json(client, content_type):
    """Another site can make a browser POST these types without asking: they are refused."""
    r = client.post("/api/predict", data='{"text": "hello"}', headers=AUTH,
                    content_type=content_type)
    assert r.status_code == 415 and "application/json" in r.get_json()["error"]
    r = client.post("/api/predict", data='{"text": "hello"}', headers=AUTH,
                    content_type="application/json; charset=utf-8")
    assert r.status_code == 200


def test_bodies_over_the_limit_are_413_also_when_chunked(client):
    big = json.dumps({"text": "x" * 80_000})
    r = client.post("/api/predict", data=big, headers=AUTH, content_type="application/json")
    assert r.status_code == 413
    r = client.post("/api/predict", input_stream=io.BytesIO(big.encode()), content_type=
                    "application/json", headers={**AUTH, "Transfer-Encoding": "chunked"})
    assert r.status_code == 413, r.data[:200]
    small = json.dumps({"text": "hello there", "top_k": 2}).encode()
    r = client.post("/api/predict", input_stream=io.BytesIO(small), content_type=
                    "application/json", headers={**AUTH, "Transfer-Encoding": "chunked"})
    assert r.status_code == 200, r.data[:200]


def test_security_headers_on_every_response(client, app):
    html = client.get("/", headers=AUTH).get_data(as_text=True)
    import re

    asset = re.findall(r'href="(/assets/[^"?]+)', html)[0]
    suite = re.findall(r'src="(/_dash-component-suites/[^"]+)"', html)[0]
    responses = [client.get("/", headers=AUTH), client.get("/attention", headers=AUTH),
                 client.get(asset, headers=AUTH), client.get(suite, headers=AUTH),
                 client.get("/api/models", headers=AUTH), client.get("/api/nope", headers=AUTH),
                 client.get("/", headers={"Authorization": "Basic eDp5"}),  # 401
                 client.post("/api/predict", data="x", headers=AUTH),  # 415
                 client.get("/_dash-component-suites/nope/x.js", headers=AUTH)]  # 404
    for r in responses:
        assert r.headers.get("X-Frame-Options") == "DENY", r.status
        assert "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", "")
        assert r.headers.get("X-Content-Type-Options") == "nosniff", r.status
