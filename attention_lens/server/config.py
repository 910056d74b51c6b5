"""The server configuration: command-line flags and ``ATTENTION_LENS_*`` environment variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from ..paths import ConfigError
from ..registry import DEFAULT_MODEL, DEFAULT_WEIGHTS

ENV_PREFIX = "ATTENTION_LENS_"
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


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
    cache_mb: int = 640
    max_body: int = 1 << 20
    secret_key: Optional[str] = None
    torch_threads: Optional[int] = None
    auth_rate: str = "10/minute"
    auth_storage: str = "memory://"
    hash_slots: int = 1
    proxy_hops: int = 0
    max_exports: int = 2
    export_timeout: int = 120
    cache_dir: Optional[Path] = None
    celery_broker: Optional[str] = None
    max_jobs: int = 2
    #: List the models of the user's Hugging Face cache; None: on for ``python app.py`` and
    #: ``attention-lens serve``, off under gunicorn.
    hf_cache: Optional[bool] = None

    def __post_init__(self) -> None:
        self.models_dirs = [Path(d) for d in self.models_dirs]
        self.auth_file = Path(self.auth_file) if self.auth_file else None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None
        self.celery_broker = self.celery_broker or None
        self.url_prefix = normalize_prefix(self.url_prefix)
        for name, minimum in (("port", 0), ("max_models", 1), ("cache_size", 1),
                              ("cache_mb", 16), ("max_body", 1024), ("hash_slots", 1),
                              ("proxy_hops", 0), ("max_exports", 1), ("export_timeout", 1),
                              ("max_jobs", 1)):
            if int(getattr(self, name)) < minimum:
                raise ConfigError(f"{name} must be at least {minimum}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("torch_threads must be at least 1")
        try:
            from limits import parse

            parse(self.auth_rate)
        except ValueError:
            raise ConfigError(f"auth_rate {self.auth_rate!r}: expected a rate such as "
                              "10/minute") from None

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
            if f.name in {"debug", "allow_anonymous", "hf_cache"}:
                values[f.name] = _parse_bool(raw, key)
            elif f.name in {"port", "max_models", "cache_size", "cache_mb", "max_body",
                            "hash_slots", "proxy_hops", "max_exports", "export_timeout",
                            "max_jobs"}:
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
        """Refuse to listen on ``hosts`` (default: ``host``) if unsafe for this configuration.

        A non-loopback address needs a users file (or ``allow_anonymous``); debug mode is
        refused on anything but loopback.
        """
        problem = exposure_problem(self, hosts or [self.host])
        if problem:
            raise ConfigError(problem)


def exposure_problem(config: "ServerConfig", addresses: list[str]) -> Optional[str]:
    """Why serving on ``addresses`` with ``config`` is unsafe, or None."""
    exposed = sorted({a for a in addresses if not is_loopback(a)})
    if not exposed:
        return None
    if config.debug:
        return (f"refusing debug mode on {', '.join(exposed)}: debug mode is for loopback "
                "only (127.0.0.1)")
    if config.auth_file is None and not config.allow_anonymous:
        return (f"refusing to listen on {', '.join(exposed)} without authentication: create a "
                "users file with 'attention-lens add-user NAME' and set --auth-file (or "
                f"{ENV_PREFIX}AUTH_FILE), or set --allow-anonymous ({ENV_PREFIX}ALLOW_ANONYMOUS"
                "=1) to serve everyone")
    return None


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
