"""The lab deployment under attack, over real sockets on 127.0.0.1: slow clients, exposure,
debug mode, chunked bodies and long shareable links (gunicorn as the README runs it)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from attention_lens.server import write_user

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PASSWORD = "correct horse battery"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_gunicorn() -> tuple[dict[str, str], list[str]]:
    """The environment and gunicorn arguments of the README's lab-server command."""
    block = README.split("## Running on a lab server", 1)[1].split("```bash", 1)[1]
    block = block.split("```", 1)[0].replace("\\\n", " ")
    line = next(ln for ln in block.splitlines() if "gunicorn" in ln and not ln.startswith("#"))
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    args = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    assert args[0].endswith("gunicorn"), args
    return env, args[1:]


class Server:
    """A server process in its own process group, on a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, path: str, headers: Optional[dict] = None, limit: float = 90) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                self.get(path, headers, timeout=5)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("server did not start: " + self.output())

    def get(self, path: str, headers: Optional[dict] = None, timeout: float = 10):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.output()

    def output(self) -> str:
        if self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read().decode("utf-8", "replace")[-4000:]


def readme_server(tmp_path, extra_args=(), extra_env=None) -> tuple[Server, str]:
    """gunicorn exactly as the README runs it, bound to a free port on 127.0.0.1."""
    env, args = readme_gunicorn()
    users = tmp_path / "users.txt"
    write_user(users, "alice", PASSWORD)
    env["ATTENTION_LENS_AUTH_FILE"] = str(users)
    env["ATTENTION_LENS_TORCH_THREADS"] = "1"
    env.update(extra_env or {})
    port = free_port()
    i = args.index("-b")
    args[i + 1] = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gunicorn", *args, *extra_args]
    prefix = env.get("ATTENTION_LENS_URL_PREFIX", "/")
    server = Server(cmd, env, port)
    server.wait_ready(prefix + "api/models", AUTH)
    return server, prefix


def slow_sockets(port: int, n: int, path: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        socks.append(s)
    return socks


def trickle(socks: list[socket.socket]) -> int:
    """Send one more header byte on each slow socket; the number still open."""
    alive = 0
    for s in socks:
        try:
            s.sendall(b"X")
            alive += 1
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("n_slow", [2, 4])
def test_slow_sockets_do_not_starve_signed_in_users(tmp_path, n_slow):
    server, prefix = readme_server(tmp_path)
    socks: list[socket.socket] = []
    try:
        socks = slow_sockets(server.port, n_slow, prefix)
        latencies = []
        for _ in range(6):  # about 6 s of a slow-header attack
            trickle(socks)
            t0 = time.perf_counter()
            try:
                status, _ = server.get(prefix + "api/models", AUTH, timeout=8)
            except OSError:
                status = 0
            latencies.append(time.perf_counter() - t0)
            assert status == 200, (status, latencies)
            time.sleep(max(0.0, 1.0 - latencies[-1]))
        print(f"{n_slow} slow sockets: signed-in latency max {max(latencies) * 1000:.0f} ms, "
              f"median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")
        assert max(latencies) < 3.0, latencies
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_a_slow_socket_is_dropped_at_the_read_deadline(tmp_path):
    """With every thread taken by a slow client, the deadline frees them: the signed-in user
    waits at most about the deadline (without it they would wait for ever)."""
    server, prefix = readme_server(tmp_path, ["-w", "1", "--threads", "2"],
                                   {"ATTENTION_LENS_READ_TIMEOUT": "3"})
    socks: list[socket.socket] = []
    try:
        socks = slow_sockets(server.port, 4, prefix)
        trickle(socks)
        t0 = time.perf_counter()
        status, _ = server.get(prefix + "api/models", AUTH, timeout=20)
        waited = time.perf_counter() - t0
        print(f"threads 2, 4 slow sockets, deadline 3 s: answered in {waited:.1f} s")
        assert status == 200 and waited < 10, waited
        deadline = time.monotonic() + 15
        while trickle(socks) and time.monotonic() < deadline:
            time.sleep(1)
        assert trickle(socks) == 0, "the slow sockets should have been closed by the server"
    finally:
        for s in socks:
            s.close()
        server.stop()


def app_py(tmp_path, *flags: str, auth: bool = True) -> Server:
    port = free_port()
    args = [sys.executable, "app.py", "--port", str(port), *flags]
    if auth:
        users = tmp_path / "users.txt"
        write_user(users, "alice", PASSWORD)
        args += ["--auth-file", str(users)]
    return Server(args, {"ATTENTION_LENS_TORCH_THREADS": "1"}, port)


def test_python_app_py_holds_against_slow_sockets(tmp_path):
    server = app_py(tmp_path)
    socks: list[socket.socket] = []
    try:
        server.wait_ready("/api/models", AUTH)
        socks = slow_sockets(server.port, 4, "/")
        latencies = []
        for _ in range(4):
            trickle(socks)
            t0 = time.perf_counter()
            status, _ = server.get("/api/models", AUTH, timeout=8)
            latencies.append(time.perf_counter() - t0)
            assert status == 200
            time.sleep(0.5)
        print(f"app.py, 4 slow sockets: max {max(latencies) * 1000:.0f} ms")
        assert max(latencies) < 3.0, latencies
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_debug_mode_has_no_werkzeug_console_and_stays_on_loopback(tmp_path):
    refused = subprocess.run([sys.executable, "app.py", "--debug", "--host", "0.0.0.0",
                              "--port", str(free_port()), "--allow-anonymous"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "debug" in refused.stderr, refused.stderr[-500:]
    server = app_py(tmp_path, "--debug", auth=False)
    try:
        server.wait_ready("/api/models")
        for path in ("/console", "/console?__debugger__=yes&cmd=resource&f=debugger.js"):
            try:
                status, body = server.get(path)
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            text = body.decode("utf-8", "replace")
            # Werkzeug's console page sets EVALEX and SECRET; its debugger.js defines them too
            assert "EVALEX" not in text and "SECRET" not in text, (path, status)
            assert "Interactive Console" not in text and "Werkzeug" not in text
    finally:
        server.stop()


def _gunicorn_anonymous(args: list[str], port: int) -> Server:
    cmd = [sys.executable, "-m", "gunicorn", "app:server", "-w", "1", *args]
    env = {"ATTENTION_LENS_TORCH_THREADS": "1", "ATTENTION_LENS_AUTH_FILE": "",
           "ATTENTION_LENS_ALLOW_ANONYMOUS": "", "GUNICORN_CMD_ARGS": ""}
    return Server(cmd, env, port)


@pytest.mark.parametrize("how", ["python -m gunicorn", "config file", "preload"])
def test_anonymous_service_beyond_loopback_is_refused_under_any_launcher(tmp_path, how):
    """Bound on every interface without a users file: nothing is served (requests only ever
    go to 127.0.0.1, which a 0.0.0.0 socket also answers)."""
    port = free_port()
    args = ["-b", f"0.0.0.0:{port}"]
    if how == "config file":
        conf = tmp_path / "conf.py"
        conf.write_text(f"bind = ['0.0.0.0:{port}']\n")
        args = ["-c", str(conf)]
    elif how == "preload":
        args.append("--preload")
    server = _gunicorn_anonymous(args, port)
    try:
        deadline = time.monotonic() + 90
        outcome = None
        while time.monotonic() < deadline and outcome is None:
            if server.proc.poll() is not None:
                outcome = f"exited {server.proc.returncode}"
                break
            try:
                status, _ = server.get("/api/models", timeout=5)
                outcome = f"served {status}"
            except urllib.error.HTTPError as exc:
                outcome = f"refused {exc.code}: {exc.read()[:200]!r}"
            except OSError:
                time.sleep(0.5)
        log = server.stop()
        assert outcome is not None and not outcome.startswith("served"), (outcome, log)
        assert "refusing to listen on 0.0.0.0" in log or "refused 503" in outcome, (outcome,
                                                                                     log)
    finally:
        server.stop()
