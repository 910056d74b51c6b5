"""Request checks and error handling: no traceback or 500 reaches a client for bad input."""

from __future__ import annotations

import logging
from typing import Any, Optional

import dash
import flask
from werkzeug.exceptions import HTTPException

from .analysis.errors import AnalysisError

log = logging.getLogger("attention_lens.guards")

DASH_CALLBACK_PATH = "_dash-update-component"


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
        if exc.code == 413:
            limit = server.config.get("MAX_CONTENT_LENGTH")
            return json_error(f"request body too large (limit {limit} bytes)", 413)
        if _wants_json(prefix) and exc.code is not None and exc.code >= 400:
            message = exc.description or exc.name
            if exc.code == 400 and "JSON" in (message or ""):
                message = "malformed JSON in the request body"
            return json_error(message, exc.code)
        return exc

    @server.errorhandler(AnalysisError)
    def _bad_input(exc: AnalysisError) -> Any:
        return json_error(str(exc), 400)  # its message is written for the user

    @server.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):  # pragma: no cover - handled above
            return _http_error(exc)
        log.exception("unhandled error on %s %s", flask.request.method, flask.request.path)
        return json_error("internal server error (it has been logged on the server)", 500)


def _is_list_of_dicts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def install_callback_guard(app: dash.Dash, prefix: str) -> None:
    """Reject malformed Dash callback requests with 400 before Dash trips over them."""
    path = prefix + DASH_CALLBACK_PATH

    @app.server.before_request
    def _check_callback_body() -> Optional[flask.Response]:
        if flask.request.path != path or flask.request.method != "POST":
            return None
        raw = flask.request.get_data(cache=True)
        try:
            body = flask.json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return json_error("malformed JSON in the callback request", 400)
        if not isinstance(body, dict):
            return json_error("the callback request must be a JSON object", 400)
        output = body.get("output")
        if not isinstance(output, str) or output not in app.callback_map:
            return json_error("unknown callback output", 400)
        if not isinstance(body.get("outputs"), (dict, list)):
            return json_error("the callback request needs 'outputs'", 400)
        for key in ("inputs", "state"):
            value = body.get(key, [])
            if not isinstance(value, list) or not all(
                    isinstance(v, dict) or _is_list_of_dicts(v) for v in value):
                return json_error(f"the callback request's {key!r} must be a list", 400)
        changed = body.get("changedPropIds", [])
        if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
            return json_error("the callback request's 'changedPropIds' must be a list", 400)
        return None
