"""JSON encoding of analysis results (dataclasses, numpy arrays, tensors): the one encoder of
the API (rounded to float32 precision) and of the exported data (exact).

:func:`jsonable` makes a JSON-ready copy of a result; :class:`JSONProvider` is the Flask
server's encoder (orjson, which writes numpy arrays natively; NaN and infinity are null).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson
import torch
from flask.json.provider import DefaultJSONProvider
from flask.json.provider import _default as flask_default

from .analysis.declare import Exact

#: 10**k for k = 0 .. 400 (past 308 it is infinity, like ``10.0 ** k``).
with np.errstate(over="ignore"):
    _POW10 = np.power(10.0, np.arange(401, dtype=np.int64))
#: Elements rounded at once (small enough for the temporaries to stay in cache).
_CHUNK = 1 << 16


def _round_chunk(a: np.ndarray, digits: int, out: np.ndarray) -> None:
    """Round the 1-d float64 ``a`` to ``digits`` significant digits into ``out``."""
    with np.errstate(all="ignore"):
        mag = np.floor(np.log10(np.abs(a)))  # -inf at 0, nan at nan, inf at inf
        mag[~np.isfinite(mag)] = digits - 1  # those are kept as they are (exponent 0)
        exp = (digits - 1 - mag).astype(np.int64)
        if exp.min() >= 0:  # every value below 10**digits: multiply, round, divide
            p = _POW10[np.minimum(exp, 400)]
            np.multiply(a, p, out=out)
            np.rint(out, out=out)
            np.divide(out, p, out=out)
        else:
            p = _POW10[np.minimum(np.abs(exp), 400)]
            up = exp >= 0
            out[...] = np.where(up, np.rint(a * p) / p, np.rint(a / p) * p)
        lost = ~np.isfinite(out) & np.isfinite(a)  # below ~1e-302: 10**exp overflows
        if lost.any():
            out[lost] = a[lost]


def _round_sig(a: np.ndarray, digits: int = 7) -> np.ndarray:
    """Round to ``digits`` significant digits so JSON stays short (float32 precision).

    Each finite non-zero ``x`` becomes ``round(x * 10**e) / 10**e`` (or ``round(x / 10**-e)
    * 10**-e`` when ``e < 0``) with ``e = digits - 1 - floor(log10(|x|))``, in float64;
    zeros (their sign too), NaN and infinities are kept. A new C-contiguous float64 array.
    """
    a = np.asarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=np.float64)
    flat_a, flat_out = a.reshape(-1), out.reshape(-1)
    for i in range(0, flat_a.size, _CHUNK):
        _round_chunk(flat_a[i:i + _CHUNK], digits, flat_out[i:i + _CHUNK])
    return out


def _array(a: np.ndarray, digits: Optional[int], arrays: bool) -> Any:
    kind = a.dtype.kind
    if arrays and a.ndim and kind in "biuf":  # kept as numpy for the server's encoder
        if kind == "f":
            return _round_sig(a, digits) if digits else np.array(a, dtype=np.float64)
        return np.ascontiguousarray(a)
    if kind in "biu":
        return a.tolist()
    if kind == "f":
        r = _round_sig(a, digits) if digits else np.asarray(a, dtype=np.float64)
        bad = ~np.isfinite(r)
        if bad.any():  # JSON has no NaN or infinity: send null
            obj = r.astype(object)
            obj[bad] = None
            return obj.tolist()
        return r.tolist()
    if kind == "c":
        return {"real": _array(a.real, digits, arrays), "imag": _array(a.imag, digits, arrays)}
    return jsonable(a.tolist(), digits, arrays)


def jsonable(obj: Any, digits: Optional[int] = 7, arrays: bool = False) -> Any:
    """A JSON-ready copy of an analysis result (dataclasses, numpy arrays, tensors, ...).

    Floats are rounded to ``digits`` significant digits (float32 precision keeps the API's
    answers short); ``digits=None`` keeps them exact. NaN and infinity become null.
    ``arrays=True`` leaves numeric arrays (of at least one dimension) as rounded numpy arrays,
    float64 and C-contiguous, which :class:`JSONProvider` writes without Python lists; the
    JSON is the same.
    """
    if isinstance(obj, Exact):
        return jsonable(obj.value, None, arrays)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), digits, arrays)
                for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return _array(obj, digits, arrays)
    if isinstance(obj, torch.Tensor):
        return _array(obj.detach().cpu().numpy(), digits, arrays)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, digits, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, digits, arrays) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if not math.isfinite(x):
            return None
        return float(_round_sig(np.array([x]), digits)[0]) if digits else x
    if isinstance(obj, (complex, np.complexfloating)):
        return {"real": jsonable(obj.real, digits, arrays),
                "imag": jsonable(obj.imag, digits, arrays)}
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ------------------------------------------------------------------ the server's encoder
_OPTIONS = (orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
            | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS)


def _orjson_default(o: Any) -> Any:
    """What orjson does not write itself: numpy it cannot take as is, then Flask's types."""
    if isinstance(o, np.ndarray):
        if o.ndim and o.dtype.kind in "biuf":
            return np.ascontiguousarray(o)  # orjson takes C-contiguous arrays only
        return jsonable(o, digits=None)
    if isinstance(o, (np.generic, torch.Tensor)):
        return jsonable(o, digits=None)
    return flask_default(o)


def _stdlib_default(o: Any) -> Any:
    if isinstance(o, (np.ndarray, np.generic, torch.Tensor)):
        return jsonable(o, digits=None)
    return flask_default(o)


def dumps_bytes(obj: Any, indent: bool = False) -> bytes:
    """``obj`` as UTF-8 JSON, keys in insertion order; NaN and infinity are written as null.

    orjson writes it; what orjson refuses (an integer beyond 64 bits, a lone surrogate, very
    deep nesting) is written as Flask's own provider writes it (ASCII, numpy as lists).
    """
    try:
        return orjson.dumps(obj, default=_orjson_default,
                            option=_OPTIONS | (orjson.OPT_INDENT_2 if indent else 0))
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=_stdlib_default, ensure_ascii=True,
                          indent=2 if indent else None,
                          separators=None if indent else (",", ":")).encode("ascii")


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON provider with orjson writing responses (keys in insertion order).

    ``flask.jsonify`` on a dict of numpy arrays (see ``jsonable(..., arrays=True)``) never
    builds Python lists (a float32 array or scalar is written in the shortest form that reads
    back as the same float32); ``loads`` is Flask's.
    """

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:  # noqa: D102
        return dumps_bytes(obj, indent=bool(kwargs.get("indent"))).decode("utf-8")

    def response(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        obj = self._prepare_response_obj(args, kwargs)
        indent = (self.compact is None and self._app.debug) or self.compact is False
        return self._app.response_class(dumps_bytes(obj, indent) + b"\n",
                                        mimetype=self.mimetype)
