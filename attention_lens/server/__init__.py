"""The lab server: the app factory that composes the Dash app with auth, limits and the API.

``create_server(config)`` wraps the Dash app of :func:`attention_lens.server.app.create_app` without
changing it: it builds the model registry from the configuration (:mod:`.config`), adds
authentication from a users file (:mod:`.auth`), request checks and error handlers that never
send a traceback to a client (:mod:`.guards`), and the JSON API blueprint (:mod:`.api`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import dash
import flask
from werkzeug.middleware.proxy_fix import ProxyFix

from .. import export
from ..api_json import JSONProvider
from .auth import LabAuth, SignInThrottle, UserStore, read_users, write_user
from .config import ENV_PREFIX, ConfigError, ServerConfig, check_device, is_loopback
from .exposure import exposure_problem, install_exposure_guard, listening_addresses
from .guards import install_callback_guard, install_error_handlers, install_request_checks
from ..registry import Registry

log = logging.getLogger("attention_lens.server")

__all__ = ["ENV_PREFIX", "ConfigError", "ServerConfig", "build_registry", "create_server",
           "is_loopback", "read_users", "server_from_env", "write_user"]


def build_registry(config: ServerConfig) -> Registry:
    """The model registry described by ``config``."""
    check_device(config.device)
    if config.torch_threads:  # e.g. cores / gunicorn workers, so workers do not oversubscribe
        import torch

        torch.set_num_threads(config.torch_threads)
    return Registry(config.models_dirs, default=config.model, max_models=config.max_models,
                    max_forward=config.cache_size, max_forward_bytes=config.cache_mb << 20,
                    max_tokens=config.max_tokens,
                    device=config.device, user_models=True, cache_dir=config.cache_dir,
                    hf_cache=bool(config.hf_cache))


def build_background(config: ServerConfig) -> Any:
    """The background-callback manager and shared stores described by ``config``."""
    from .. import background

    return background.create(config.cache_dir, config.celery_broker, config.max_jobs,
                             deployment=f"{config.host}:{config.port}{config.url_prefix}")


def create_server(config: Optional[ServerConfig] = None,
                  registry: Optional[Registry] = None) -> dash.Dash:
    """The Dash app with auth, limits, error handlers and the JSON API (``.server`` is Flask).

    ``registry`` replaces the one the configuration describes (for tests and embedding).
    """
    from .api import create_api
    from .app import create_app

    config = config or ServerConfig.from_env()
    registry = registry or build_registry(config)  # folders are validated as it scans
    for entry in registry.entries():
        if entry.error:
            log.warning("model %s is unavailable: %s", entry.name, entry.error)
    bg = build_background(config)
    # under a URL prefix (a proxy path such as /lens/) Dash serves and links every route there
    prefix = {} if config.url_prefix == "/" else {
        "requests_pathname_prefix": config.url_prefix,
        "routes_pathname_prefix": config.url_prefix}
    app = create_app(registry, max_tokens=config.max_tokens, background=bg, **prefix)
    server: flask.Flask = app.server
    server.config["MAX_CONTENT_LENGTH"] = config.max_body
    if config.proxy_hops:  # client addresses (for throttling) from the proxies' headers
        server.wsgi_app = ProxyFix(server.wsgi_app, x_for=config.proxy_hops,  # type: ignore
                                   x_proto=config.proxy_hops)
    server.config["PROPAGATE_EXCEPTIONS"] = False
    server.config["TRAP_HTTP_EXCEPTIONS"] = False
    server.json = JSONProvider(server)  # orjson; keys in insertion order
    server.debug = bool(config.debug)
    server.extensions["attention_lens"] = {"registry": registry, "config": config,
                                           "background": bg}
    # one secret for every web worker (it signs sessions and background-job handles)
    secret = config.secret_key or bg.shared_secret()
    if config.auth_file is not None:
        if not config.auth_file.is_file():
            raise ConfigError(f"users file {config.auth_file} does not exist: create it with "
                              "'attention-lens add-user NAME --auth-file PATH'")
        users = UserStore(config.auth_file, hash_slots=config.hash_slots)
        if users.problem:
            raise ConfigError(f"users file {config.auth_file}: {users.problem}")
        if not users.names():
            raise ConfigError(f"users file {config.auth_file} has no users")
        try:
            throttle = SignInThrottle(config.auth_rate, config.auth_storage)
        except Exception as exc:  # noqa: BLE001 - limits raises several kinds for a bad URI
            raise ConfigError(f"auth_storage {config.auth_storage!r}: {exc}") from None
        app._attention_lens_auth = LabAuth(app, users, secret, throttle)  # keep a reference
    else:
        server.secret_key = secret
    export.configure(config.max_exports, config.export_timeout)
    install_exposure_guard(server, config)
    install_request_checks(server, config.url_prefix)
    install_callback_guard(app, config.url_prefix)
    server.register_blueprint(create_api(registry, config), url_prefix=config.url_prefix + "api")
    install_error_handlers(server, config.url_prefix)
    return app


def server_from_env() -> dash.Dash:
    """The WSGI app ``app.py`` exposes (``gunicorn app:server``), set by ``ATTENTION_LENS_*``.

    Refuses to start when the process already listens beyond loopback in a way the
    configuration forbids (a gunicorn worker does; other servers are checked per request).
    """
    config = ServerConfig.from_env()
    glog = logging.getLogger("gunicorn.error")
    pkg = logging.getLogger("attention_lens")
    if glog.handlers and not pkg.handlers:  # under gunicorn: log through its handlers
        pkg.handlers, pkg.propagate = list(glog.handlers), False
        pkg.setLevel(glog.level or logging.INFO)
    problem = exposure_problem(config, listening_addresses())
    if problem:
        raise ConfigError(problem)
    return create_server(config)
