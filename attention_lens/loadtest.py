"""Load, fault and soak test of the lab server under gunicorn.

Everything runs on 127.0.0.1 and is bounded in request count and time:

1. gunicorn with 1 worker, then with 2: ``--clients`` concurrent clients send ``--requests``
   requests mixing page callbacks (``/_dash-update-component``, payloads built from the app's
   own callback map) and JSON API calls; errors, p50/p95 latency and throughput are reported.
2. Corrupt model: a truncated copy of a model sits in the models folder; it must be listed as
   unavailable with its reason while the other models keep answering.
3. Fault: one worker is killed with SIGKILL in the middle of a load run; requests lost must be
   at most those in flight on that worker, and the server must recover (a new worker serves).
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
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from .registry import DEFAULT_WEIGHTS, PACKAGE_ROOT

HOST = "127.0.0.1"
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
    """``gunicorn app:server`` on 127.0.0.1 with ``workers`` sync workers."""

    def __init__(self, workers: int, env: dict[str, str], log: Path) -> None:
        self.workers, self.port = workers, free_port()
        cmd = [sys.executable, "-m", "gunicorn", "app:server", "-w", str(workers),
               "-b", f"{HOST}:{self.port}", "--timeout", "120", "--graceful-timeout", "5"]
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
def callback_payloads(models_dir: Path, text: str) -> list[dict[str, Any]]:
    """Page-callback request bodies built from the app's own callback map.

    Picks every callback whose only inputs are the shared state store (the analysis
    callbacks of each page) and fills in a state holding ``text``.
    """
    from .components import shell
    from .server import ServerConfig, create_server

    app = create_server(ServerConfig(models_dirs=[models_dir]))
    app.server.test_client().get("/")  # moves the pages' callbacks into the callback map
    state = {"model": "attn-only-2l", "text": text, "pos": None, "src": "user"}
    payloads = []
    for key, spec in app.callback_map.items():
        inputs, states = spec["inputs"], spec.get("state", [])
        if [(i["id"], i["property"]) for i in inputs] != [(shell.STATE, "data")] or states:
            continue
        outs = []
        for part in key.strip(".").split("..."):
            cid, prop = part.rsplit(".", 1)
            outs.append({"id": json.loads(cid) if cid.startswith("{") else cid,
                         "property": prop})
        payloads.append({"output": key, "outputs": outs if key.startswith("..") else outs[0],
                         "inputs": [{"id": shell.STATE, "property": "data", "value": state}],
                         "state": [], "changedPropIds": [f"{shell.STATE}.data"]})
    return payloads


def with_text(payload: dict[str, Any], text: str) -> dict[str, Any]:
    """``payload`` with the state's prompt replaced."""
    state = {**payload["inputs"][0]["value"], "text": text}
    return {**payload, "inputs": [{**payload["inputs"][0], "value": state}]}


def make_requests(n: int, callbacks: list[dict], seed: int = 0
                  ) -> list[tuple[str, str, Any]]:
    """``n`` requests mixing page callbacks and API calls over a pool of prompts."""
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
        lambda t: ("POST", "/api/analogy", {"positive": ["king", "woman"], "negative": ["man"]}),
    ]
    out = []
    for i in range(n):
        text = rng.choice(pool)
        if callbacks and i % 2 == 0:
            out.append(("POST", "/_dash-update-component", with_text(rng.choice(callbacks), text)))
        else:
            out.append(rng.choice(api)(text))
    return out


def run_load(client: Client, requests: list[tuple[str, str, Any]], clients: int,
             during: Optional[tuple[int, Any]] = None) -> dict[str, Any]:
    """Send ``requests`` from ``clients`` threads; ``during=(i, fn)`` calls fn after request i."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    started = [0]

    def one(req: tuple[str, str, Any]) -> None:
        with lock:
            started[0] += 1
            n = started[0]
        if during and n == during[0]:
            during[1]()
        t0 = time.perf_counter()
        try:
            status, body = client.request(*req)
            ok = status in (200, 204)
            why = f"{status} {req[1]} {body[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            ok, why = False, f"{type(exc).__name__} {req[1]}"
        dt = time.perf_counter() - t0
        with lock:
            (latencies.append(dt) if ok else errors.append(why))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    return {"requests": len(requests), "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1)}


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
    # a sync worker handles one request at a time: at most one can be in flight on it
    return {"workers_before": before, "killed_pid": killed.get("pid"),
            "workers_after": server.worker_pids(), "requests": stats["requests"],
            "lost": stats["errors"], "max_in_flight_on_killed_worker": 1,
            "error_samples": stats["error_samples"], "recovered_after_s": recovered_s,
            "passed": stats["errors"] <= 1 and recovered_s is not None}


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
    ap = argparse.ArgumentParser(prog="python -m attention_lens.loadtest",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per load run")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--soak", type=int, default=1000, help="distinct prompts in the soak run")
    ap.add_argument("--max-rss-growth-mb", type=float, default=100.0)
    ap.add_argument("--no-auth", action="store_true", help="run without HTTP Basic auth")
    ap.add_argument("--output", type=Path, help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    for name in ("requests", "clients", "soak"):
        if not 1 <= getattr(args, name) <= 20_000:
            ap.error(f"--{name} must be between 1 and 20000")

    report: dict[str, Any] = {"settings": vars(args) | {"output": str(args.output)}}
    with tempfile.TemporaryDirectory(prefix="attention-lens-load-") as tmp:
        root = Path(tmp)
        models = prepare_models(root)
        env = {"ATTENTION_LENS_MODELS_DIRS": str(models), "ATTENTION_LENS_CACHE_SIZE": "64",
               "ATTENTION_LENS_HOST": HOST}
        auth = None
        if not args.no_auth:
            from .auth import write_user

            write_user(root / "users.txt", USER, PASSWORD)
            env["ATTENTION_LENS_AUTH_FILE"] = str(root / "users.txt")
            auth = (USER, PASSWORD)
        print("building page-callback payloads from the app ...", flush=True)
        callbacks = callback_payloads(models, prompt(0, random.Random(0)))
        report["page_callbacks"] = sorted({c["output"][:80] for c in callbacks})
        requests = make_requests(args.requests, callbacks)
        log = root / "gunicorn.log"

        for workers in (1, 2):
            print(f"gunicorn with {workers} worker(s) ...", flush=True)
            server = Gunicorn(workers, env, log)
            try:
                client = Client(server.port, auth)
                server.wait_ready(client)
                run_load(client, requests[: max(1, len(requests) // 10)], args.clients)  # warm
                report[f"load_{workers}_worker"] = run_load(client, requests, args.clients)
                print(json.dumps(report[f"load_{workers}_worker"]), flush=True)
                if workers == 1:
                    print(f"soak: {args.soak} distinct prompts ...", flush=True)
                    report["soak"] = soak(server, client, args.soak, args.max_rss_growth_mb)
                    print(json.dumps(report["soak"]), flush=True)
                else:
                    report["corrupt_model"] = corrupt_model_check(client)
                    print(json.dumps(report["corrupt_model"]), flush=True)
                    print("fault: kill -9 one worker mid-load ...", flush=True)
                    report["fault"] = fault_test(server, client, make_requests(
                        args.requests, callbacks, seed=7), args.clients)
                    print(json.dumps(report["fault"]), flush=True)
                unauth = Client(server.port)
                report[f"unauthenticated_status_{workers}"] = \
                    unauth.request("GET", "/api/models")[0]
            finally:
                server.stop()
        if any(k.startswith("load_") and v["errors"] for k, v in report.items()
               if isinstance(v, dict) and "errors" in v):
            report["gunicorn_log_tail"] = log.read_text(errors="replace")[-3000:]

    one, two = report["load_1_worker"], report["load_2_worker"]
    report["speedup_2_vs_1"] = round(two["throughput_rps"] / max(one["throughput_rps"], 1e-9), 2)
    report["passed"] = (one["errors"] == 0 and two["errors"] == 0
                        and report["corrupt_model"]["passed"] and report["fault"]["passed"]
                        and report["soak"]["passed"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
