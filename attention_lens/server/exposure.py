"""Who can reach this process: the addresses of the sockets it actually listens on.

The decision to refuse anonymous or debug service is taken from the listening sockets the
process holds (whatever started it: ``attention-lens serve``, gunicorn with any flags or config
file, ``flask run``, another WSGI server), never from how its command line looks.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from typing import Optional

import flask

from .config import ServerConfig, exposure_problem

log = logging.getLogger("attention_lens.server.exposure")

#: How long a look at the listening sockets is trusted before looking again (seconds).
RECHECK_S = 10.0


def listening_addresses() -> list[str]:
    """Local IP addresses of the TCP sockets this process listens on (Unix sockets: none)."""
    fd_dir = "/proc/self/fd"
    fds = [int(f) for f in os.listdir(fd_dir)] if os.path.isdir(fd_dir) else range(3, 4096)
    out: list[str] = []
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    out.append(str(sock.getsockname()[0]))
            except OSError:
                continue
    return out


def install_exposure_guard(server: flask.Flask, config: ServerConfig) -> None:
    """Answer 503 while this process listens beyond loopback in a way ``config`` forbids.

    Checked on requests (at most every :data:`RECHECK_S` seconds), so a server that binds
    after importing the app (``gunicorn --preload``, ``flask run``) is covered too.
    """
    if config.auth_file is not None and not config.debug:
        return  # authenticated and not in debug mode: any address is fine
    state: dict[str, object] = {"at": -RECHECK_S, "problem": None}
    lock = threading.Lock()

    @server.before_request
    def _refuse_exposed() -> Optional[flask.Response]:
        now = time.monotonic()
        with lock:
            if now - float(state["at"]) >= RECHECK_S:  # type: ignore[arg-type]
                problem = exposure_problem(config, listening_addresses())
                if problem and problem != state["problem"]:
                    log.error("%s", problem)
                state["at"], state["problem"] = now, problem
            problem = state["problem"]
        if problem:
            resp = flask.jsonify(error=str(problem))
            resp.status_code = 503
            return resp
        return None
