"""JSON encoding of analysis results (dataclasses, numpy arrays, tensors): the one encoder of
the API (rounded to float32 precision) and of the exported data (exact)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def _round_sig(a: np.ndarray, digits: int = 7) -> np.ndarray:
    """Round to ``digits`` significant digits so JSON stays short (float32 precision)."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a) & (a != 0)
    out = a.copy()
    if finite.any():
        mag = np.floor(np.log10(np.abs(a[finite])))
        exp = (digits - 1 - mag).astype(np.int64)
        vals = a[finite]
        pos = exp >= 0
        res = np.empty_like(vals)
        res[pos] = np.round(vals[pos] * 10.0 ** exp[pos]) / 10.0 ** exp[pos]
        res[~pos] = np.round(vals[~pos] / 10.0 ** -exp[~pos]) * 10.0 ** -exp[~pos]
        out[finite] = res
    return out


def _array(a: np.ndarray, digits: Optional[int]) -> Any:
    kind = a.dtype.kind
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
        return {"real": _array(a.real, digits), "imag": _array(a.imag, digits)}
    return jsonable(a.tolist(), digits)


def jsonable(obj: Any, digits: Optional[int] = 7) -> Any:
    """A JSON-ready copy of an analysis result (dataclasses, numpy arrays, tensors, ...).

    Floats are rounded to ``digits`` significant digits (float32 precision keeps the API's
    answers short); ``digits=None`` keeps them exact. NaN and infinity become null.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), digits)
                for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return _array(obj, digits)
    if isinstance(obj, torch.Tensor):
        return _array(obj.detach().cpu().numpy(), digits)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, digits) for v in obj]
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
        return {"real": jsonable(obj.real, digits), "imag": jsonable(obj.imag, digits)}
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
