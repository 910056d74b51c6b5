"""Shareable links for long prompts: the text stays on the server behind a short id.

A page's URL carries its whole state so it can be shared, but a URL of tens of thousands of
characters is refused by servers and proxies (gunicorn's request line stops at 8 KiB). A
prompt longer than :data:`LINK_TEXT_MAX` characters is therefore kept in the deployment's
shared store (the disk cache, or Redis) under an id derived from its text, and the link
carries ``t=<id>`` instead of ``text=...``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Optional

#: Prompts longer than this many characters travel in links as an id.
LINK_TEXT_MAX = 1000
#: How long a stored prompt outlives its last use (seconds).
EXPIRE_S = 180 * 24 * 3600
_KEY = "prompt:"
_ID = re.compile(r"^[a-z2-7]{24}$")


def prompt_id(text: str) -> str:
    """The short id of ``text`` (the same text always gets the same id)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest[:15]).decode("ascii").lower()


def save(text: str) -> str:
    """Keep ``text`` in the shared store; its id for a link."""
    from . import background

    pid = prompt_id(text)
    background.current().kv.set(_KEY + pid, text, expire=EXPIRE_S)
    return pid


def load(pid: str) -> Optional[str]:
    """The prompt stored under ``pid``, or None (unknown, expired or malformed id)."""
    from . import background

    if not isinstance(pid, str) or not _ID.match(pid):
        return None
    kv = background.current().kv
    text = kv.get(_KEY + pid)
    if not isinstance(text, str) or prompt_id(text) != pid:
        return None
    kv.set(_KEY + pid, text, expire=EXPIRE_S)  # used again: keep it longer
    return text


def link_id(text: str) -> Optional[str]:
    """The id a link should carry for ``text``, or None when the text itself fits a link."""
    return save(text) if len(text) > LINK_TEXT_MAX else None
