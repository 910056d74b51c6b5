"""Background work: Dash's background-callback manager, a bounded pool of job slots, the store.

One machine (the default, nothing to install): Dash's ``DiskcacheManager`` with each job
in a process forked from a clean job host (:mod:`attention_lens.jobhost`), never from the
web worker; the job slots, locks and weight analyses live in
disk caches under the user's cache folder, shared by every web worker on the machine and
kept across restarts. A lab: ``CeleryManager`` with Redis as broker and result store; jobs
run in ``attention-lens worker`` processes (any number of machines) and everything shared
lives in Redis.

The number of jobs running or queued is bounded by ``max_jobs``: a job takes a slot
(:meth:`Slots.reserve`) before it is started, keeps it alive with a heartbeat while it
runs, and gives it back when it ends; a slot whose job died (a cancelled or killed
process) is given back by the process that watched it (on one machine) or expires within
seconds, and a reservation no job claims goes after :data:`RESERVED_LOCAL_S` seconds on
one machine. A request over the bound is told the server is busy.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

#: Seconds a running job's slot (and a computation's lock) lives without a heartbeat.
STALE_S = 6.0
#: Seconds between heartbeats.
HEARTBEAT_S = 1.0
#: Seconds a reserved slot waits for its job to start (a queue on a busy Celery worker).
RESERVED_S = 300.0
#: Seconds a reserved slot waits for its job on one machine, where the job starts at once
#: (a page's background request follows its reservation within a second).
RESERVED_LOCAL_S = 10.0
#: Seconds a claimed slot waits for its job process to start (the job host may still be
#: building the app when the first job comes).
STARTING_S = 120.0
DEFAULT_MAX_JOBS = 2
PREFIX = "attention-lens:"


def default_cache_dir() -> Path:
    """``ATTENTION_LENS_CACHE_DIR``, else the user's cache folder (``~/.cache/attention-lens``
    on Linux)."""
    from platformdirs import user_cache_dir

    env = os.environ.get("ATTENTION_LENS_CACHE_DIR", "").strip()
    return Path(env) if env else Path(user_cache_dir("attention-lens", appauthor=False))


class BusyError(RuntimeError):
    """Every job slot is taken; the message says so and asks to try again."""

    def __init__(self, max_jobs: int) -> None:
        super().__init__(f"The server is busy: all {max_jobs} background job slots are taken. "
                         "Try again in a few seconds.")
        self.max_jobs = max_jobs


# ------------------------------------------------------------------- shared key-value store
class RedisKV:
    """The few diskcache ``Cache`` methods used here, on Redis (values pickled by us)."""

    def __init__(self, url: str, prefix: str = PREFIX) -> None:
        import redis

        self.url, self.prefix = url, prefix
        self.r = redis.Redis.from_url(url)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` or ``default``."""
        raw = self.r.get(self._k(key))
        return default if raw is None else pickle.loads(raw)  # noqa: S301 - written by us

    def set(self, key: str, value: Any, expire: Optional[float] = None) -> bool:
        """Store ``value`` (for ``expire`` seconds, or for ever)."""
        px = None if expire is None else max(1, int(expire * 1000))
        return bool(self.r.set(self._k(key), pickle.dumps(value), px=px))

    def add(self, key: str, value: Any, expire: Optional[float] = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True if it was stored (atomic)."""
        px = None if expire is None else max(1, int(expire * 1000))
        return bool(self.r.set(self._k(key), pickle.dumps(value), px=px, nx=True))

    def touch(self, key: str, expire: Optional[float] = None) -> bool:
        """Renew the expiry of ``key``; False if it is gone."""
        if expire is None:
            return bool(self.r.persist(self._k(key))) or bool(self.r.exists(self._k(key)))
        return bool(self.r.pexpire(self._k(key), max(1, int(expire * 1000))))

    def delete(self, key: str) -> bool:
        """Remove ``key``."""
        return bool(self.r.delete(self._k(key)))

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the counter ``key`` (created at 0)."""
        # counters are plain Redis integers, not pickles
        return int(self.r.incrby(self._k(key) + ":n", delta))

    def count(self, key: str) -> int:
        """The counter ``key``."""
        raw = self.r.get(self._k(key) + ":n")
        return int(raw) if raw is not None else 0


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by this user only, or check it: a folder
    of another user, or one others can enter, is refused (ConfigError)."""
    import stat

    from .config import ConfigError

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(f"cache folder {path} belongs to another user; choose one of yours "
                          "with --cache-dir")
    if stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)  # ours: made private (an older version created it 0755)
    return path


def private_files(path: Path) -> None:
    """Make every file directly in ``path`` readable and writable by this user only."""
    for f in path.iterdir():
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o077:
            f.chmod(0o600)


def _disk(path: Path, **settings: Any) -> Any:
    import diskcache

    private_dir(path.parent)
    private_dir(path)
    old = os.umask(0o077)  # SQLite files (the signing secret lives in one) private from birth
    try:
        cache = diskcache.Cache(str(path), **settings)
    finally:
        os.umask(old)
    private_files(path)
    return cache


class DiskKV:
    """A diskcache ``Cache`` with the counter helpers :class:`RedisKV` has."""

    def __init__(self, path: Path, **settings: Any) -> None:
        self.cache = _disk(path, **settings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` or ``default``."""
        return self.cache.get(key, default)

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the counter ``key`` (created at 0)."""
        return int(self.cache.incr(key + ":n", delta, default=0))

    def count(self, key: str) -> int:
        """The counter ``key``."""
        return int(self.cache.get(key + ":n", 0))


# -------------------------------------------------------------------------- job slots
class Slots:
    """At most ``n`` jobs running or queued, counted in a store shared by every process.

    ``scope`` names the deployment (two servers sharing a store keep their own slots);
    ``reserved_s`` is how long a reservation waits for its job before it is released.
    """

    def __init__(self, kv: Any, n: int, scope: str = "", reserved_s: float = RESERVED_S
                 ) -> None:
        if n < 1:
            raise ValueError("max_jobs must be at least 1")
        self.kv, self.n, self.scope, self.reserved_s = kv, n, scope, reserved_s

    def _key(self, i: int) -> str:
        return f"slot:{self.scope}:{i}" if self.scope else f"slot:{i}"

    def reserve(self, label: str = "") -> Optional[str]:
        """A new job's token, holding a free slot until the job starts; None when all are taken."""
        token = secrets.token_urlsafe(18)
        for i in range(self.n):
            if self.kv.add(self._key(i), {"token": token, "label": label, "state": "queued",
                                          "t": time.time()}, expire=self.reserved_s):
                return token
        return None

    def claim(self, token: str, expire: float = STARTING_S) -> bool:
        """Keep the reservation ``token`` while its job process starts (the job's own
        heartbeat takes over); False if it has expired."""
        i = self._find(token)
        if i is None:
            return False
        held = self.kv.get(self._key(i))
        if not isinstance(held, dict) or held.get("token") != token:
            return False
        self.kv.set(self._key(i), {**held, "state": "starting", "t": time.time()},
                    expire=expire)
        return True

    def release_pid(self, pid: int) -> None:
        """Give back any slot held by the job process ``pid`` (it ended)."""
        for i in range(self.n):
            held = self.kv.get(self._key(i))
            if isinstance(held, dict) and held.get("pid") == pid:
                self.kv.delete(self._key(i))

    def _find(self, token: str) -> Optional[int]:
        for i in range(self.n):
            held = self.kv.get(self._key(i))
            if isinstance(held, dict) and held.get("token") == token:
                return i
        return None

    def release(self, token: str) -> None:
        """Give back the slot ``token`` holds (nothing if it has none)."""
        i = self._find(token)
        if i is not None:
            self.kv.delete(self._key(i))

    def active(self) -> list[dict[str, Any]]:
        """The slots taken now (queued or running jobs)."""
        out = []
        for i in range(self.n):
            held = self.kv.get(self._key(i))
            if isinstance(held, dict):
                out.append(held)
        return out

    @contextmanager
    def hold(self, token: Optional[str], label: str = "") -> Iterator[bool]:
        """Run a job in the slot ``token`` reserved (yields False if it has none).

        A heartbeat keeps the slot while the job runs; if the process dies the slot expires
        within :data:`STALE_S` seconds.
        """
        i = self._find(token) if token else None
        if i is None:
            yield False
            return
        key = self._key(i)
        self.kv.set(key, {"token": token, "label": label, "state": "running",
                          "pid": os.getpid(), "t": time.time()}, expire=STALE_S)
        with heartbeat(self.kv, key):
            try:
                yield True
            finally:
                self.kv.delete(key)

    @contextmanager
    def job(self, label: str = "") -> Iterator[None]:
        """Take a slot now and run in it (raises :class:`BusyError` when all are taken)."""
        token = self.reserve(label)
        if token is None:
            raise BusyError(self.n)
        with self.hold(token, label) as ok:
            if not ok:  # pragma: no cover - expired between two lines
                raise BusyError(self.n)
            yield


@contextmanager
def heartbeat(kv: Any, key: str, every: float = HEARTBEAT_S, ttl: float = STALE_S
              ) -> Iterator[None]:
    """Renew ``key``'s expiry every ``every`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                kv.touch(key, expire=ttl)
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the job
                log.warning("heartbeat of %s failed", key, exc_info=True)

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{key}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 1)


# ------------------------------------------------------------------------ the background
@dataclass
class Background:
    """The background-callback manager and the stores every process of a deployment shares."""

    manager: Any
    kv: Any  # slots, locks, counters, the signing secret
    results: Any  # weight analyses
    max_jobs: int = DEFAULT_MAX_JOBS
    cache_dir: Optional[Path] = None
    celery_broker: Optional[str] = None
    celery_app: Any = None
    deployment: str = ""
    slots: Slots = field(init=False)

    def __post_init__(self) -> None:
        # one machine: slots keyed by the deployment (servers may share a cache folder); a
        # lab's Redis database is its own, and its workers need not know the web address
        self.slots = (Slots(self.kv, self.max_jobs) if self.celery_broker else
                      Slots(self.kv, self.max_jobs, self.deployment, RESERVED_LOCAL_S))

    @property
    def kind(self) -> str:
        """``"celery"`` or ``"diskcache"``."""
        return "celery" if self.celery_broker else "diskcache"

    def shared_secret(self) -> str:
        """A secret every web worker of the deployment agrees on (signs sessions and jobs)."""
        self.kv.add("secret", secrets.token_hex(32))
        return str(self.kv.get("secret"))


def make_celery(broker: str) -> Any:
    """The Celery app of a deployment: Redis (``broker``) as broker and result store."""
    from celery import Celery

    app = Celery("attention_lens", broker=broker, backend=broker)
    app.conf.update(worker_prefetch_multiplier=1, task_acks_late=False,
                    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    return app


def create(cache_dir: Optional[Path | str] = None, celery_broker: Optional[str] = None,
           max_jobs: int = DEFAULT_MAX_JOBS, results_size: int = 4 * 2**30,
           deployment: Optional[str] = None) -> Background:
    """The background of a deployment: disk caches under ``cache_dir``, or Celery + Redis.

    On one machine, jobs run in processes forked from a clean job host
    (:class:`attention_lens.jobhost.JobManager`). On the default cache folder,
    ``deployment`` (e.g. ``host:port/``) keys the job slots, so two servers started without
    a cache folder do not share slots; servers given the same folder share them.
    """
    from dash import CeleryManager

    from .jobhost import JobManager

    if celery_broker:
        celery_app = make_celery(celery_broker)
        return Background(CeleryManager(celery_app), RedisKV(celery_broker),
                          RedisKV(celery_broker, PREFIX + "results:"), max_jobs,
                          None, celery_broker, celery_app)
    explicit = bool(cache_dir) or bool(os.environ.get("ATTENTION_LENS_CACHE_DIR", "").strip())
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    # servers given one cache folder share its slots (one bound for all of them); servers on
    # the default folder (two ``python app.py`` on one machine) each have their own
    deployment = "" if explicit else (deployment or "")
    # Dash's job results, and the coordination keys, are never evicted; analyses are
    # bounded in size (least recently used go first)
    bg: Optional[Background] = None
    manager = JobManager(_disk(root / "callbacks", eviction_policy="none"),
                         slots=lambda: bg.slots if bg is not None else None)
    bg = Background(manager, DiskKV(root / "coord", eviction_policy="none"),
                    DiskKV(root / "analyses", size_limit=results_size,
                           eviction_policy="least-recently-used"),
                    max_jobs, root, deployment=deployment or "")
    return bg


_CURRENT: Optional[Background] = None
_LOCK = threading.Lock()


def current() -> Background:
    """The background installed for this process (the default one at first use)."""
    global _CURRENT
    with _LOCK:
        if _CURRENT is None:
            _CURRENT = create()
        return _CURRENT


def install(bg: Background) -> Background:
    """Make ``bg`` the background this process's pages, API and jobs use."""
    global _CURRENT
    with _LOCK:
        _CURRENT = bg
    return bg
