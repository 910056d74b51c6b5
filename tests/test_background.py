"""Background work with real servers: two gunicorn workers on the disk cache, the job bound,
forged job handles, and a real Redis with a real Celery worker (``attention-lens worker``).

Every server listens on a free loopback port and is stopped after its test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from attention_lens import background
from attention_lens import weight_analyses as W
from attention_lens.model.checkpoint import load_model, save_model
from attention_lens.registry import DEFAULT_WEIGHTS

from .conftest import make_tiny

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(fn, timeout: float = TIMEOUT, what: str = "", every: float = 0.2):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (and the processes it started)."""
    if proc.poll() is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory, tiny_tokenizer) -> Path:
    """A models folder with the shipped models and one slow enough to watch (12 layers x 16
    heads, d_model 1024: its circuit eigenvalues take over a second on one thread)."""
    root = tmp_path_factory.mktemp("models")
    for name in ("attn-only-1l", "attn-only-2l"):
        shutil.copytree(DEFAULT_WEIGHTS / name, root / name)
    lm = make_tiny(tiny_tokenizer, n_layers=12, n_heads=16, d_head=64, d_model=1024, n_ctx=64,
                   name="slow")
    save_model(lm.model, tiny_tokenizer, root / "slow")
    return root


def env_for(cache_dir: Path, models: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_LENS_")}
    env.update(PYTHONPATH=str(ROOT), ATTENTION_LENS_CACHE_DIR=str(cache_dir),
               ATTENTION_LENS_MODELS_DIRS=str(models), ATTENTION_LENS_TORCH_THREADS="1",
               **extra)
    return env


class Gunicorn:
    """``gunicorn app:server`` with some workers on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "app:server", "-w", str(workers), "--threads", str(threads),
             "-b", f"127.0.0.1:{self.port}", "--timeout", "300", "--no-control-socket"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: requests.get(self.url + "/api/models", timeout=5).ok,
                   what="gunicorn")
        wait_until(lambda: len(self.workers()) == workers, what="gunicorn workers")
        wait_until(self.quiet, what="every gunicorn worker to finish booting", every=0)

    def quiet(self) -> bool:
        """True when no worker used the CPU for half a second (each has built its app)."""
        procs = [psutil.Process(p) for p in self.workers()]
        for p in procs:
            p.cpu_percent(None)
        time.sleep(0.5)
        return all(p.cpu_percent(None) < 5 for p in procs)

    def workers(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children()]

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


def store_for(cache_dir: Path) -> W.Store:
    bg = background.create(cache_dir)
    return W.Store(bg.results, bg.kv)


# ------------------------------------------------------------- one machine, disk cache
def test_two_workers_compute_a_weight_analysis_once_and_a_restart_keeps_it(tmp_path):
    """The same heavy analysis asked through both gunicorn workers at once: one computation;
    both workers serve it; after a restart it is served without computing again."""
    cache = tmp_path / "cache"
    env = env_for(cache, DEFAULT_WEIGHTS)
    lm = load_model(DEFAULT_WEIGHTS / "attn-only-2l")
    req = W.circuit_eigenvalues()
    store = store_for(cache)
    body = {"text": "Harry Potter and Harry Potter", "model": "attn-only-2l"}

    def ask(url: str) -> int:
        r = requests.post(url + "/api/eigenvalues", json=body, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return len(r.json()["circuits"]["copying"]["full_ov"])

    server = Gunicorn(env, tmp_path / "gunicorn.log", workers=2)
    try:
        pids = server.workers()
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(ask, [server.url] * 16)) == {2}
        stats = store.stats(lm, req, pids)
        print(f"two workers, 16 requests: computed {stats['computed']} time(s) by pid "
              f"{stats['computed_by']['pid']}; read from the store by {stats['served']}")
        assert stats["computed"] == 1, stats
        computer = stats["computed_by"]["pid"]
        assert computer in pids
        # the other worker read the one result from the shared store
        assert all(n >= 1 for pid, n in stats["served"].items() if pid != computer), stats
    finally:
        server.close()
    again = Gunicorn(env, tmp_path / "gunicorn2.log", workers=2)
    try:
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(ask, [again.url] * 16)) == {2}
        stats = store.stats(lm, req, again.workers())
        print(f"after a restart: computed {stats['computed']} time(s); read from the store by "
              f"{stats['served']}")
        assert stats["computed"] == 1, stats  # not recomputed after the restart
        assert all(n >= 1 for n in stats["served"].values()), stats
    finally:
        again.close()


def test_the_job_bound_holds_under_forty_distinct_requests(tmp_path):
    """40 distinct embedding maps at once through 2 workers x 8 threads, bound 2: never
    more than 2 computing, the rest told "busy", the CPU idle soon after."""
    cache = tmp_path / "cache"
    env = env_for(cache, DEFAULT_WEIGHTS, ATTENTION_LENS_MAX_JOBS="2")
    server = Gunicorn(env, tmp_path / "gunicorn.log", workers=2, threads=8)
    bg = background.create(cache, max_jobs=2)
    seen, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(len(bg.slots.active()))
            time.sleep(0.02)

    def ask(n: int) -> tuple[int, str]:
        r = requests.get(f"{server.url}/api/embeddings", timeout=TIMEOUT,
                         params={"model": "attn-only-2l", "max_tokens": 3000 + n,
                                 "n_clusters": 8})
        return r.status_code, r.json().get("error", "")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(ask, range(40)))
        ended = time.time()
        codes = [c for c, _ in answers]
        assert set(codes) <= {200, 503}, answers
        assert codes.count(503) > 0 and codes.count(200) > 0, codes
        assert all("busy" in e and "Try again" in e for c, e in answers if c == 503)
        done.set()
        watcher.join(5)
        print(f"job bound 2: {codes.count(200)} answered, {codes.count(503)} told busy, "
              f"at most {max(seen)} slots taken at once")
        assert max(seen) <= 2, max(seen)
        assert bg.slots.active() == []
        # the CPU goes idle within a few seconds of the last answer
        procs = [psutil.Process(p) for p in server.workers()]
        for p in procs:
            p.cpu_percent(None)
        time.sleep(2.0)
        busy = sum(p.cpu_percent(None) for p in procs)
        assert busy < 30, busy
        assert time.time() - ended < 10
    finally:
        done.set()
        server.close()


# ------------------------------------------------------------ the Dash job protocol
def page_load(session: requests.Session, url: str) -> str:
    """The signed end id of a fresh page load (what the browser echoes on every callback)."""
    html = session.get(url + "/eigenvalues?model=slow", timeout=TIMEOUT).text
    config = json.loads(re.search(r'<script id="_dash-config" type="application/json">(.*?)'
                                  r"</script>", html, re.S).group(1))
    return config["end_id"]


def job_body(token: str, model: str = "slow") -> dict:
    state = {"model": model, "text": "Harry Potter and Harry Potter", "pos": None}
    controls = ["eigenvalues-layer", "eigenvalues-head", "eigenvalues-circuit",
                "eigenvalues-order"]
    values = [None, None, "full_ov", "sorted"]
    outputs = [{"id": {"name": g, "page": "eigenvalues", "type": "al-graph"},
                "property": "figure"}
               for g in ("pattern-spectrum", "circuit-eigenvalues", "copying")]
    outputs += [{"id": "eigenvalues-alerts", "property": "children"},
                {"id": "eigenvalues-job-after", "property": "style"},
                {"id": "eigenvalues-job-note", "property": "children"}]
    return {"inputs": [{"id": "eigenvalues-job-request", "property": "data",
                        "value": {"token": token, "labels": ["circuit eigenvalues"],
                                  "model": model}}],
            "state": [{"id": "shell-state", "property": "data", "value": state}]
            + [{"id": c, "property": "value", "value": v} for c, v in zip(controls, values)],
            "outputs": outputs, "changedPropIds": ["eigenvalues-job-request.data"]}


def job_output_key(url: str, session: requests.Session) -> str:
    deps = session.get(url + "/_dash-dependencies", timeout=TIMEOUT).json()
    return next(d["output"] for d in deps
                if any(i["id"] == "eigenvalues-job-request" for i in d["inputs"])
                and "eigenvalues" in d["output"] and d.get("background"))


def test_a_forged_or_foreign_job_handle_cannot_cancel_a_job(tmp_path, slow_models):
    """A job started in one page load is cancelled only with that page load's own handle."""
    cache = tmp_path / "cache"
    server = Gunicorn(env_for(cache, slow_models), tmp_path / "gunicorn.log", workers=1)
    bg = background.create(cache)
    try:
        a, b = requests.Session(), requests.Session()
        end_a, end_b = page_load(a, server.url), page_load(b, server.url)
        output = job_output_key(server.url, a)
        body = {**job_body(bg.slots.reserve("circuit eigenvalues")), "output": output}
        r = a.post(server.url + "/_dash-update-component", params={"endId": end_a}, json=body,
                   timeout=TIMEOUT)
        assert r.ok, r.text
        handle = r.json()["job"]
        pid = int(handle.split("~")[0])
        assert psutil.pid_exists(pid)
        wait_until(lambda: bg.slots.active() and bg.slots.active()[0]["state"] == "running",
                   what="the job to start")
        cancel = "_dash-update-component"
        cancel_body = {"output": "eigenvalues-job-cancel.id", "outputs": {
            "id": "eigenvalues-job-cancel", "property": "id"},
            "inputs": [{"id": "eigenvalues-job-cancel", "property": "n_clicks", "value": 1}],
            "changedPropIds": ["eigenvalues-job-cancel.n_clicks"]}
        forged = f"{pid}~{'0' * 64}"
        for session, end, job in ((b, end_b, handle), (b, end_b, forged), (a, end_a, forged),
                                  (a, end_a, str(pid))):
            session.post(f"{server.url}/{cancel}", params={"endId": end, "cancelJob": job},
                         json=cancel_body, timeout=TIMEOUT)
            time.sleep(0.1)
            assert psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie", job
        # the page load that started it can cancel it
        a.post(f"{server.url}/{cancel}", params={"endId": end_a, "cancelJob": handle},
               json=cancel_body, timeout=TIMEOUT)
        wait_until(lambda: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == "zombie", what="the job to stop")
        wait_until(lambda: bg.slots.active() == [], timeout=background.STALE_S + 5,
                   what="the dead job's slot to expire")
        lm = load_model(slow_models / "slow")
        assert W.Store(bg.results, bg.kv).stats(lm, W.circuit_eigenvalues())["computed"] == 0
    finally:
        server.close()


# ------------------------------------------------------------------ Redis and Celery
@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free loopback port, stopped (by its pid) after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed (apt install redis-server)")
    port, pidfile = free_port(), tmp_path / "redis.pid"
    subprocess.run([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(pidfile),
                    "--dir", str(tmp_path)], check=True, timeout=30)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    wait_until(lambda: redis.Redis.from_url(url).ping(), what="redis")
    yield url
    pid = int(wait_until(lambda: pidfile.read_text().strip(), what="redis pid file"))
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(pid), timeout=20, what="redis to stop")


@pytest.mark.browser
def test_celery_worker_runs_the_page_job_with_progress_cancel_and_shares_the_result(
        tmp_path, slow_models, redis_url, dash_br):
    """Redis + ``attention-lens worker`` + two gunicorn workers: the page's weight analysis
    runs in the worker (its pid is recorded), progress reaches the page, Cancel stops it, Run
    again finishes it, and both web workers serve it from Redis without recomputing."""
    from selenium.webdriver.common.by import By

    cache = tmp_path / "cache"
    env = env_for(cache, slow_models, ATTENTION_LENS_CELERY_BROKER=redis_url)
    log = open(tmp_path / "worker.log", "ab")
    worker = subprocess.Popen([str(BIN / "attention-lens"), "worker", "--concurrency", "1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        wait_until(lambda: b"ready." in (tmp_path / "worker.log").read_bytes(),
                   what="the Celery worker")
        server = Gunicorn(env, tmp_path / "gunicorn.log", workers=2)
        bg = background.create(celery_broker=redis_url)
        store = W.Store(bg.results, bg.kv)
        lm = load_model(slow_models / "slow")
        req = W.circuit_eigenvalues()

        dash_br.server_url = server.url
        dash_br.driver.get(server.url + "/eigenvalues?model=slow&text=Harry%20Potter")
        text = wait_until(lambda: dash_br.driver.find_element(By.ID, "eigenvalues-job-text")
                          .text, what="the progress text")
        assert "Computing circuit eigenvalues" in text
        wait_until(lambda: int(dash_br.driver.find_element(By.CSS_SELECTOR,
                   "#eigenvalues-job-bar .progress-bar").get_attribute("aria-valuenow") or 0)
                   > 0, what="progress above 0 in the page")
        # Cancel: the task in the worker is terminated, nothing is stored
        dash_br.driver.find_element(By.ID, "eigenvalues-job-cancel").click()
        wait_until(lambda: "Cancelled" in dash_br.driver.find_element(
            By.ID, "eigenvalues-job-note").text, what="the Cancelled note")
        wait_until(lambda: bg.slots.active() == [], timeout=background.STALE_S + 10,
                   what="the cancelled job's slot to go")
        assert store.stats(lm, req)["computed"] == 0
        # Run again: this time it finishes in the worker and the page draws it
        dash_br.driver.find_element(By.ID, "eigenvalues-job-rerun").click()
        wait_until(lambda: dash_br.driver.execute_script(
            "const h = document.getElementById(JSON.stringify({name: 'copying', page: "
            "'eigenvalues', type: 'al-graph'})); const gd = h && h.querySelector("
            "'.js-plotly-plot'); return gd && gd._fullData && gd._fullData.length > 0;"),
            timeout=180, what="the drawn copying scores")
        stats = store.stats(lm, req, server.workers())
        print(f"celery: computed {stats['computed']} time(s) by pid "
              f"{stats['computed_by']['pid']} (worker {worker.pid})")
        assert stats["computed"] == 1, stats
        worker_tree = {worker.pid} | {p.pid for p in
                                      psutil.Process(worker.pid).children(recursive=True)}
        assert stats["computed_by"]["pid"] in worker_tree, (stats, worker_tree)
        assert stats["computed_by"]["pid"] not in server.workers()
        # both web workers serve it from Redis, computing nothing
        body = {"text": "Harry Potter", "model": "slow"}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: requests.post(
                server.url + "/api/eigenvalues", json=body, timeout=TIMEOUT).status_code,
                range(16)))
        assert codes == [200] * 16
        stats = store.stats(lm, req, server.workers())
        print(f"celery, 16 API requests after: computed {stats['computed']} time(s); read "
              f"from Redis by {stats['served']}")
        assert stats["computed"] == 1, stats
        assert all(n >= 1 for n in stats["served"].values()), stats
    finally:
        if server is not None:
            server.close()
        stop(worker)
        log.close()
