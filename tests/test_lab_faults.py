"""Faults of a lab deployment, with real processes: Redis on a free loopback port, two
``attention-lens worker`` processes, gunicorn with ``gunicorn_conf``; pool children and
whole workers killed with ``kill -9``, Redis stopped and restarted without saving, web
workers respawned, gunicorn restarted.

Jobs are driven as the browser drives them (Dash's job protocol: start, then polls with the
signed handles), so each test measures what a page would see and when.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from attention_lens import background
from attention_lens import weight_analyses as W
from attention_lens.model.checkpoint import load_model, save_model
from attention_lens.registry import DEFAULT_WEIGHTS

from .conftest import make_tiny
from .test_background import (
    BIN,
    ROOT,
    TIMEOUT,
    env_for,
    free_port,
    job_body,
    job_output_key,
    page_load,
    stop,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ----------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def lab_models(tmp_path_factory, tiny_tokenizer) -> Path:
    """The shipped models and two slow ones (12 layers x 16 heads, d_model 1024: their
    circuit eigenvalues take seconds on one thread), so a job can be killed mid-way."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_WEIGHTS / "attn-only-2l", root / "attn-only-2l")
    for seed, name in ((0, "slow"), (1, "slow-b"), (2, "slow-c"), (3, "slow-d")):
        lm = make_tiny(tiny_tokenizer, seed=seed, n_layers=12, n_heads=16, d_head=64,
                       d_model=1024, n_ctx=64, name=name)
        save_model(lm.model, tiny_tokenizer, root / name)
    return root


class Redis:
    """redis-server on a free loopback port (``--save ""``, as the README runs it), which a
    test may stop and start again on the same port."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed (apt install redis-server)")
        self.exe, self.folder, self.port = exe, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pidfile = folder / "redis.pid"
        self.start()

    def start(self) -> None:
        subprocess.run([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save",
                        "", "--appendonly", "no", "--daemonize", "yes", "--pidfile",
                        str(self.pidfile), "--dir", str(self.folder)], check=True, timeout=30)
        import redis

        wait_until(lambda: redis.Redis.from_url(self.url).ping(), what="redis")
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        pid = int(wait_until(lambda: self.pidfile.read_text().strip(), what="redis pid"))
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not psutil.pid_exists(pid), timeout=20, what="redis to stop")
        self.pidfile.unlink(missing_ok=True)
        self.running = False


class Worker:
    """``attention-lens worker --concurrency 1`` (one pool child)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([str(BIN / "attention-lens"), "worker", "--concurrency",
                                      "1"], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def ready(self) -> None:
        wait_until(lambda: b"ready." in self.log_path.read_bytes(), what="the Celery worker")

    def tree(self) -> set[int]:
        try:
            return {self.proc.pid} | {p.pid for p in
                                      psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def kill_all(self) -> None:
        """``kill -9`` of the worker and its pool children at once (its machine died)."""
        for pid in self.tree():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


class Gunicorn:
    """gunicorn with the recommended settings (``-c python:attention_lens.server.gunicorn_conf``)."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.n = workers
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "python:attention_lens.server.gunicorn_conf", "app:server",
             "-w", str(workers), "-b", f"127.0.0.1:{self.port}", "--no-control-socket"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_up()

    def wait_up(self) -> None:
        wait_until(lambda: requests.get(self.url + "/api/models", timeout=5).ok,
                   what="gunicorn")
        wait_until(lambda: len(self.workers()) == self.n, what="gunicorn workers")

    def workers(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


# ------------------------------------------------------------------------- the job protocol
class PageJob:
    """One page load's eigenvalues job, started and polled as the browser does."""

    def __init__(self, url: str, model: str, bg: background.Background,
                 page: tuple[requests.Session, str] | None = None) -> None:
        self.url, self.bg = url, bg
        self.session, self.end_id = page or (requests.Session(), "")
        self.end_id = self.end_id or page_load(self.session, url)
        self.output = job_output_key(url, self.session)
        token = bg.slots.reserve("circuit eigenvalues")
        assert token, "no free job slot"
        self.body = {**job_body(token, model), "output": self.output}
        r = self.session.post(url + "/_dash-update-component", params={"endId": self.end_id},
                              json=self.body, timeout=TIMEOUT)
        assert r.ok, r.text
        data = r.json()
        self.cache_key, self.handle = data["cacheKey"], data["job"]
        self.job = self.handle.rsplit("~", 1)[0]  # the Celery task id (signed for the page)
        self.started = time.time()

    def poll(self) -> requests.Response:
        """One poll (the browser clears the values, as here)."""
        body = json.loads(json.dumps(self.body))
        for item in body["inputs"] + body["state"]:
            item["value"] = None
        return self.session.post(self.url + "/_dash-update-component",
                                 params={"endId": self.end_id, "cacheKey": self.cache_key,
                                         "job": self.handle}, json=body, timeout=TIMEOUT)

    def outcome(self, timeout: float = 180) -> tuple[str, float, list[int]]:
        """Poll until the job answers: ("result" | "failure: <text>" | "nothing", seconds,
        statuses of failed polls)."""
        bad: list[int] = []
        self.polls = 0
        end = time.time() + timeout
        while time.time() < end:
            try:
                r = self.poll()
            except requests.ConnectionError:
                bad.append(0)
                time.sleep(0.4)
                continue
            self.polls += 1
            if r.status_code == 204:
                return "nothing", time.time() - self.started, bad
            if r.status_code != 200:
                bad.append(r.status_code)
                time.sleep(0.4)
                continue
            data = r.json()
            if "response" in data:
                return describe(data["response"]), time.time() - self.started, bad
            time.sleep(0.4)
        raise AssertionError(f"no answer for job {self.job} in {timeout} s (bad polls {bad}; "
                             f"{broker_state(self.bg)})")


def broker_state(bg: background.Background) -> str:
    """The queue, the unacknowledged tasks and the job keys in Redis (for a failure)."""
    r = bg.kv.r
    return (f"queue {r.llen('celery')}, unacked {r.hlen('unacked')}, "
            f"keys {sorted(k.decode() for k in r.keys('attention-lens:task:*'))[:40]}")


def describe(response: dict) -> str:
    """``result`` when the figures came back, else ``failure: <the page's alert>``."""
    alerts = response.get("eigenvalues-alerts", {}).get("children")
    figures = [v.get("figure") for k, v in response.items() if "al-graph" in k]
    if any(isinstance(f, dict) and f.get("data") for f in figures):
        return "result"
    return f"failure: {json.dumps(alerts)[:400]}"


def task_state(kv: background.RedisKV, job: str, what: str):
    return kv.get(f"task:{job}:{what}")


def start_lab(tmp_path: Path, models: Path, n_workers: int = 2, web_workers: int = 2,
              **extra: str):
    redis = Redis(tmp_path)
    env = env_for(tmp_path / "cache", models, ATTENTION_LENS_CELERY_BROKER=redis.url, **extra)
    workers = [Worker(env, tmp_path / f"worker{i}.log") for i in range(n_workers)]
    for w in workers:
        w.ready()
    server = Gunicorn(env, tmp_path / "gunicorn.log", workers=web_workers)
    return redis, env, workers, server


# ---------------------------------------------------------------------------------- tests
@pytest.mark.server
def test_killed_pool_child_and_killed_worker_never_leave_a_page_waiting(tmp_path,
                                                                        lab_models):
    """kill -9 of the pool child running a job: Celery puts the task back and the page gets
    the result. kill -9 of a whole worker (all its processes) with a second worker running:
    the job is sent to the survivor and the page gets the result. With no worker left, the
    page is told within a bounded time."""
    redis, env, workers, server = start_lab(tmp_path, lab_models)
    bg = background.create(celery_broker=redis.url)
    kv = bg.kv
    try:
        # 1. a pool child killed mid-job
        job = PageJob(server.url, "slow", bg)
        started = wait_until(lambda: task_state(kv, job.job, "started"), what="the job start")
        time.sleep(0.5)
        os.kill(started["pid"], signal.SIGKILL)
        killed_at = time.time()
        what, _, bad = job.outcome()
        print(f"pool child {started['pid']} killed: page got {what!r} "
              f"{time.time() - killed_at:.1f} s later; failed polls {bad}")
        assert what == "result", what
        assert kv.count(f"task:{job.job}:attempts") == 2
        lm = load_model(lab_models / "slow")
        stats = W.Store(bg.results, bg.kv).stats(lm, W.circuit_eigenvalues())
        assert stats["computed"] == 1, stats

        # 2. a whole worker killed mid-job while the other one is busy with another job:
        # the job waits for it, keeping its job slot
        busy = PageJob(server.url, "slow-c", bg)
        wait_until(lambda: task_state(kv, busy.job, "started"), what="the other job start")
        job = PageJob(server.url, "slow-b", bg)
        started = wait_until(lambda: task_state(kv, job.job, "started"), what="the job start")
        time.sleep(0.5)
        victim = next(w for w in workers if started["pid"] in w.tree())
        survivor = next(w for w in workers if w is not victim)
        victim.kill_all()
        killed_at = time.time()
        what, _, bad = job.outcome()
        print(f"worker {victim.proc.pid} killed: page got {what!r} "
              f"{time.time() - killed_at:.1f} s later; failed polls {bad}")
        assert what == "result", what
        assert busy.outcome()[0] == "result"
        ran = task_state(kv, job.job, "started") or {}
        assert kv.get(f"task:{job.job}:resent") is not None
        lm = load_model(lab_models / "slow-b")
        by = W.Store(bg.results, bg.kv).stats(lm, W.circuit_eigenvalues())["computed_by"]
        assert by["pid"] in survivor.tree(), (by, ran)
        assert wait_until(lambda: bg.slots.active() == [], timeout=background.STALE_S + 5,
                          what="the slots to be free")

        # 3. the last worker killed mid-job: the page is told, with Run again
        job = PageJob(server.url, "slow-d", bg)
        wait_until(lambda: task_state(kv, job.job, "started"), what="the job start")
        survivor.kill_all()
        killed_at = time.time()
        what, _, bad = job.outcome()
        waited = time.time() - killed_at
        print(f"last worker killed: page got {what!r} {waited:.1f} s later")
        assert what.startswith("failure") and "worker" in what, what
        assert waited < background.NO_WORKER_S + 15
    finally:
        server.close()
        for w in workers:
            w.close()
        redis.stop()


@pytest.mark.server
def test_redis_outage_gives_503_then_everything_resumes_with_the_same_secret(tmp_path,
                                                                             lab_models):
    """Redis stopped for ~10 s mid-job and started again empty (``--save ""``): the API says
    503 + Retry-After (never 500), job polls say 503 and are retried, the job's result is
    picked up after; a web worker respawned after the restart accepts the page loads signed
    before it (one secret, from the deployment's folder)."""
    redis, env, workers, server = start_lab(tmp_path, lab_models, n_workers=1)
    bg = background.create(celery_broker=redis.url)
    secret_file = tmp_path / "cache" / background.SECRET_FILE
    try:
        assert secret_file.stat().st_mode & 0o777 == 0o600
        old_pages = []
        for _ in range(12):  # page loads signed before the restart, by either web worker
            session = requests.Session()
            old_pages.append((session, page_load(session, server.url)))
        job = PageJob(server.url, "slow", bg)
        wait_until(lambda: task_state(bg.kv, job.job, "started"), what="the job start")
        redis.stop()
        down_at = time.time()
        api = requests.post(server.url + "/api/eigenvalues",
                            json={"text": "Harry Potter", "model": "slow-b"}, timeout=TIMEOUT)
        seen = time.time() - down_at
        print(f"Redis down: /api/eigenvalues {api.status_code} after {seen:.1f} s: "
              f"{api.json()}")
        assert api.status_code == 503 and api.headers.get("Retry-After"), api.text
        assert "unreachable" in api.json()["error"]
        start = requests.post(server.url + "/_dash-update-component",
                              params={"endId": job.end_id},
                              json={**job_body("no-slot", "slow-b"), "output": job.output},
                              timeout=TIMEOUT)
        print(f"Redis down: a page's job start {start.status_code}: {start.text[:300]}")
        assert start.status_code == 503 and start.headers.get("Retry-After"), start.text
        statuses = set()
        while time.time() - down_at < 10:
            statuses.add(job.poll().status_code)
            time.sleep(0.5)
        assert statuses == {503}, statuses
        redis.start()
        up_at = time.time()
        what, _, bad = job.outcome()
        print(f"Redis back: the page got {what!r} {time.time() - up_at:.1f} s later")
        assert what == "result", what
        r = requests.post(server.url + "/api/eigenvalues",
                          json={"text": "Harry Potter", "model": "attn-only-2l"},
                          timeout=TIMEOUT)
        assert r.status_code == 200, r.text

        # a web worker respawned after the restart: the same secret in every worker
        old = server.workers()
        os.kill(old[0], signal.SIGKILL)
        wait_until(lambda: len(set(server.workers()) - set(old)) == 1, what="a new worker")
        server.wait_up()
        # each page loaded before the restart starts a job (the new worker and the old one
        # verify its handles alike) and polls it: never refused (a refused handle is a 204)
        jobs = [PageJob(server.url, "slow-b", bg, page=page) for page in old_pages[:2]]
        for i, page in enumerate(old_pages[2:]):
            r = page[0].post(server.url + "/_dash-update-component",
                             params={"endId": page[1], "cacheKey": jobs[i % 2].cache_key,
                                     "job": jobs[i % 2].handle}, json=jobs[0].body,
                             timeout=TIMEOUT)
            assert r.status_code == 204, "another page load's handles were accepted"
        for job in jobs:
            what, _, bad = job.outcome()
            assert what == "result" and not bad, (what, bad)
            assert job.polls >= 1
        print(f"after a respawn: {sum(j.polls for j in jobs)} polls of old page loads, all "
              "accepted")
    finally:
        server.close()
        for w in workers:
            w.close()
        redis.stop()


@pytest.mark.server
def test_gunicorn_restarted_mid_job_and_heavy_api_work_runs_on_the_workers(tmp_path,
                                                                          lab_models):
    """gunicorn stopped and started again while a job runs on a Celery worker: the page's
    polls fail while it is away (the page retries them, assets/job_poll.js) and the
    result is picked up with the page's own handles once it is back. Then heavy API work
    runs on the worker while a cheap request is answered at once, and a request over the
    cost bound is refused with its size."""
    redis, env, workers, server = start_lab(tmp_path, lab_models, n_workers=1,
                                            ATTENTION_LENS_API_MAX_GFLOP="400",
                                            ATTENTION_LENS_INLINE_MAX_GFLOP="10")
    bg = background.create(celery_broker=redis.url)
    try:
        job = PageJob(server.url, "slow", bg)
        wait_until(lambda: task_state(bg.kv, job.job, "started"), what="the job start")
        port = server.port
        server.close()
        down_at = time.time()
        with pytest.raises(requests.ConnectionError):
            job.poll()
        server = Gunicorn(env, tmp_path / "gunicorn2.log", workers=2, port=port)
        back = time.time() - down_at
        what, _, bad = job.outcome()
        print(f"gunicorn back after {back:.1f} s: the page got {what!r} "
              f"{time.time() - down_at - back:.1f} s later")
        assert what == "result", what
        js = requests.get(server.url + "/assets/job_poll.js", timeout=TIMEOUT)
        assert js.ok and "cacheKey=" in js.text

        # heavy API work on the worker; a cheap request meanwhile is not queued behind it
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            heavy = pool.submit(requests.post, server.url + "/api/eigenvalues",
                                json={"text": "Harry Potter", "model": "slow-b"},
                                timeout=TIMEOUT)
            wait_until(lambda: bg.slots.active(), what="the heavy request's job")
            t0 = time.time()
            cheap = requests.post(server.url + "/api/predict",
                                  json={"text": "Harry Potter", "model": "attn-only-2l"},
                                  timeout=TIMEOUT)
            cheap_s = time.time() - t0
            assert not heavy.done(), "the heavy request ended before the cheap one"
            assert heavy.result().status_code == 200, heavy.result().text
        heavy_s = time.time() - t0
        print(f"cheap request {cheap_s:.2f} s while a heavy one ran ({heavy_s:.1f} s)")
        assert cheap.status_code == 200 and cheap_s < 5
        lm = load_model(lab_models / "slow-b")
        by = W.Store(bg.results, bg.kv).stats(lm, W.circuit_eigenvalues())["computed_by"]
        assert by["pid"] in workers[0].tree() and by["pid"] not in server.workers(), by
        pair = {"model": "slow", "clean": "Harry Potter went to the shop",
                "corrupted": "Harry Potter bought a wand", "correct": 42,  # 12 tokens each
                "wrong": 43}
        r = requests.post(server.url + "/api/patching",
                          json={**pair, "granularity": "head_out_by_pos"}, timeout=TIMEOUT)
        print("over the bound:", r.status_code, r.json())
        assert r.status_code == 400 and "GFLOP" in r.json()["error"]
        assert "head_out_by_pos" in r.json()["error"] and "forward passes" in r.json()["error"]
        r = requests.post(server.url + "/api/patching",
                          json={**pair, "granularity": "attn_out"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        lm = load_model(lab_models / "slow")
        n = len(r.json()["result"]["clean_display"])
        from attention_lens.analysis import patching as PT

        given = PT.PairInput.one(lm, pair["clean"], pair["corrupted"], 42, 43)
        req = W.request("declared", analysis="patching", tokens=given.to_json(),
                        params=PT.PATCHING.stored_params({"granularity": "attn_out",
                                                          "attribution": True}))
        by = W.Store(bg.results, bg.kv).stats(lm, req)["computed_by"]
        assert by and by["pid"] in workers[0].tree(), by
        assert len(r.json()["result"]["values"]) == lm.cfg.n_layers
        assert len(r.json()["result"]["values"][0]) == n
    finally:
        server.close()
        for w in workers:
            w.close()
        redis.stop()


@pytest.mark.browser
def test_a_page_in_a_browser_keeps_its_job_through_a_gunicorn_restart(tmp_path, lab_models,
                                                                     dash_br):
    """In a real browser: gunicorn stops while the page's job runs on the Celery worker; the
    page says the server is unreachable and keeps polling, and draws the job's figures once
    gunicorn is back (Dash alone stops polling at the first failed poll)."""
    from selenium.webdriver.common.by import By

    import redis as redis_module

    redis, env, workers, server = start_lab(tmp_path, lab_models, n_workers=1)
    paused = None
    try:
        dash_br.server_url = server.url
        dash_br.driver.get(server.url + "/eigenvalues?model=slow&text=Harry%20Potter")
        wait_until(lambda: "Computing" in dash_br.driver.find_element(
            By.ID, "eigenvalues-job-text").text, what="the progress text")
        # The job must still be running when gunicorn is down: a graceful stop serves the
        # open connections to the end (seconds), long enough for a ~10 s job to finish on a
        # quiet machine and the page to draw it before any poll fails. The pool child
        # running the job is paused (SIGSTOP) until the page has said gunicorn is gone.
        r = redis_module.Redis.from_url(redis.url)
        wait_until(lambda: r.keys("attention-lens:task:*:started"), what="the job's start")
        (paused,) = workers[0].tree() - {workers[0].proc.pid}
        os.kill(paused, signal.SIGSTOP)
        assert not r.keys("attention-lens:task:*:finished"), \
            "the job ended before gunicorn stopped"
        port = server.port
        server.close()
        down_at = time.time()
        notice = wait_until(lambda: dash_br.driver.find_element(By.ID, "al-retry-notice").text,
                            timeout=30, what="the retry notice")
        print(f"notice {time.time() - down_at:.1f} s after gunicorn stopped: {notice!r}")
        assert "unreachable" in notice and "retrying" in notice
        os.kill(paused, signal.SIGCONT)
        paused = None
        assert not r.keys("attention-lens:task:*:finished")
        server = Gunicorn(env, tmp_path / "gunicorn2.log", workers=2, port=port)
        back_at = time.time()
        wait_until(lambda: dash_br.driver.execute_script(
            "const h = document.getElementById(JSON.stringify({name: 'copying', page: "
            "'eigenvalues', type: 'al-graph'})); const gd = h && h.querySelector("
            "'.js-plotly-plot'); return gd && gd._fullData && gd._fullData.length > 0;"),
            timeout=120, what="the job's figures after the restart")
        print(f"figures drawn {time.time() - back_at:.1f} s after gunicorn was back")
        assert not dash_br.driver.find_elements(By.ID, "al-retry-notice")
        assert dash_br.driver.find_element(By.ID, "eigenvalues-job-strip") \
            .value_of_css_property("display") == "none"
    finally:
        if paused is not None:
            os.kill(paused, signal.SIGCONT)
        server.close()
        for w in workers:
            w.close()
        redis.stop()
