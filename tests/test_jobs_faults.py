"""Background jobs on one machine, started as ``python app.py`` starts them (default torch
threads, a real browser), and what the page shows when a job ends badly: ``kill -9`` of
the job process, Cancel, a deadline, the server killed, unclaimed reservations, two
deployments on one machine, and the cache folder's permissions.

Every server is a real ``python app.py`` on a free loopback port with a private cache folder;
times are printed (``-s``) for the README's fault table.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from attention_lens import background
from attention_lens import weight_analyses as W
from attention_lens.model.checkpoint import load_model

from .test_background import slow_models  # noqa: F401 - a fixture
from .test_background import (free_port, job_body, job_output_key, page_load, stop,
                              wait_until)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120
#: Every job's deadline on the deadline test's server: shorter than the slow model's circuit
#: eigenvalues on any machine (loading it and computing them took 1.5-2 s on two quiet cores,
#: 5 s on busy ones), so the deadline comes first.
DEADLINE_S = 0.5
TEXT = "Harry Potter went to the shop, and Harry Potter bought a wand."
#: Pages that start a background job on a fresh cache, and a figure each draws when done.
JOB_PAGES = {"weights": "spectra", "eigenvalues": "copying", "embeddings": "map",
             "heads": "finder", "induction": "scores", "logit-lens": "logit-lens",
             "qk": "terms", "tokens": "tokens", "ablation": "positions",
             "patching": "exact", "graph": "graph", "compare": "loss"}


def app_env(models: Path, cache: Path | None, **extra: str) -> dict[str, str]:
    """The environment of ``python app.py``: no thread settings at all (torch's default)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ATTENTION_LENS_") and k not in ("OMP_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), ATTENTION_LENS_MODELS_DIRS=str(models), **extra)
    if cache is not None:
        env["ATTENTION_LENS_CACHE_DIR"] = str(cache)
    return env


class App:
    """``python app.py --port P`` (as the README starts it), stopped after its test."""

    def __init__(self, env: dict[str, str], log: Path, *args: str, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: requests.get(self.url + "/api/models", timeout=5).ok,
                   timeout=TIMEOUT, what="python app.py")
        wait_until(lambda: self.forkserver() is not None, what="the job host")

    def forkserver(self) -> psutil.Process | None:
        """The job host (the forkserver the server started)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return next((k for k in kids if "forkserver" in " ".join(k.cmdline())), None)

    def jobs(self) -> list[int]:
        """Pids of the job processes running now."""
        fs = self.forkserver()
        if fs is None:
            return []
        out = []
        for k in fs.children():
            try:
                if k.status() != psutil.STATUS_ZOMBIE:
                    out.append(k.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------- the browser test
def graph_drawn(driver, page: str, name: str) -> bool:
    return bool(driver.execute_script(
        "const h = document.getElementById(JSON.stringify({name: arguments[1], page: "
        "arguments[0], type: 'al-graph'})); const gd = h && h.querySelector('.js-plotly-plot');"
        " return gd && gd._fullData && gd._fullData.length > 0;", page, name))


def shown(driver, element_id: str) -> bool:
    return bool(driver.execute_script(
        "const e = document.getElementById(arguments[0]);"
        " return !!e && getComputedStyle(e).display !== 'none';", element_id))


def text_of(driver, css: str) -> str:
    return " | ".join(e.text for e in driver.find_elements("css selector", css))


@pytest.mark.browser
def test_jobs_on_a_fresh_server_with_default_threads_and_every_fault_reaches_the_page(
        tmp_path, slow_models, dash_br):  # noqa: F811 - the fixture imported above
    """``python app.py`` with torch's default threads: /predictions runs the model in the web
    process, then every page that starts a job draws its figures. Then, on a slow model:
    ``kill -9`` of the job and Cancel each reach the page within 5 s with Run again, free
    the slot, and store nothing."""
    from selenium.webdriver.common.by import By

    cache = tmp_path / "cache"
    app = App(app_env(slow_models, cache), tmp_path / "app.log")
    bg = background.create(cache)
    d = dash_br.driver
    try:
        dash_br.server_url = app.url
        q = "model=attn-only-2l&text=" + requests.utils.quote(TEXT)
        d.get(f"{app.url}/predictions?{q}")
        wait_until(lambda: graph_drawn(d, "predictions", "surprisal"), what="/predictions")
        times = {}
        for page, graph in JOB_PAGES.items():
            t0 = time.time()
            d.get(f"{app.url}/{page}?{q}")
            wait_until(lambda: text_of(d, ".alert-danger") or (
                graph_drawn(d, page, graph) and not shown(d, f"{page}-job-strip")),
                timeout=300, what=f"the figures of /{page}")
            assert text_of(d, ".alert-danger") == "", (page, text_of(d, ".alert-danger"))
            assert not shown(d, f"{page}-job-after"), page
            times[page] = round(time.time() - t0, 1)
        print("pages drawn (s, default threads):", times)
        assert app.jobs() == [], "a job process outlived its job"
        assert bg.slots.active() == []

        lm = load_model(slow_models / "slow")
        store, req = W.Store(bg.results, bg.kv), W.circuit_eigenvalues()
        slow = f"{app.url}/eigenvalues?model=slow&text=Harry%20Potter"

        def start() -> int:
            wait_until(lambda: shown(d, "eigenvalues-job-strip"), what="the progress strip")
            return wait_until(lambda: app.jobs() and app.jobs()[0], what="the job process")

        def stopped_note() -> str:
            return wait_until(lambda: shown(d, "eigenvalues-job-after")
                              and not shown(d, "eigenvalues-job-strip")
                              and text_of(d, ".alert-danger"), timeout=30,
                              what="the stopped message")

        # kill -9 of the job process (what the out-of-memory killer does)
        d.get(slow)
        pid = start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        note = stopped_note()
        t_page = time.time() - t0
        assert "stopped unexpectedly" in note and "SIGKILL" in note, note
        assert "circuit eigenvalues" in note, note
        assert d.find_element(By.ID, "eigenvalues-job-rerun").is_displayed()
        wait_until(lambda: bg.slots.active() == [], timeout=5, what="the killed job's slot")
        t_slot = time.time() - t0
        assert t_page < 5, t_page
        # Run again starts it again at once
        t0 = time.time()
        d.find_element(By.ID, "eigenvalues-job-rerun").click()
        pid2 = start()
        t_rerun = time.time() - t0
        assert pid2 != pid
        print(f"kill -9: page said so after {t_page:.2f} s, slot free after {t_slot:.2f} s; "
              f"Run again had a job running after {t_rerun:.2f} s")

        # Cancel: the process is gone within 1 s, the page says cancelled, nothing stored
        pid3 = pid2
        time.sleep(1.0)
        d.find_element(By.ID, "eigenvalues-job-cancel").click()
        t0 = time.time()
        wait_until(lambda: not alive(pid3), timeout=5, every=0.02, what="the cancelled job")
        t_gone = time.time() - t0
        wait_until(lambda: "Cancelled" in d.find_element(By.ID, "eigenvalues-job-note").text,
                   timeout=5, what="the Cancelled note")
        t_note = time.time() - t0
        wait_until(lambda: bg.slots.active() == [], timeout=5, what="the cancelled job's slot")
        print(f"Cancel: process gone after {t_gone:.2f} s, the page said so after "
              f"{t_note:.2f} s")
        assert t_gone < 1.0, t_gone
        wait_until(lambda: not shown(d, "eigenvalues-job-strip"), timeout=2, every=0.05,
                   what="the bar to go after Cancel")
        time.sleep(1.0)
        assert not shown(d, "eigenvalues-job-strip")
        assert store.stats(lm, req)["computed"] == 0
        assert app.jobs() == []
    finally:
        app.close()


# ---------------------------------------------------------------- server-side faults
def start_job(app: App, slots: background.Slots) -> tuple[requests.Session, dict, dict]:
    """Start /eigenvalues' job on the slow model as the page does; the session, the request
    parameters that poll it, and the body."""
    s = requests.Session()
    end = page_load(s, app.url)
    body = {**job_body(slots.reserve("circuit eigenvalues")),
            "output": job_output_key(app.url, s)}
    r = s.post(app.url + "/_dash-update-component", params={"endId": end}, json=body,
               timeout=TIMEOUT)
    assert r.ok, r.text
    return s, {"endId": end, **r.json()}, body


def poll(app: App, s: requests.Session, handles: dict, body: dict) -> str:
    """One poll of a running job, as the page sends it; the answer's text."""
    r = s.post(app.url + "/_dash-update-component", json=body, timeout=TIMEOUT,
               params={k: handles[k] for k in ("endId", "cacheKey", "job")})
    assert r.status_code in (200, 204), (r.status_code, r.text)
    return r.text


@pytest.mark.server
def test_a_job_past_its_deadline_is_stopped_and_reported_and_jobs_die_with_their_server(
        tmp_path, slow_models):  # noqa: F811
    """A job past its deadline is killed and its page's next poll says so (with Run again),
    its slot free; then ``kill -9`` of ``python app.py`` mid-job: the job host and the job
    go within seconds (no orphan keeps computing)."""
    cache = tmp_path / "cache"
    app = App(app_env(slow_models, cache, ATTENTION_LENS_JOB_DEADLINE=str(DEADLINE_S)),
              tmp_path / "app.log")
    bg = background.create(cache)
    try:
        s, handles, body = start_job(app, bg.slots)
        pid = int(handles["job"].split("~")[0])
        t0 = time.time()
        answer = wait_until(lambda: "deadline" in (a := poll(app, s, handles, body)) and a,
                            timeout=DEADLINE_S + 60, every=0.4, what="the deadline")
        t_page = time.time() - t0
        assert not alive(pid)
        assert f"ran past its deadline of {DEADLINE_S} s" in answer, answer
        assert "stopped unexpectedly" in answer and "Stopped." in answer
        assert "The job computing circuit eigenvalues" in answer, answer
        assert '"display": "flex"' in answer.replace('":"', '": "')  # the Run again row
        assert bg.slots.active() == []
        print(f"deadline {DEADLINE_S} s: the poll said so {t_page:.1f} s after the start")

        s, handles, body = start_job(app, bg.slots)
        pid = int(handles["job"].split("~")[0])
        fs = app.forkserver()
        assert fs is not None and alive(pid)
        os.kill(app.proc.pid, signal.SIGKILL)
        t0 = time.time()
        wait_until(lambda: not alive(pid) and not alive(fs.pid), timeout=10, every=0.05,
                   what="the job and its host to die with the server")
        print(f"server killed: job host and job gone after {time.time() - t0:.2f} s")
        wait_until(lambda: bg.slots.active() == [], timeout=background.STALE_S + 5,
                   what="the dead job's slot")
        # the server comes back: the page's next poll says what happened, with Run again
        app.close()
        t0 = time.time()
        app = App(app.env, tmp_path / "app2.log", port=app.port)
        t_up = time.time() - t0
        answer = poll(app, s, handles, body)
        assert "the server restarted" in answer and "Stopped." in answer, answer
        print(f"server restarted: back in {t_up:.1f} s; the first poll said so")
    finally:
        app.close()


def main_callback_body(url: str, session: requests.Session, model: str = "slow") -> dict:
    """A plain POST of /eigenvalues' main callback (what a page load sends)."""
    deps = session.get(url + "/_dash-dependencies", timeout=TIMEOUT).json()
    dep = next(x for x in deps if "eigenvalues-job-request.data" in x["output"]
               and not x.get("background"))
    state = {"model": model, "text": "Harry Potter and Harry Potter", "pos": None}
    inputs = [{"id": i["id"], "property": i["property"],
               "value": state if i["id"] == "shell-state" else None} for i in dep["inputs"]]
    states = [{"id": i["id"], "property": i["property"], "value": None}
              for i in dep.get("state", [])]
    outputs = []
    for part in dep["output"].strip(".").split("..."):
        cid, prop = part.rsplit(".", 1)
        outputs.append({"id": json.loads(cid) if cid.startswith("{") else cid,
                        "property": prop})
    return {"output": dep["output"], "outputs": outputs, "inputs": inputs, "state": states,
            "changedPropIds": ["shell-state.data"]}


def request_of(response: requests.Response) -> dict | None:
    """The job request a main callback's answer writes (None if it was refused)."""
    data = response.json()["response"]
    return data.get("eigenvalues-job-request", {}).get("data")


@pytest.mark.server
def test_unclaimed_reservations_are_released_within_seconds(tmp_path, slow_models):  # noqa: F811
    """10 plain POSTs of /eigenvalues' main callback (no browser to start the jobs): the
    slots they reserve are free again within seconds, and a real job then runs."""
    cache = tmp_path / "cache"
    app = App(app_env(slow_models, cache), tmp_path / "app.log")
    bg = background.create(cache)
    try:
        s = requests.Session()
        end = page_load(s, app.url)
        body = main_callback_body(app.url, s)
        got, last = [], 0.0
        for _ in range(10):
            got.append(request_of(s.post(app.url + "/_dash-update-component",
                                         params={"endId": end}, json=body, timeout=TIMEOUT)))
            if isinstance(got[-1], dict):
                last = time.time()
        assert 2 <= sum(isinstance(g, dict) for g in got), got  # the bound: 2 at a time
        assert None in got, got
        assert 1 <= len(bg.slots.active()) <= 2
        wait_until(lambda: bg.slots.active() == [], timeout=background.RESERVED_LOCAL_S + 5,
                   what="the unclaimed reservations to go")
        print(f"10 plain POSTs: {sum(isinstance(g, dict) for g in got)} reserved, "
              f"{got.count(None)} told busy; slots free {time.time() - last:.1f} s after the "
              "last reservation")
        assert isinstance(request_of(s.post(app.url + "/_dash-update-component",
                                            params={"endId": end}, json=body,
                                            timeout=TIMEOUT)), dict)
    finally:
        app.close()


@pytest.mark.server
def test_two_deployments_on_one_machine_keep_their_own_slots_in_a_private_folder(
        tmp_path, slow_models):  # noqa: F811
    """Two ``python app.py`` on the default cache folder (different ports, one job slot
    each): a job reserved on one leaves the other free. The folder is made 0700 (an older
    0755 one too) and its files 0600."""
    home = tmp_path / "xdg"
    folder = home / "attention-lens"
    folder.mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)
    env = app_env(slow_models, None, XDG_CACHE_HOME=str(home), ATTENTION_LENS_MAX_JOBS="1")
    a = App(env, tmp_path / "a.log")
    b = None
    try:
        b = App(env, tmp_path / "b.log")
        slots = {}
        for app in (a, b):  # each server's slots, keyed as the server keys them
            bg = background.create(folder)
            bg.slots.scope = f"127.0.0.1:{app.port}/"
            slots[app] = bg.slots
        # a job runs on the first server, in its only slot
        s, handles, body = start_job(a, slots[a])
        try:
            wait_until(lambda: [x["state"] for x in slots[a].active()] == ["running"],
                       what="the job on the first server")
        except AssertionError:
            raise AssertionError((slots[a].active(), handles, poll(a, s, handles, body)[:2000],
                                  a.jobs()))
        # the second server still has its own slot free
        sb = requests.Session()
        end_b = page_load(sb, b.url)
        rb = request_of(sb.post(b.url + "/_dash-update-component", params={"endId": end_b},
                                json=main_callback_body(b.url, sb), timeout=TIMEOUT))
        assert isinstance(rb, dict), "the second server shares the first one's slot"
        assert [x["state"] for x in slots[a].active()] == ["running"]
        held = slots[b].active()
        assert not held or held[0]["token"] == rb["token"]
        for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in files), [
            (str(p), oct(p.stat().st_mode)) for p in files]
    finally:
        a.close()
        if b is not None:
            b.close()


def test_a_cache_folder_of_another_user_is_refused(tmp_path):
    """The check at start: a folder owned by someone else is refused with a clear error."""
    if os.getuid() != 0:
        pytest.skip("needs root to make a folder of another user")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    from attention_lens.server.config import ConfigError

    with pytest.raises(ConfigError, match="another user"):
        background.create(folder)


def test_the_default_folder_is_private(tmp_path, monkeypatch):
    """Created 0700 with its parents' files 0600; the signing secret's file is not readable
    by others."""
    monkeypatch.delenv("ATTENTION_LENS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bg = background.create(deployment="127.0.0.1:1/")
    assert bg.shared_secret()
    root = tmp_path / "xdg" / "attention-lens"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    secret_db = root / "coord" / "cache.db"
    assert stat.S_IMODE(secret_db.stat().st_mode) & 0o077 == 0
    assert bg.slots.scope == "127.0.0.1:1/"


def _sleeping_job(result_key, progress_key, args, context):  # the job process
    time.sleep(120)


def test_a_job_watch_stopped_with_its_server_stops_the_job_quietly(bg):
    """A threaded server's shutdown raises SystemExit in the threads it started (Dash's
    test runner does); a job's watch thread ends at once without an unhandled exception,
    the job process stops, its slot is given back and its page is told why."""
    import ctypes
    import threading

    import diskcache

    from attention_lens.jobhost import STOPPED, JobManager

    manager = JobManager(diskcache.Cache(str(bg.cache_dir / "jobs")), slots=lambda: bg.slots)
    manager.func_registry["sleeper"] = _sleeping_job
    token = bg.slots.reserve("circuit eigenvalues")
    assert token and bg.slots.active()
    pid = manager.call_job_fn("result-key", _sleeping_job,
                              {"request": {"token": token, "labels": ["circuit eigenvalues"]}},
                              {})
    watch = next(t for t in threading.enumerate() if t.name == f"job-watch-{pid}")
    assert alive(pid) and watch.is_alive()
    unhandled: list = []
    old_hook = threading.excepthook
    threading.excepthook = unhandled.append
    try:
        assert ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(watch.ident), ctypes.py_object(SystemExit)) == 1
        watch.join(5)
        assert not watch.is_alive(), "the watch did not stop"
    finally:
        threading.excepthook = old_hook
    assert unhandled == []
    wait_until(lambda: not alive(pid), timeout=5, what="the job to stop")
    assert bg.slots.active() == []
    record = manager.handle.get("result-key")
    msg = record["background_callback_error"]["msg"]
    assert msg.startswith(STOPPED) and "server stopped" in msg and "circuit eigenvalues" in msg
