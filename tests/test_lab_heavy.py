"""Heavy API requests take one of a few lanes per worker: when the lanes and their short
queue are full, a heavy request is answered busy at once (503, Retry-After) while cheap
requests are answered as usual. The measurement with real gunicorn workers and a
GPT-2-shaped model is ``python -m attention_lens.bench.load --burst 20`` (README)."""

from __future__ import annotations

import threading
import time

import pytest

from attention_lens.server import ServerConfig, create_server
from attention_lens.server.guards import HeavyBusy, HeavyLanes

#: About 70 tokens: a prompt analysis this long is heavy (HEAVY_MIN_BODY).
PROMPT = " ".join(["Mr and Mrs Dursley, of number four, Privet Drive, were proud."] * 5)
SHORT = "Mr and Mrs Dursley were proud. Mr and Mrs Dursley"


def test_lanes_run_wait_then_refuse():
    lanes = HeavyLanes(lanes=1, queue=1, wait_s=5)
    got: list[float] = []
    with lanes:
        def waiter() -> None:
            t0 = time.monotonic()
            with lanes:
                got.append(time.monotonic() - t0)
        t = threading.Thread(target=waiter)
        t.start()
        deadline = time.monotonic() + 5
        while lanes.waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lanes.waiting == 1
        with pytest.raises(HeavyBusy, match="busy"):  # the queue is full: refused at once
            with lanes:
                pass
        time.sleep(0.3)
    t.join(5)
    assert len(got) == 1 and got[0] >= 0.25  # it waited for the lane, then ran
    short = HeavyLanes(lanes=1, queue=1, wait_s=0.2)
    with short:
        t0 = time.monotonic()
        with pytest.raises(HeavyBusy):  # waited its time, then refused
            with short:
                pass
        assert 0.15 <= time.monotonic() - t0 < 2
    assert short.waiting == 0
    with short:  # free again
        assert short.waiting == 0


def test_heavy_api_request_is_refused_busy_while_cheap_ones_are_answered(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("ATTENTION_LENS_HEAVY_LANES", "1")
    monkeypatch.setenv("ATTENTION_LENS_HEAVY_QUEUE", "0")
    app = create_server(ServerConfig(cache_dir=tmp_path / "cache", cache_size=8))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    lanes = app.server.blueprints["attention_lens_api"].heavy_lanes
    assert (lanes.lanes, lanes.queue) == (1, 0)
    assert client.post("/api/logit-lens", json={"text": PROMPT}).status_code == 200
    with lanes:  # a heavy request computing in this worker
        for path, body in (("/api/logit-lens", {"text": PROMPT}),
                           ("/api/attribution", {"text": PROMPT}),
                           ("/api/ablation", {"text": PROMPT, "heads": [[0, 0]]})):
            r = client.post(path, json=body)
            assert r.status_code == 503, (path, r.data[:200])
            assert r.headers["Retry-After"] == "5" and "busy" in r.get_json()["error"]
        for path, body in (("/api/predict", {"text": PROMPT}),
                           ("/api/token-predictions", {"text": PROMPT}),
                           ("/api/attention", {"text": PROMPT, "layer": 0, "head": 0})):
            r = client.post(path, json=body)
            assert r.status_code == 200, (path, r.data[:200])
        assert client.get("/api/models").status_code == 200
        # a short prompt's analysis costs a few forward passes: not held back
        assert client.post("/api/logit-lens", json={"text": SHORT}).status_code == 200
        # a patching grid is heavy whatever its size
        r = client.post("/api/patching", json={"clean": SHORT, "corrupted": SHORT,
                                               "correct": " Mr", "wrong": " Mrs"})
        assert r.status_code == 503, r.data[:200]
        assert client.post("/api/no-such-thing", json={}).status_code == 404
    assert client.post("/api/attribution", json={"text": PROMPT}).status_code == 200
