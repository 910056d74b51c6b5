"""Request checks and error handling: no traceback or 500 reaches a client for bad input."""

from __future__ import annotations

import io
import json
import logging
import traceback
from typing import Any, Optional

import dash
import flask
from dash.exceptions import DependencyException
from werkzeug.exceptions import HTTPException

from ..analysis.errors import AnalysisError
from ..model.jsonfile import value_depth

log = logging.getLogger("attention_lens.server.guards")

DASH_CALLBACK_PATH = "_dash-update-component"
#: Deepest JSON nesting accepted in a callback request (Dash's own requests stay under 10).
MAX_JSON_DEPTH = 64
#: Sent with every response: no framing by another site, no content-type sniffing.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
#: Methods whose body the API and the callbacks read.
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class RequestReadTimeout(TimeoutError):
    """The client did not send its request body in time (answered 408)."""


def json_error(message: str, status: int) -> flask.Response:
    """A JSON ``{"error": message}`` response with ``status``."""
    resp = flask.jsonify(error=message)
    resp.status_code = status
    return resp


def _wants_json(prefix: str) -> bool:
    path = flask.request.path
    return path.startswith(prefix + "api/") or path.startswith(prefix + "_dash-") or \
        flask.request.is_json


def install_error_handlers(server: flask.Flask, prefix: str) -> None:
    """JSON errors for the API and callbacks; an unexpected error is logged, never sent."""
    @server.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if isinstance(exc.__context__, RequestReadTimeout):  # Werkzeug saw a "disconnect"
            return _too_slow(exc.__context__)
        if exc.code == 413:
            limit = server.config.get("MAX_CONTENT_LENGTH")
            return json_error(f"request body too large (limit {limit} bytes)", 413)
        if _wants_json(prefix) and exc.code is not None and exc.code >= 400:
            message = exc.description or exc.name
            if exc.code == 400 and "JSON" in (message or ""):
                message = "malformed JSON in the request body"
            return json_error(message, exc.code)
        return exc

    @server.errorhandler(DependencyException)
    def _unknown_asset(exc: DependencyException) -> Any:
        log.warning("unknown asset %s", flask.request.path[:200])
        return json_error("not found", 404)

    @server.errorhandler(RequestReadTimeout)
    def _too_slow(exc: RequestReadTimeout) -> Any:
        log.warning("%s: %s %s from %s", exc, flask.request.method, flask.request.path[:200],
                    flask.request.remote_addr)
        resp = json_error(str(exc), 408)
        resp.headers["Connection"] = "close"
        return resp

    @server.errorhandler(AnalysisError)
    def _bad_input(exc: AnalysisError) -> Any:
        return json_error(str(exc), 400)  # its message is written for the user

    @server.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):  # pragma: no cover - handled above
            return _http_error(exc)
        if flask.request.path == prefix + DASH_CALLBACK_PATH:
            # a forged or stale callback request the page code cannot answer: one line, no
            # traceback (the last frame says where it failed)
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            log.warning("callback request refused: %s: %s (at %s)", type(exc).__name__,
                        str(exc)[:200], f"{where.filename}:{where.lineno}" if where else "?")
            return json_error("the callback request could not be processed", 400)
        log.exception("unhandled error on %s %s", flask.request.method, flask.request.path)
        return json_error("internal server error (it has been logged on the server)", 500)


def _outputs_of(output: str) -> int:
    """How many outputs a callback map key names (``..a.b...c.d..`` is two)."""
    return len(output[2:-2].split("...")) if output.startswith("..") else 1


def _matches(sent: Any, declared: dict[str, Any]) -> bool:
    """Whether one input or state entry of a request fits the declared dependency."""
    if str(declared.get("id", "")).startswith("{"):  # a pattern-matching id: ALL gives a list
        items = sent if isinstance(sent, list) else [sent]
        return all(isinstance(i, dict) and isinstance(i.get("id"), dict) and
                   i.get("property") == declared.get("property") for i in items)
    return isinstance(sent, dict) and sent.get("id") == declared.get("id") and \
        sent.get("property") == declared.get("property")


def callback_problem(body: Any, callback_map: dict[str, Any]) -> Optional[str]:
    """Why a ``/_dash-update-component`` body cannot come from this app's pages, or None."""
    if not isinstance(body, dict):
        return "the callback request must be a JSON object"
    if value_depth(body) > MAX_JSON_DEPTH:
        return "the callback request is nested too deeply"
    output = body.get("output")
    if not isinstance(output, str) or output not in callback_map:
        return "unknown callback output"
    outputs, n_out = body.get("outputs"), _outputs_of(output)
    if n_out > 1 and not (isinstance(outputs, list) and len(outputs) == n_out):
        return f"the callback request needs {n_out} 'outputs'"
    if n_out == 1 and not isinstance(outputs, (dict, list)):
        return "the callback request needs 'outputs'"
    spec = callback_map[output]
    for key in ("inputs", "state"):
        sent, declared = body.get(key, []), spec.get(key, [])
        if not isinstance(sent, list) or len(sent) != len(declared):
            return f"the callback request's {key!r} must be a list of {len(declared)}"
        if not all(_matches(s, d) for s, d in zip(sent, declared)):
            return f"the callback request's {key!r} do not match the callback"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        return "the callback request's 'changedPropIds' must be a list"
    return None


def install_callback_guard(app: dash.Dash, prefix: str) -> None:
    """Reject malformed Dash callback requests with 400 before Dash trips over them."""
    path = prefix + DASH_CALLBACK_PATH

    @app.server.before_request
    def _check_callback_body() -> Optional[flask.Response]:
        if flask.request.path != path or flask.request.method != "POST":
            return None
        raw = flask.request.get_data(cache=True)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also huge ints
            problem: Optional[str] = "malformed JSON in the callback request"
        else:
            problem = callback_problem(body, app.callback_map)
        if problem:
            log.warning("callback request refused: %s", problem)
            return json_error(problem, 400)
        return None


def install_request_checks(server: flask.Flask, prefix: str) -> None:
    """Security headers on every response; JSON only on the API; a body limit when chunked."""
    json_paths = (prefix + "api/", prefix + DASH_CALLBACK_PATH)

    @server.before_request
    def _check_body() -> Optional[flask.Response]:
        req = flask.request
        if req.method not in BODY_METHODS:
            return None
        if req.path.startswith(json_paths) and not (
                req.mimetype == "application/json" or req.mimetype.endswith("+json")):
            return json_error("send the request body as JSON with the header "
                              "'Content-Type: application/json'", 415)
        return _limit_chunked_body(req, server.config.get("MAX_CONTENT_LENGTH"))

    @server.after_request
    def _security_headers(resp: flask.Response) -> flask.Response:
        for name, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(name, value)
        return resp


def _limit_chunked_body(req: flask.Request, limit: Optional[int]) -> Optional[flask.Response]:
    """Read a body without Content-Length (chunked) up to ``limit``: over it is a 413."""
    env = req.environ
    if limit is None or "wsgi.input" not in env:
        return None
    chunked = "chunked" in env.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and (env.get("CONTENT_LENGTH") or not env.get("wsgi.input_terminated")):
        return None  # with a length, the server's MAX_CONTENT_LENGTH check answers 413
    stream, chunks, size = env["wsgi.input"], [], 0
    while size <= limit:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        return json_error(f"request body too large (limit {limit} bytes)", 413)
    data = b"".join(chunks)
    env["wsgi.input"], env["CONTENT_LENGTH"] = io.BytesIO(data), str(len(data))
    env.pop("wsgi.input_terminated", None)
    env.pop("HTTP_TRANSFER_ENCODING", None)
    return None


# ------------------------------------------------------------------- heavy API requests
#: API endpoints answered from one forward pass or a cached table: never held back.
CHEAP_ENDPOINTS = frozenset({"", "models", "predict", "next-token", "token-predictions",
                             "attention", "analogy"})
#: Endpoints heavy whatever their body's size (grids of forward passes, datasets, circuits).
ALWAYS_HEAVY = frozenset({"patching", "path-patching", "circuit", "graph", "head-metrics",
                          "compare", "qk-attribution"})
#: Other analyses of a prompt are heavy from this body size on (about 50 tokens): shorter
#: ones cost a few forward passes (their weight analyses are bounded by the job slots).
HEAVY_MIN_BODY = 256


def _env_number(name: str, default: float, low: float) -> float:
    import os

    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        log.warning("%s is not a number; using %g", name, default)
        return default
    return max(low, value)


class HeavyBusy(RuntimeError):
    """Every heavy lane of this worker is taken and the wait for one is full or too long."""

    def __init__(self, lanes: int) -> None:
        super().__init__(f"The server is busy: {lanes} heavy analyses are running in this "
                         "worker and more are waiting. Try again in a few seconds.")


class HeavyLanes:
    """At most ``lanes`` heavy API requests compute at once in a worker process, and at most
    ``queue`` more wait (up to ``wait_s``) for a lane; any other is answered busy (503 with
    Retry-After) at once. Heavy requests thus hold at most ``lanes + queue`` of a worker's
    threads, and cheap requests find a free thread instead of queueing behind them; the
    worker's memory holds at most ``lanes`` analyses' working memory.

    ``ATTENTION_LENS_HEAVY_LANES`` (default 2), ``ATTENTION_LENS_HEAVY_QUEUE`` (default 2)
    and ``ATTENTION_LENS_HEAVY_WAIT`` (seconds, default 10) set them."""

    def __init__(self, lanes: int, queue: int, wait_s: float) -> None:
        import threading

        self.lanes, self.queue, self.wait_s = lanes, queue, wait_s
        self._sem = threading.BoundedSemaphore(lanes)
        self._lock = threading.Lock()
        self.waiting = 0

    @classmethod
    def from_env(cls) -> "HeavyLanes":
        return cls(int(_env_number("ATTENTION_LENS_HEAVY_LANES", 2, 1)),
                   int(_env_number("ATTENTION_LENS_HEAVY_QUEUE", 2, 0)),
                   _env_number("ATTENTION_LENS_HEAVY_WAIT", 10.0, 0.0))

    def __enter__(self) -> "HeavyLanes":
        if self._sem.acquire(blocking=False):
            return self
        with self._lock:
            if self.waiting >= self.queue:
                raise HeavyBusy(self.lanes)
            self.waiting += 1
        try:
            got = self._sem.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self.waiting -= 1
        if not got:
            raise HeavyBusy(self.lanes)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sem.release()
