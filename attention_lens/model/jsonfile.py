"""Reading the small JSON files of a model folder safely: size and nesting depth are bounded.

A model folder may come from anyone with write access to a shared models directory, so its
``config.json``, ``card.json`` and shard index are parsed only after checking that they are
small and not nested deeper than any real one (Python's parser recurses and would raise
``RecursionError`` on a deeply nested file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Largest JSON side file accepted (a shard index of a big model is well under this).
MAX_BYTES = 8 << 20
#: Deepest nesting of lists and objects accepted.
MAX_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


class JsonFileError(ValueError):
    """The file is too large, too deeply nested, not UTF-8 or not valid JSON."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text`` (strings ignored)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json(path: Path, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The parsed JSON file at ``path``, or a :class:`JsonFileError` saying what is wrong."""
    size = path.stat().st_size
    if size > max_bytes:
        raise JsonFileError(f"{size} bytes is larger than the {max_bytes} bytes allowed")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonFileError(f"not UTF-8 (byte {exc.start})") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonFileError(f"nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise JsonFileError(f"not valid JSON ({str(exc)[:120]})") from None


def value_depth(value: Any) -> int:
    """How deeply parsed JSON ``value`` nests lists and objects (computed without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return deepest


def loads_bounded(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` for text from a user (an upload, a request field), nesting bounded.

    Raises :class:`JsonFileError` with a message fit for the user: what is malformed (with
    line and column), too deeply nested (Python's parser would raise ``RecursionError``), or
    an integer of thousands of digits.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise JsonFileError(f"nested too deeply (at most {max_depth} levels of lists and "
                            "objects)") from None
    except ValueError as exc:  # an integer literal of thousands of digits
        raise JsonFileError(str(exc)[:120]) from None
    depth = value_depth(value)
    if depth > max_depth:
        raise JsonFileError(f"nested {depth} levels deep (at most {max_depth} levels of lists "
                            "and objects)")
    return value
