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


def test_debug_mode_is_refused_beyond_loopback():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: a version that tried to serve
    # would fail to bind, so nothing is ever exposed by this test
    refused = subprocess.run([sys.executable, "app.py", "--debug", "--host", "192.0.2.1",
                              "--port", str(free_port()), "--allow-anonymous"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "refusing debug mode" in refused.stderr, \
        refused.stderr[-500:]


def test_debug_mode_has_no_werkzeug_console(tmp_path):
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


def post_json(server: Server, path: str, body: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read()[:300]}


def test_a_20000_character_prompt_survives_a_shareable_link(tmp_path):
    server, prefix = readme_server(tmp_path, extra_env={
        "ATTENTION_LENS_CACHE_DIR": str(tmp_path / "cache")})
    words = "Harry Potter went to the castle and the owl flew over the lake".split()
    text = " ".join(words[i % len(words)] + str(i % 97) for i in range(4000))[:20_000]
    assert len(text) == 20_000
    try:
        _, deps = server.get(prefix + "_dash-dependencies", AUTH)
        output = next(d["output"] for d in json.loads(deps)
                      if d["output"].startswith("..shell-state.data"))
        outputs = [dict(zip(("id", "property"), o.split("."))) for o in
                   output[2:-2].split("...")]

        def sync(search, clicks, typed):
            return post_json(server, prefix + "_dash-update-component", {
                "output": output, "outputs": outputs, "changedPropIds": [
                    "shell-analyse.n_clicks" if clicks else "_pages_location.search"],
                "inputs": [{"id": "_pages_location", "property": "search", "value": search},
                           {"id": "shell-nav", "property": "data", "value": None},
                           {"id": "shell-analyse", "property": "n_clicks", "value": clicks},
                           {"id": "shell-model", "property": "value", "value": None}],
                "state": [{"id": "shell-text", "property": "value", "value": typed},
                          {"id": "shell-state", "property": "data", "value": None}]}, AUTH)

        status, body = sync("", 1, text)  # typed into the prompt box, Analyse
        assert status == 200, body
        state = body["response"]["shell-state"]["data"]
        assert state["text"] == text and state.get("tid")
        link = f"{prefix}attention?model={state['model']}&t={state['tid']}"
        assert len(link) < 200
        status, _ = server.get(link, AUTH)  # the shared link loads through gunicorn
        assert status == 200
        for _ in range(4):  # opened in any worker, the link brings back the whole prompt
            status, body = sync("?" + link.split("?", 1)[1], None, None)
            assert status == 200, body
            assert body["response"]["shell-state"]["data"]["text"] == text
        # the same prompt in the URL itself does not pass gunicorn's request line limit
        from urllib.parse import quote

        with pytest.raises(urllib.error.HTTPError):
            server.get(f"{prefix}attention?text={quote(text)}", AUTH)
    finally:
        server.stop()


def raw_request(port: int, data: bytes, pause_after: int = -1, wait: float = 30) -> bytes:
    """Send ``data`` (stalling after ``pause_after`` bytes if given); the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data if pause_after < 0 else data[:pause_after])
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and pause_after < 0 and \
                        b"Connection: close" not in b"".join(chunks):
                    s.settimeout(2)
        except socket.timeout:
            pass
        return b"".join(chunks)


def test_chunked_bodies_slow_bodies_and_headers_through_gunicorn(tmp_path):
    server, prefix = readme_server(tmp_path, extra_env={"ATTENTION_LENS_READ_TIMEOUT": "3"})
    auth = AUTH["Authorization"]
    try:
        def chunked(body: bytes) -> bytes:
            pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                              for i in range(0, len(body), 65536))
            return (f"POST {prefix}api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + \
                pieces + b"0\r\n\r\n"

        big = json.dumps({"text": "x" * (2 << 20)}).encode()
        head = raw_request(server.port, chunked(big)).split(b"\r\n", 1)[0]
        assert b" 413 " in head, head
        small = json.dumps({"text": "hello there", "top_k": 2}).encode()
        resp = raw_request(server.port, chunked(small))
        assert b" 200 " in resp.split(b"\r\n", 1)[0], resp[:300]
        assert b"X-Frame-Options: DENY" in resp and b"nosniff" in resp

        body = json.dumps({"text": "hello there"}).encode()
        slow = (f"POST {prefix}api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        t0 = time.perf_counter()
        resp = raw_request(server.port, slow, pause_after=len(slow) - 5, wait=30)
        waited = time.perf_counter() - t0
        first = resp.split(b"\r\n", 1)[0]
        print(f"a body stalled mid-way: answered {first!r} after {waited:.1f} s")
        assert waited < 10, waited
        assert b" 408 " in first, resp[:200]
    finally:
        server.stop()
