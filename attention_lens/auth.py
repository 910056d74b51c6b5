"""HTTP Basic authentication from a users file of salted password hashes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import dash
import flask
from dash_auth import BasicAuth
from limits import parse as parse_limit
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from werkzeug.security import check_password_hash, generate_password_hash

from .config import ConfigError

log = logging.getLogger("attention_lens.auth")


def valid_username(name: str) -> bool:
    """User names: 1-64 printable characters without ':' or whitespace, not starting with '#'.

    These are exactly the names a ``name:hash`` line of the users file can hold ('#' starts
    a comment there).
    """
    return 0 < len(name) <= 64 and name.isprintable() and not any(
        c.isspace() or c == ":" for c in name) and not name.startswith("#")


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
        raise ConfigError(f"invalid user name {name!r} (no ':' or spaces, not starting with "
                          "'#', at most 64 characters)")
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


class TooManyAttempts(Exception):
    """Sign-in refused for now (throttled or every hashing slot busy); retry after a while."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class UserStore:
    """Checks passwords against a users file, re-reading it when it changes.

    The file fails closed: when it is missing, unreadable or malformed nobody signs in (and
    the log says why) until it is fixed. Password hashes are deliberately slow, so at most
    ``hash_slots`` run at once in a process, and an unknown user costs the same hash (against
    a dummy) as a wrong password. A successful check is remembered (as a keyed digest, never
    the password) in a small bounded cache so each request does not pay it.
    """

    def __init__(self, path: Path, cache_size: int = 256, hash_slots: int = 1,
                 hash_wait: float = 2.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._version: Optional[tuple[int, int, int]] = None
        self._users: dict[str, str] = {}
        self._problem: Optional[str] = None
        self._key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._slots = threading.BoundedSemaphore(hash_slots)
        self._hash_wait = hash_wait
        # the hash an unknown user is checked against: the cost of add-user's own hashes
        self._dummy = generate_password_hash(secrets.token_urlsafe(16), method="scrypt")
        self.reload()

    def reload(self) -> None:
        """Re-read the users file if it changed; on any problem nobody can sign in."""
        try:
            st = self.path.stat()
            version = (st.st_mtime_ns, st.st_size, st.st_ino)
            if version == self._version:
                return
            users, problem = read_users(self.path), None
        except (OSError, ConfigError, UnicodeDecodeError) as exc:
            version, users, problem = None, {}, str(exc) or type(exc).__name__
        with self._lock:
            changed = problem != self._problem
            self._users, self._version, self._problem = users, version, problem
            self._ok.clear()
        if problem and changed:
            log.error("users file %s cannot be used (%s): nobody can sign in until it is fixed",
                      self.path, problem)
        elif not problem:
            log.info("users file %s: %d user(s)", self.path, len(users))

    @property
    def problem(self) -> Optional[str]:
        """Why the users file cannot be used now (nobody signs in), or None."""
        return self._problem

    def names(self) -> list[str]:
        """The user names in the file."""
        return list(self._users)

    def _digest(self, name: str, password: str, hashed: str) -> bytes:
        return hmac.new(self._key, f"{name}\0{password}\0{hashed}".encode("utf-8", "replace"),
                        hashlib.sha256).digest()

    def remembered(self, name: str, password: str) -> bool:
        """True when these credentials were checked recently and the file has not changed."""
        self.reload()
        hashed = self._users.get(name)
        if hashed is None:
            return False
        with self._lock:
            digest = self._digest(name, password, hashed)
            if digest in self._ok:
                self._ok.move_to_end(digest)
                return True
        return False

    def check(self, name: str, password: str) -> bool:
        """True when ``password`` is ``name``'s password (raises TooManyAttempts when busy)."""
        if self.remembered(name, password):
            return True
        hashed = self._users.get(name)
        if not self._slots.acquire(timeout=self._hash_wait):
            raise TooManyAttempts("too many sign-in attempts at once; try again shortly", 2)
        try:
            ok = check_password_hash(hashed or self._dummy, password) and hashed is not None
        finally:
            self._slots.release()
        if ok:
            with self._lock:
                self._ok[self._digest(name, password, hashed or "")] = None
                while len(self._ok) > self._cache_size:
                    self._ok.popitem(last=False)
        return ok


class SignInThrottle:
    """Failed sign-ins counted per client address and per user name (a moving window).

    ``rate`` is a rate-limit string such as ``10/minute``; ``storage`` a ``limits`` storage
    URI (``memory://`` counts per process; ``redis://host:port`` shares the counts between
    workers and machines).
    """

    def __init__(self, rate: str = "10/minute", storage: str = "memory://") -> None:
        self.rate = parse_limit(rate)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage))

    def retry_after(self, address: str, name: str) -> Optional[int]:
        """Seconds until this address and name may try again, or None if they may now."""
        waits = [self.limiter.get_window_stats(self.rate, kind, key).reset_time - time.time()
                 for kind, key in (("address", address), ("user", name))
                 if not self.limiter.test(self.rate, kind, key)]
        return math.ceil(max(waits)) if waits else None

    def failed(self, address: str, name: str) -> None:
        """Count one failed attempt against the address and the user name."""
        for kind, key in (("address", address), ("user", name)):
            self.limiter.hit(self.rate, kind, key)


class LabAuth(BasicAuth):
    """dash-auth Basic auth over every route (no public routes), robust to malformed headers.

    Failed attempts are throttled per client address and per user name (429 with
    ``Retry-After``); credentials already verified are not throttled, so an attacker guessing
    a user's password does not lock that user's open session out.
    """

    def __init__(self, app: dash.Dash, users: UserStore, secret_key: str,
                 throttle: Optional[SignInThrottle] = None) -> None:
        self.users = users
        self.throttle = throttle or SignInThrottle()
        super().__init__(app, auth_func=users.check, secret_key=secret_key)

    def _protect(self) -> None:
        @self.app.server.before_request
        def _require_login() -> Optional[flask.Response]:
            try:
                return None if self.is_authorized() else self.login_request()
            except TooManyAttempts as exc:
                resp = flask.jsonify(error=str(exc))
                resp.status_code = 429
                resp.headers["Retry-After"] = str(exc.retry_after)
                return resp

    def is_authorized(self) -> bool:
        """True when the request carries valid Basic credentials (TooManyAttempts if throttled)."""
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
        if not self.users.remembered(name, password):
            address = flask.request.remote_addr or "?"
            wait = self.throttle.retry_after(address, name)
            if wait is not None:
                raise TooManyAttempts(f"too many failed sign-ins; try again in {wait} s", wait)
            if not self.users.check(name, password):
                self.throttle.failed(address, name)
                log.info("failed sign-in for %r from %s", name[:64], address)
                return False
        flask.g.attention_lens_user = name
        return True

    def login_request(self) -> flask.Response:
        """401 with a Basic challenge."""
        resp = flask.jsonify(error="authentication required")
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="Attention Lens", charset="UTF-8"'
        return resp
