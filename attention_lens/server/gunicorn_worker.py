"""A gunicorn worker that bounds how long reading a request may take.

gunicorn's ``gthread`` worker hands each connection to a thread that then blocks until the
request's headers (and, in the app, its body) have arrived: a client sending a byte now and
then holds that thread for as long as it likes, and a handful of such sockets starve every
signed-in user. This worker gives each request a budget (``ATTENTION_LENS_READ_TIMEOUT``
seconds, default 10) of time spent waiting for what the client sends: past it the
connection is closed while reading headers, or the app answers 408 while reading the body.
Time the server itself spends (a busy machine reaching the body late) does not count.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any, Optional

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import TConn, ThreadWorker

from .guards import RequestReadTimeout

DEFAULT_READ_TIMEOUT = 10.0


def read_timeout() -> float:
    """The per-request read deadline in seconds, from ``ATTENTION_LENS_READ_TIMEOUT``."""
    try:
        value = float(os.environ.get("ATTENTION_LENS_READ_TIMEOUT", DEFAULT_READ_TIMEOUT))
    except ValueError:
        return DEFAULT_READ_TIMEOUT
    return value if value > 0 else DEFAULT_READ_TIMEOUT


class _DeadlineSocket:
    """A socket whose reads fail once the connection's current request is past its deadline."""

    def __init__(self, sock: socket.socket, conn: "DeadlineConn") -> None:
        self._sock, self._conn = sock, conn

    def recv(self, size: int, *flags: int) -> bytes:
        """At most ``size`` bytes, waiting no longer than what is left of the request's read
        time (only time spent waiting for the client counts: a busy server reading a body
        late does not make its client too slow)."""
        remaining = self._conn.read_left
        if remaining <= 0:
            raise self._conn.too_slow()
        self._sock.settimeout(remaining)
        t0 = time.monotonic()
        try:
            return self._sock.recv(size, *flags)
        except socket.timeout:
            self._conn.read_left = 0.0
            raise self._conn.too_slow() from None
        finally:
            self._conn.read_left -= time.monotonic() - t0
            try:
                self._sock.settimeout(None)
            except OSError as exc:  # closed meanwhile
                if exc.errno != errno.EBADF:
                    raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineConn(TConn):
    """A gthread connection whose request reads share one deadline per request."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read_left = float("inf")
        self.in_app = False

    def start_request(self, timeout: float) -> None:
        """A new request starts: the worker may wait at most ``timeout`` seconds in all for
        what it sends."""
        self.read_left, self.in_app = timeout, False

    def too_slow(self) -> Exception:
        """The error a read past the deadline raises (quiet while reading headers)."""
        if self.in_app:
            return RequestReadTimeout("the request body did not arrive in time")
        return NoMoreData(b"")

    def init(self) -> None:
        """Set up the connection as gthread does, then bound the parser's reads."""
        super().init()
        unreader = getattr(self.parser, "unreader", None)
        if unreader is not None and isinstance(getattr(unreader, "sock", None), socket.socket):
            unreader.sock = _DeadlineSocket(unreader.sock, self)


class ReadDeadlineWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker with a deadline on reading each request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout()

    def accept(self, listener: socket.socket) -> None:
        """Accept a connection as gthread does, as a :class:`DeadlineConn`."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            self.enqueue_req(DeadlineConn(self.cfg, client_sock, client_addr,
                                          listener.getsockname()))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise

    def handle(self, conn: TConn) -> Any:
        """Serve the next request of ``conn`` (gthread's), under a fresh read deadline."""
        if isinstance(conn, DeadlineConn):
            conn.start_request(self.read_timeout)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: TConn) -> Optional[bool]:
        """Run the app on ``req`` (gthread's); a body arriving late is now a 408."""
        if isinstance(conn, DeadlineConn):
            conn.in_app = True  # headers are in; a late body is now the app's 408
        return super().handle_request(req, conn)
