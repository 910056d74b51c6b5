"""An uploaded set of prompt pairs (CSV or JSON Lines), as /patching and /circuit take it."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

from dash import no_update
from dash.exceptions import PreventUpdate

from .. import weight_analyses as W
from ..analysis import patching as PT
from ..analysis.errors import AnalysisError
from . import shell


def keep_uploaded_pairs(contents: Optional[str], filename: Optional[str]) -> tuple[Any, Any]:
    """Check an uploaded set of pairs and keep it in the shared store: the name the page's
    ``pairs`` control (and URL) carries, and a message saying what was read, or
    ``no_update`` and a message saying why not."""
    if not contents:
        raise PreventUpdate
    name = str(filename or "the file")[:80]
    try:
        raw = base64.b64decode(contents.split(",", 1)[1], validate=True)
        pairs = PT.parse_pairs(raw.decode("utf-8"))
    except (IndexError, binascii.Error, UnicodeDecodeError):
        return no_update, shell.alert(f"{name} could not be read as UTF-8 text")
    except AnalysisError as exc:
        return no_update, shell.alert(f"{name}: {exc}")
    try:
        digest = W.keep_pair_set(raw)
    except W.store_errors() as exc:
        return no_update, shell.alert(f"{name} was read but the server's store cannot keep it "
                                      f"right now ({type(exc).__name__}): try the upload "
                                      "again in a moment.")
    return digest, shell.alert(f"Using {name}: {len(pairs)} pairs.", color="info")
