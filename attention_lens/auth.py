"""HTTP Basic authentication from a users file of salted password hashes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import dash
import flask
from dash_auth import BasicAuth
from werkzeug.security import check_password_hash, generate_password_hash

from .config import ConfigError

log = logging.getLogger("attention_lens.auth")


def valid_username(name: str) -> bool:
    """User names: 1-64 printable characters without ':' or whitespace."""
    return 0 < len(name) <= 64 and name.isprintable() and not any(
        c in name for c in ": \t") and name == name.strip()


def read_users(path: Path) -> dict[str, str]:
    """``name -> password hash`` from a users file (``name:hash`` lines, '#' comments)."""
    users: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not valid_username(name) or "$" not in hashed:
            raise ConfigError(f"{path}:{n}: expected 'name:password-hash'")
        users[name] = hashed
    return users


def write_user(path: Path, name: str, password: str, method: str = "scrypt") -> bool:
    """Add or replace ``name`` in the users file with a salted hash; True if it was new."""
    if not valid_username(name):
        raise ConfigError(f"invalid user name {name!r} (no ':' or spaces, at most 64 characters)")
    if not password:
        raise ConfigError("the password must not be empty")
    path = Path(path)
    users = read_users(path) if path.exists() else {}
    new = name not in users
    users[name] = generate_password_hash(password, method=method)
    text = "# Attention Lens users: name:salted-hash (written by 'attention-lens add-user')\n"
    text += "".join(f"{u}:{h}\n" for u, h in users.items())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return new


class UserStore:
    """Checks passwords against a users file, re-reading it when it changes.

    Password hashes are deliberately slow; a successful check is remembered (as a keyed
    digest, never the password) in a small bounded cache so each request does not pay it.
    """

    def __init__(self, path: Path, cache_size: int = 256) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: Optional[float] = None
        self._users: dict[str, str] = {}
        self._key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._reload()

    def _reload(self) -> None:
        mtime = self.path.stat().st_mtime_ns
        if mtime != self._mtime:
            users = read_users(self.path)
            with self._lock:
                self._users, self._mtime = users, mtime
                self._ok.clear()

    def names(self) -> list[str]:
        """The user names in the file."""
        return list(self._users)

    def check(self, name: str, password: str) -> bool:
        """True when ``password`` is ``name``'s password."""
        try:
            self._reload()
        except (OSError, ConfigError):
            log.exception("cannot read users file %s; keeping the previous users", self.path)
        hashed = self._users.get(name)
        if hashed is None:
            return False
        digest = hmac.new(self._key, f"{name}\0{password}\0{hashed}".encode("utf-8", "replace"),
                          hashlib.sha256).digest()
        with self._lock:
            if digest in self._ok:
                self._ok.move_to_end(digest)
                return True
        if not check_password_hash(hashed, password):
            return False
        with self._lock:
            self._ok[digest] = None
            while len(self._ok) > self._cache_size:
                self._ok.popitem(last=False)
        return True


class LabAuth(BasicAuth):
    """dash-auth Basic auth over every route (no public routes), robust to malformed headers."""

    def __init__(self, app: dash.Dash, users: UserStore, secret_key: str) -> None:
        self.users = users
        super().__init__(app, auth_func=users.check, secret_key=secret_key)

    def _protect(self) -> None:
        @self.app.server.before_request
        def _require_login() -> Optional[flask.Response]:
            return None if self.is_authorized() else self.login_request()

    def is_authorized(self) -> bool:
        """True when the request carries valid Basic credentials."""
        header = flask.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return False
        name, sep, password = decoded.partition(":")
        if not sep:
            return False
        ok = self.users.check(name, password)
        if ok:
            flask.g.attention_lens_user = name
        return ok

    def login_request(self) -> flask.Response:
        """401 with a Basic challenge."""
        resp = flask.jsonify(error="authentication required")
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="Attention Lens", charset="UTF-8"'
        return resp
