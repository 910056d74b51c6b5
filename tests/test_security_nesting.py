"""Deeply nested JSON anywhere the server parses it: a 400 naming the problem (API) or a
message on the page (uploads), never a 500 or a silently refused callback."""

from __future__ import annotations

import base64
import json

import pytest
from test_bad_input import assert_alive, callback_body

from attention_lens.server import ServerConfig, create_server

DEEP = "[" * 100_000  # Python's parser gives up (RecursionError) long before this
DEEP_OBJECT = '{"a": ' * 50_000  # a line read as JSON (plain text may start with "[")
DEEPISH = "[" * 40 + "]" * 40  # parses, but no real input nests like this
HUGE_INT = "1" * 5000  # Python refuses to read integers of more than 4300 digits


@pytest.fixture(scope="module")
def app():
    app = create_server(ServerConfig())
    assert app.server.test_client().get("/").status_code == 200
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.server.test_client()


def raw(body: str) -> dict:
    return {"data": body.encode("utf-8"), "content_type": "application/json"}


JSONL_OK = '{"text": "Mr and Mrs Dursley were proud to say."}\n'
API_CASES = [
    ("body nested 100000", "/api/predict", raw(DEEP), "nested"),
    ("body nested 40", "/api/predict", raw('{"text": "a", "top_k": %s}' % DEEPISH), "nested"),
    ("pairs text nested 100000", "/api/patching", {"json": {"pairs": DEEP}}, "nested"),
    ("pairs text nested 40", "/api/patching", {"json": {"pairs": DEEPISH}}, "nested"),
    ("pairs text huge integer", "/api/patching",
     {"json": {"pairs": '[{"clean": %s}]' % HUGE_INT}}, "digits"),
    ("pairs list nested 20", "/api/patching",
     {"json": {"pairs": json.loads("[" * 20 + "]" * 20)}}, "nested"),
    ("jsonl line nested 100000", "/api/head-metrics",
     {"json": {"text": JSONL_OK + DEEP, "windows": 2}}, "nested"),
    ("jsonl first line nested 100000", "/api/head-metrics",
     {"json": {"text": DEEP_OBJECT + "\n" + JSONL_OK, "windows": 2}}, "nested"),
    ("jsonl line nested 40", "/api/head-metrics",
     {"json": {"text": JSONL_OK + DEEPISH, "windows": 2}}, "nested"),
    ("jsonl line huge integer", "/api/head-metrics",
     {"json": {"text": JSONL_OK + '{"text": "a", "n": %s}' % HUGE_INT, "windows": 2}},
     "digits"),
]


@pytest.mark.parametrize("name,path,kwargs,word", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_nested_json_is_a_400_naming_it(client, name, path, kwargs, word):
    r = client.post(path, **kwargs)
    assert r.status_code == 400, (r.status_code, r.data[:300])
    assert word in r.get_json()["error"], r.get_json()
    assert_alive(client)


def data_url(text: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(text.encode()).decode()


def message_of(resp: dict, component: str) -> str:
    return json.dumps(resp["response"][component]["children"])


UPLOADS = [("nested 100000.jsonl", JSONL_OK + DEEP), ("first line nested.txt", DEEP_OBJECT),
           ("nested 40.jsonl", DEEPISH), ("huge integer.jsonl", "[%s]" % HUGE_INT)]


@pytest.mark.parametrize("filename,text", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_heads_upload_of_nested_json_says_so_on_the_page(app, client, filename, text):
    values = {"heads-uploaded.data": {"contents": data_url(text), "filename": filename},
              "heads-dataset.options": [{"label": "validation", "value": "validation"}]}
    body = callback_body(app, "heads-dataset.options", values, ["heads-uploaded.data"])
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, (r.status_code, r.data[:300])
    message = message_of(r.get_json(), "heads-upload-status")
    assert filename in message and ("nested" in message or "digits" in message), message
    assert "heads-dataset" not in r.get_json()["response"]  # the dataset stays as it was


@pytest.mark.parametrize("text", [DEEP, DEEPISH, '{"pairs": %s}' % DEEPISH],
                         ids=["nested 100000", "nested 40", "object nested 40"])
def test_patching_upload_of_nested_json_says_so_on_the_page(app, client, text):
    values = {"patching-upload.contents": data_url(text),
              "patching-upload.filename": "pairs.json"}
    body = callback_body(app, "patching-upload-status.children", values,
                         ["patching-upload.contents"])
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, (r.status_code, r.data[:300])
    message = message_of(r.get_json(), "patching-upload-status")
    assert "pairs.json" in message and "nested" in message, message


def test_a_sound_jsonl_upload_still_works(app, client):
    values = {"heads-uploaded.data": {"contents": data_url(JSONL_OK * 3 + '"plain"\n'),
                                      "filename": "docs.jsonl"},
              "heads-dataset.options": []}
    body = callback_body(app, "heads-dataset.options", values, ["heads-uploaded.data"])
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200
    assert "4 documents" in message_of(r.get_json(), "heads-upload-status")


def test_an_upload_the_store_cannot_keep_says_so_on_the_page(app, client, monkeypatch):
    from redis.exceptions import ConnectionError as RedisDown

    from attention_lens import background
    from attention_lens import weight_analyses as W

    def down(*args, **kwargs):
        raise RedisDown("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(W, "keep_upload", down)
    values = {"heads-uploaded.data": {"contents": data_url(JSONL_OK), "filename": "d.jsonl"},
              "heads-dataset.options": []}
    body = callback_body(app, "heads-dataset.options", values, ["heads-uploaded.data"])
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:300]
    assert "try the upload again" in message_of(r.get_json(), "heads-upload-status")

    monkeypatch.setattr(background.current().results, "set", down)
    pairs = '[{"clean": "a b", "corrupted": "a c", "correct": " d", "wrong": " e"}]'
    values = {"patching-upload.contents": data_url(pairs),
              "patching-upload.filename": "pairs.json"}
    body = callback_body(app, "patching-upload-status.children", values,
                         ["patching-upload.contents"])
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:300]
    assert "try the upload again" in message_of(r.get_json(), "patching-upload-status")
