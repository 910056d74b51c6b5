"""Strict validation of API input: the JSON body, the query string and each field type.

Every helper raises :class:`ApiError` (a 4xx with a readable message) on bad input, so a
route reads its fields in a few lines and never answers 500 to a malformed request.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import flask

from ..analysis import declare
from ..model.jsonfile import value_depth

#: Deepest nesting of lists and objects in a request body (no field needs more than 3).
MAX_BODY_DEPTH = 32


class ApiError(ValueError):
    """A 4xx answer with a readable message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def _api_errors() -> Iterator[None]:
    """A parameter's problem (the field readers of :mod:`.analysis.declare`) as a 400."""
    try:
        yield
    except declare.ParamError as exc:
        raise ApiError(str(exc)) from None


def _check_unicode(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError("the request contains invalid Unicode (a lone surrogate)") from None


def json_body(allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object, strictly parsed; unknown fields are an error."""
    raw = flask.request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    if not raw.strip():
        raise ApiError("the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(f"the request body is not valid UTF-8 (byte {exc.start})") from None

    def no_constants(name: str) -> None:
        raise ApiError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise ApiError(f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except RecursionError:
        raise ApiError(f"malformed JSON: nested too deeply (at most {MAX_BODY_DEPTH} levels "
                       "of lists and objects)") from None
    except ValueError as exc:  # an integer literal of thousands of digits
        raise ApiError(f"malformed JSON: {str(exc)[:120]}") from None
    depth = value_depth(body)
    if depth > MAX_BODY_DEPTH:
        raise ApiError(f"malformed JSON: nested {depth} levels deep (at most {MAX_BODY_DEPTH} "
                       "levels of lists and objects)")
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    _check_unicode(body)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                       f"allowed: {', '.join(sorted(allowed))}")
    return body


def query_params(allowed: set[str], ints: set[str]) -> dict[str, Any]:
    """The query string as a dict; fields in ``ints`` must be integers."""
    args = flask.request.args
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ApiError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                       f"allowed: {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {}
    for key in args:
        values = args.getlist(key)
        if len(values) > 1:
            raise ApiError(f"parameter {key!r} is given more than once")
        value = values[0]
        if "\x00" in value:
            raise ApiError(f"parameter {key!r} contains a NUL character")
        if key in ints:
            try:
                out[key] = int(value.strip(), 10)
            except ValueError:
                raise ApiError(f"{key} must be an integer, got {value[:40]!r}"
                               f"{' (cut)' if len(value) > 40 else ''}") from None
        else:
            out[key] = value
    return out


def text_field(body: dict[str, Any], key: str = "text") -> str:
    """A required, non-empty prompt."""
    return declare.read_text(body, key)


def int_field(body: dict[str, Any], key: str, default: Optional[int], lo: int, hi: int,
              what: str = "") -> Optional[int]:
    """An optional integer in [lo, hi]; booleans and floats are refused."""
    with _api_errors():
        return declare.read_int(body, key, default, lo, hi, what)


def bool_field(body: dict[str, Any], key: str, default: bool) -> bool:
    """An optional boolean."""
    with _api_errors():
        return declare.read_bool(body, key, default)


def choice_field(body: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """An optional string from ``choices``."""
    with _api_errors():
        return declare.read_choice(body, key, default, choices)


def token_field(body: dict[str, Any], key: str) -> Optional[int | str]:
    """An optional target token: an id or a string (checked by the analysis)."""
    with _api_errors():
        return declare.read_token(body, key)
