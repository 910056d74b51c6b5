"""The lab server: configuration, HTTP Basic auth, body limits, error handling, the JSON API.

``create_server(config)`` wraps the Dash app of :func:`attention_lens.app.create_app` without
changing it: it builds the model registry from the configuration, adds authentication from a
users file of salted password hashes, a request body size limit, error handlers that never
send a traceback to a client, and the JSON API blueprint (:mod:`attention_lens.api`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import secrets
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import dash
import flask
from dash_auth import BasicAuth
from werkzeug.exceptions import HTTPException
from werkzeug.security import check_password_hash, generate_password_hash

from .analysis.errors import AnalysisError
from .registry import DEFAULT_MODEL, DEFAULT_WEIGHTS, Registry

log = logging.getLogger("attention_lens.server")

ENV_PREFIX = "ATTENTION_LENS_"
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
DASH_CALLBACK_PATH = "_dash-update-component"


class ConfigError(ValueError):
    """A configuration value is invalid or unsafe (the message says which and why)."""


def _parse_bool(value: str, name: str) -> bool:
    low = value.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{ENV_PREFIX}{name}: expected true/false, got {value!r}")


def _parse_int(value: str, name: str, minimum: int = 0) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}: expected an integer, got {value!r}") from None
    if n < minimum:
        raise ConfigError(f"{ENV_PREFIX}{name}: must be at least {minimum}, got {n}")
    return n


def normalize_prefix(prefix: Optional[str]) -> str:
    """A URL path prefix as Dash wants it: '/' or '/a/b/' (leading and trailing slash)."""
    if not prefix or prefix.strip("/") == "":
        return "/"
    if any(c in prefix for c in "?#% \t\n\\"):
        raise ConfigError(f"url prefix {prefix!r} must be a plain path like /lens/")
    return "/" + prefix.strip("/") + "/"


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name or an unparseable address: assume it is reachable


@dataclass
class ServerConfig:
    """Everything the server needs; built from command-line arguments or environment variables.

    Each field ``x`` can be set with the environment variable ``ATTENTION_LENS_X``
    (``models_dirs`` is a ``os.pathsep``-separated list).
    """

    host: str = "127.0.0.1"
    port: int = 8050
    model: str = DEFAULT_MODEL
    models_dirs: list[Path] = field(default_factory=lambda: [DEFAULT_WEIGHTS])
    max_tokens: Optional[int] = None
    auth_file: Optional[Path] = None
    url_prefix: str = "/"
    debug: bool = False
    allow_anonymous: bool = False
    device: str = "cpu"
    max_models: int = 2
    cache_size: int = 64
    max_body: int = 1 << 20
    secret_key: Optional[str] = None
    torch_threads: Optional[int] = None
    cache_dir: Optional[Path] = None
    celery_broker: Optional[str] = None
    max_jobs: int = 2

    def __post_init__(self) -> None:
        self.models_dirs = [Path(d) for d in self.models_dirs]
        self.auth_file = Path(self.auth_file) if self.auth_file else None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None
        self.celery_broker = self.celery_broker or None
        self.url_prefix = normalize_prefix(self.url_prefix)
        for name, minimum in (("port", 0), ("max_models", 1), ("cache_size", 1),
                              ("max_body", 1024), ("max_jobs", 1)):
            if int(getattr(self, name)) < minimum:
                raise ConfigError(f"{name} must be at least {minimum}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("torch_threads must be at least 1")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "ServerConfig":
        """The configuration from ``ATTENTION_LENS_*`` variables, then ``overrides`` on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            key = f.name.upper()
            if f.name in {"debug", "allow_anonymous"}:
                values[f.name] = _parse_bool(raw, key)
            elif f.name in {"port", "max_models", "cache_size", "max_body", "max_jobs"}:
                values[f.name] = _parse_int(raw, key)
            elif f.name in {"max_tokens", "torch_threads"}:
                values[f.name] = _parse_int(raw, key, 1) if raw.strip() else None
            elif f.name == "models_dirs":
                values[f.name] = [Path(p) for p in raw.split(os.pathsep) if p.strip()]
            elif f.name in {"auth_file", "cache_dir"}:
                values[f.name] = Path(raw) if raw.strip() else None
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def check_exposure(self, hosts: Optional[list[str]] = None) -> None:
        """Refuse to serve a non-loopback address without a users file (unless allowed)."""
        exposed = [h for h in (hosts or [self.host]) if not is_loopback(h)]
        if exposed and self.auth_file is None and not self.allow_anonymous:
            raise ConfigError(
                f"refusing to listen on {', '.join(exposed)} without authentication: create a "
                "users file with 'attention-lens add-user NAME' and pass --auth-file "
                f"(or {ENV_PREFIX}AUTH_FILE), or pass --allow-anonymous to serve everyone")


# ------------------------------------------------------------------------------ users file
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


# ---------------------------------------------------------------------------- error handling
def _json_error(message: str, status: int) -> flask.Response:
    resp = flask.jsonify(error=message)
    resp.status_code = status
    return resp


def _wants_json(prefix: str) -> bool:
    path = flask.request.path
    return path.startswith(prefix + "api/") or path.startswith(prefix + "_dash-") or \
        flask.request.is_json


def _install_error_handlers(server: flask.Flask, prefix: str) -> None:
    @server.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if exc.code == 413:
            limit = server.config.get("MAX_CONTENT_LENGTH")
            return _json_error(f"request body too large (limit {limit} bytes)", 413)
        if _wants_json(prefix) and exc.code is not None and exc.code >= 400:
            message = exc.description or exc.name
            if exc.code == 400 and "JSON" in (message or ""):
                message = "malformed JSON in the request body"
            return _json_error(message, exc.code)
        return exc

    @server.errorhandler(AnalysisError)
    def _bad_input(exc: AnalysisError) -> Any:
        return _json_error(str(exc), 400)  # its message is written for the user

    @server.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if isinstance(exc, HTTPException):  # pragma: no cover - handled above
            return _http_error(exc)
        log.exception("unhandled error on %s %s", flask.request.method, flask.request.path)
        return _json_error("internal server error (it has been logged on the server)", 500)


def _is_list_of_dicts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _install_callback_guard(app: dash.Dash, prefix: str) -> None:
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
            return _json_error("malformed JSON in the callback request", 400)
        if not isinstance(body, dict):
            return _json_error("the callback request must be a JSON object", 400)
        output = body.get("output")
        if not isinstance(output, str) or output not in app.callback_map:
            return _json_error("unknown callback output", 400)
        if not isinstance(body.get("outputs"), (dict, list)):
            return _json_error("the callback request needs 'outputs'", 400)
        for key in ("inputs", "state"):
            value = body.get(key, [])
            if not isinstance(value, list) or not all(
                    isinstance(v, dict) or _is_list_of_dicts(v) for v in value):
                return _json_error(f"the callback request's {key!r} must be a list", 400)
        changed = body.get("changedPropIds", [])
        if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
            return _json_error("the callback request's 'changedPropIds' must be a list", 400)
        return None


# ------------------------------------------------------------------------------ the factory
def build_registry(config: ServerConfig) -> Registry:
    """The model registry described by ``config``."""
    check_device(config.device)
    if config.torch_threads:  # e.g. cores / gunicorn workers, so workers do not oversubscribe
        import torch

        torch.set_num_threads(config.torch_threads)
    return Registry(config.models_dirs, default=config.model, max_models=config.max_models,
                    max_forward=config.cache_size, max_tokens=config.max_tokens,
                    device=config.device)


def build_background(config: ServerConfig) -> Any:
    """The background-callback manager and shared stores described by ``config``."""
    from . import background

    return background.create(config.cache_dir, config.celery_broker, config.max_jobs)


def check_device(device: str) -> None:
    """Refuse a torch device this machine cannot use (``--device cuda`` without a GPU)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a torch device (use cpu, cuda or cuda:N)"
                          ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is available to torch here; "
                          "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible")


def _create_dash_app(registry: Registry, config: ServerConfig,
                     create_app: Optional[Callable[..., dash.Dash]] = None,
                     background: Any = None) -> dash.Dash:
    """Call the app factory with the options it accepts."""
    if create_app is None:
        from .app import create_app

    params = inspect.signature(create_app).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    options: dict[str, Any] = {}
    wanted = {"url_base_pathname": config.url_prefix, "max_tokens": config.max_tokens,
              "background": background}
    if config.url_prefix != "/":
        wanted["requests_pathname_prefix"] = config.url_prefix
        wanted["routes_pathname_prefix"] = config.url_prefix
    for key, value in wanted.items():
        if key in params or accepts_any:
            options[key] = value
    if config.url_prefix != "/" and not ({"url_base_pathname", "requests_pathname_prefix"}
                                         & set(options)):
        raise ConfigError("this app version cannot be served under a URL prefix")
    if "requests_pathname_prefix" in options and "url_base_pathname" in options:
        del options["url_base_pathname"]  # Dash accepts one or the other
    if config.url_prefix == "/":
        options.pop("url_base_pathname", None)
        options.pop("requests_pathname_prefix", None)
        options.pop("routes_pathname_prefix", None)
    return create_app(registry, **options)


def create_server(config: Optional[ServerConfig] = None, registry: Optional[Registry] = None,
                  app_factory: Optional[Callable[..., dash.Dash]] = None) -> dash.Dash:
    """The Dash app with auth, limits, error handlers and the JSON API (``.server`` is Flask).

    ``registry`` replaces the one the configuration describes and ``app_factory`` replaces
    :func:`attention_lens.app.create_app` (both for tests and embedding).
    """
    from .api import create_api

    config = config or ServerConfig.from_env()
    registry = registry or build_registry(config)  # folders are validated as it scans
    for entry in registry.entries():
        if entry.error:
            log.warning("model %s is unavailable: %s", entry.name, entry.error)
    bg = build_background(config)
    app = _create_dash_app(registry, config, app_factory, bg)
    server: flask.Flask = app.server
    server.config["MAX_CONTENT_LENGTH"] = config.max_body
    server.config["PROPAGATE_EXCEPTIONS"] = False
    server.config["TRAP_HTTP_EXCEPTIONS"] = False
    server.json.sort_keys = False  # type: ignore[attr-defined]
    server.debug = bool(config.debug)
    server.extensions["attention_lens"] = {"registry": registry, "config": config,
                                           "background": bg}
    # one secret for every web worker (it signs sessions and background-job handles)
    secret = config.secret_key or bg.shared_secret()
    if config.auth_file is not None:
        if not config.auth_file.is_file():
            raise ConfigError(f"users file {config.auth_file} does not exist: create it with "
                              "'attention-lens add-user NAME --auth-file PATH'")
        users = UserStore(config.auth_file)
        if not users.names():
            raise ConfigError(f"users file {config.auth_file} has no users")
        app._attention_lens_auth = LabAuth(app, users, secret)  # keep a reference
    else:
        server.secret_key = secret
    _install_callback_guard(app, config.url_prefix)
    server.register_blueprint(create_api(registry, config), url_prefix=config.url_prefix + "api")
    _install_error_handlers(server, config.url_prefix)
    return app


# ----------------------------------------------------------------------------- gunicorn
def _bind_host(bind: str) -> Optional[str]:
    """The host of a gunicorn bind ('0.0.0.0:8050', '[::1]:80', 'unix:/x' -> None)."""
    if bind.startswith(("unix:", "fd://")):
        return None
    if bind.startswith("["):
        return bind[1:].split("]", 1)[0]
    return bind.rsplit(":", 1)[0] if ":" in bind else bind


def gunicorn_hosts(argv: Optional[list[str]] = None,
                   env: Optional[Mapping[str, str]] = None) -> list[str]:
    """The hosts gunicorn was told to bind (command line and GUNICORN_CMD_ARGS); [] if none."""
    import shlex

    from gunicorn.config import Config

    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    cfg = Config()
    args = shlex.split(env.get("GUNICORN_CMD_ARGS", "")) + list(argv[1:])
    ns, _ = cfg.parser().parse_known_args(args)
    binds = getattr(ns, "bind", None) or cfg.bind
    return [h for h in (_bind_host(b) for b in binds) if h is not None]


def server_from_env() -> dash.Dash:
    """The server ``app.py`` exposes to gunicorn, configured by ``ATTENTION_LENS_*`` variables."""
    config = ServerConfig.from_env()
    under_gunicorn = "gunicorn" in Path(sys.argv[0] if sys.argv else "").name
    if under_gunicorn:
        glog = logging.getLogger("gunicorn.error")
        pkg = logging.getLogger("attention_lens")
        if glog.handlers and not pkg.handlers:
            pkg.handlers, pkg.propagate = list(glog.handlers), False
            pkg.setLevel(glog.level or logging.INFO)
        config.check_exposure(gunicorn_hosts())
    return create_server(config)
