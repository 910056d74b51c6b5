"""An uploaded dataset lives in the deployment's store: uploaded to one server process, it is
used by its name from another (two ``python app.py`` sharing a cache folder, or a Redis)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import restored_background

from attention_lens.analysis.datasets import documents_sha256

ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"Document {i}: Mr and Mrs Dursley of number {i}, Privet Drive, were proud to say "
        "that they were perfectly normal, thank you very much. " * 3 for i in range(12)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 "ATTENTION_LENS_TORCH_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, port


def wait_ready(proc: subprocess.Popen, port: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(params=["cache folder", "redis"])
def two_servers(request, tmp_path):
    """Two server processes of one deployment: a shared cache folder, or a shared Redis."""
    procs = []
    if request.param == "redis":
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            pytest.skip("redis-server is not installed")
        rport = free_port()
        procs.append(subprocess.Popen([redis_server, "--port", str(rport), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, start_new_session=True))
        broker = f"redis://127.0.0.1:{rport}/0"
        args = ["--celery-broker", broker]
        # a lab computes the API's dataset metrics on its job workers
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "attention-lens"), "worker", "--concurrency", "1"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                           "ATTENTION_LENS_TORCH_THREADS": "1",
                           "ATTENTION_LENS_CELERY_BROKER": broker},
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
    else:
        broker, args = None, ["--cache-dir", str(tmp_path / "cache")]
    servers = [start(args, {}) for _ in range(2)]
    procs += [p for p, _ in servers]
    try:
        for proc, port in servers:
            wait_ready(proc, port)
        if broker:  # the worker has announced itself
            from attention_lens import background

            kv, end = background.RedisKV(broker), time.time() + 120
            while not kv.keys("worker:*") and time.time() < end:
                time.sleep(0.5)
            assert kv.keys("worker:*"), "the job worker did not start"
        yield [port for _, port in servers], broker
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.mark.server
def test_an_upload_is_used_by_its_name_from_another_process(two_servers, monkeypatch):
    (a, b), broker = two_servers
    text = "\n".join(json.dumps({"text": d}) for d in DOCS)
    window = {"windows": 4, "length": 16, "metric": "induction", "n_examples": 1}
    status, up = post(a, "/api/head-metrics", {"text": text, **window})
    assert status == 200, up
    name, sha = up["dataset"]["name"], up["dataset"]["sha256"]
    status, there = post(b, "/api/head-metrics", {"dataset": name, **window})
    assert status == 200, there  # the other process reads it from the shared store
    assert sha == documents_sha256(DOCS) and name == f"upload:{sha}"
    assert there["dataset"]["sha256"] == sha
    assert there["metrics"] == up["metrics"]
    # a name this deployment never gave is refused with the reason, not a 500
    status, err = post(b, "/api/head-metrics", {"dataset": "upload:" + "0" * 64, **window})
    assert status == 400 and "upload it again" in err["error"], err
    status, err = post(b, "/api/head-metrics", {"dataset": "upload:../../etc", **window})
    assert status == 400 and "upload" in err["error"], err
    if broker:  # what a Celery worker's job does with the name: the same documents
        from attention_lens import background
        from attention_lens import weight_analyses as W

        worker_side = background.create(celery_broker=broker)
        monkeypatch.setitem(W._STORES, id(worker_side), W.Store(worker_side.results,
                                                                 worker_side.kv))
        with restored_background():
            background.install(worker_side)
            assert W.load_dataset(name).documents == tuple(DOCS)


def test_the_store_keeps_a_bounded_number_of_uploads(tmp_path, monkeypatch):
    from attention_lens import background
    from attention_lens import weight_analyses as W
    from attention_lens.analysis import datasets as D

    bg = background.create(tmp_path / "cache")
    monkeypatch.setitem(W._STORES, id(bg), W.Store(bg.results, bg.kv))  # undone afterwards
    monkeypatch.setattr(W, "MAX_STORED_UPLOADS", 3)
    with restored_background():
        background.install(bg)
        names = [W.keep_upload(D.parse_upload(f"text number {i}".encode(), "n.txt"))
                 for i in range(5)]
        results = background.current().results
        kept = [n for n in names if results.get(W.upload_key(n[len("upload:"):])) is not None]
        assert kept == names[2:]
        assert W.load_dataset(names[-1]).documents == ("text number 4",)
