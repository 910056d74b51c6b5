"""HTTP Basic authentication from a users file of salted password hashes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
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

log = logging.getLogger("attention_lens.server.auth")


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


class SignInUnavailable(Exception):
    """The store that counts failed sign-ins is unreachable: new credentials wait (503)."""

    retry_after = 5


class _Check:
    """One password hash in progress: requests with the same credentials wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.error: Optional[TooManyAttempts] = None


class UserStore:
    """Checks passwords against a users file, re-reading it when it changes.

    The file fails closed: when it is missing, unreadable or malformed nobody signs in (and
    the log says why) until it is fixed. Password hashes are deliberately slow, so at most
    ``hash_slots`` run at once in a process, and an unknown user costs the same hash (against
    a dummy) as a wrong password. Each distinct credential is hashed once at a time: the
    parallel requests of a browser's first page load wait for that one hash instead of
    queueing for their own. A successful check is remembered for ``remember_s`` seconds (as
    a keyed digest, never the password) in a small bounded cache so each request does not
    pay it.
    """

    def __init__(self, path: Path, cache_size: int = 256, hash_slots: int = 1,
                 hash_wait: float = 2.0, remember_s: float = 900.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._version: Optional[tuple[int, int, int]] = None
        self._users: dict[str, str] = {}
        self._problem: Optional[str] = None
        self._key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, float] = OrderedDict()  # digest -> remembered until
        self._checking: dict[bytes, _Check] = {}
        self._cache_size = cache_size
        self._remember_s = remember_s
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

    def _remembered(self, digest: bytes) -> bool:
        """Whether ``digest`` was verified within ``remember_s`` (call with the lock held)."""
        until = self._ok.get(digest)
        if until is None:
            return False
        if until < time.monotonic():
            del self._ok[digest]
            return False
        self._ok.move_to_end(digest)
        return True

    def remembered(self, name: str, password: str) -> bool:
        """True when these credentials were checked recently and the file has not changed."""
        self.reload()
        hashed = self._users.get(name)
        if hashed is None:
            return False
        digest = self._digest(name, password, hashed)
        with self._lock:
            return self._remembered(digest)

    def check(self, name: str, password: str) -> bool:
        """True when ``password`` is ``name``'s password (raises TooManyAttempts when busy)."""
        return self.verify(name, password)[0]

    def verify(self, name: str, password: str) -> tuple[bool, bool]:
        """``(ok, hashed)``: whether the password is right, and whether this call hashed it.

        A call that finds the same credentials being hashed by another request waits for
        that result (``hashed`` is then False: one failure to count, however many requests
        carried it). Raises TooManyAttempts when no hashing slot frees up in time.
        """
        self.reload()
        hashed = self._users.get(name)
        digest = self._digest(name, password, hashed or "")
        with self._lock:
            if hashed is not None and self._remembered(digest):
                return True, False
            pending = self._checking.get(digest)
            if pending is None:
                mine = self._checking[digest] = _Check()
        if pending is not None:
            if not pending.done.wait(self._hash_wait + 60):
                raise TooManyAttempts("too many sign-in attempts at once; try again shortly", 2)
            if pending.error is not None:
                raise TooManyAttempts(str(pending.error), pending.error.retry_after)
            return pending.ok, False
        try:
            if not self._slots.acquire(timeout=self._hash_wait):
                mine.error = TooManyAttempts("too many sign-in attempts at once; try again "
                                             "shortly", 2)
                raise mine.error
            try:
                mine.ok = check_password_hash(hashed or self._dummy, password) and \
                    hashed is not None
            finally:
                self._slots.release()
        finally:
            with self._lock:
                if mine.ok:
                    self._ok[digest] = time.monotonic() + self._remember_s
                    self._ok.move_to_end(digest)
                    while len(self._ok) > self._cache_size:
                        self._ok.popitem(last=False)
                del self._checking[digest]
            mine.done.set()
        return mine.ok, True


def address_key(address: str) -> str:
    """The part of a client address that one machine controls: IPv6 addresses by their /64
    network (a host is commonly given a whole /64), IPv4 and anything else as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class SignInThrottle:
    """Failed sign-ins counted per client address (a moving window), never per account.

    Counting per address keeps a guesser slow without letting anyone lock an account's owner
    out: the owner signs in from her own address whatever is guessed elsewhere. ``rate`` is
    a rate-limit string such as ``10/minute``; ``storage`` a ``limits`` storage URI
    (``memory://`` counts per process; ``redis://host:port`` shares the counts between
    workers and machines).
    """

    def __init__(self, rate: str = "10/minute", storage: str = "memory://") -> None:
        self.rate = parse_limit(rate)
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage))

    def retry_after(self, address: str) -> Optional[int]:
        """Seconds until this address may try again, or None if it may now.

        Raises SignInUnavailable while the counts' store (Redis) cannot be reached: new
        credentials are not checked unthrottled meanwhile.
        """
        key = address_key(address)
        try:
            if self.limiter.test(self.rate, "address", key):
                return None
            stats = self.limiter.get_window_stats(self.rate, "address", key)
        except Exception as exc:  # the storage's own errors (redis, memcached, ...)
            log.warning("sign-in counts unreachable (%s: %s): new sign-ins wait",
                        type(exc).__name__, str(exc)[:200])
            raise SignInUnavailable() from None
        return max(1, math.ceil(stats.reset_time - time.time()))

    def failed(self, address: str) -> None:
        """Count one failed attempt against the address (logged if the store is away)."""
        try:
            self.limiter.hit(self.rate, "address", address_key(address))
        except Exception as exc:  # the storage's own errors (redis, memcached, ...)
            log.warning("a failed sign-in from %s was not counted (%s: %s)", address,
                        type(exc).__name__, str(exc)[:200])


class LabAuth(BasicAuth):
    """dash-auth Basic auth over every route (no public routes), robust to malformed headers.

    Failed attempts are throttled per client address (429 with ``Retry-After``), never per
    user name, so somebody guessing a colleague's password from one address does not lock
    the colleague out anywhere else; credentials already verified are not throttled at all.
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
            except SignInUnavailable as exc:
                resp = flask.jsonify(error="sign-in is unavailable for a moment (the server "
                                     "cannot reach its store); try again shortly")
                resp.status_code = 503
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
            wait = self.throttle.retry_after(address)
            if wait is not None:
                raise TooManyAttempts(f"too many failed sign-ins; try again in {wait} s", wait)
            ok, hashed = self.users.verify(name, password)
            if not ok:
                if hashed:  # one failure however many parallel requests carried it
                    self.throttle.failed(address)
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
