"""Background work: Dash's background-callback manager, a bounded pool of job slots, the store.

One machine (the default, nothing to install): Dash's ``DiskcacheManager`` with each job
in a process forked from a clean job host (:mod:`attention_lens.jobhost`), never from the
web worker; the job slots, locks and weight analyses live in
disk caches under the user's cache folder, shared by every web worker on the machine and
kept across restarts. A lab: ``CeleryManager`` with Redis as broker and result store; jobs
run in ``attention-lens worker`` processes (any number of machines) and everything shared
lives in Redis.

The number of jobs running or queued is bounded by ``max_jobs``: a job takes a slot
(:meth:`Slots.reserve`, a token-owned lock in the store: redis-py's ``Lock`` in a lab) before
it is started, renews it while it runs, and gives it back when it ends; a slot whose job
died (a cancelled or killed process) is given back by the process that watched it (on one
machine) or expires within seconds, and a reservation no job claims goes after
:data:`RESERVED_LOCAL_S` seconds on one machine. A request over the bound is told the server
is busy. Celery's own concurrency bounds the jobs a worker runs, not those queued, and cannot
refuse a request, so the bound is kept here, at admission.

A lab survives its parts failing (see the README's fault table): Celery acknowledges a task
only when it ends and puts it back when its pool child dies; a page polling a job whose
whole worker died has it sent to the other workers (:func:`lab_manager`), and a job that
cannot finish is reported to its page; while Redis is unreachable the store raises
:class:`StoreUnavailable` (the API answers 503 + Retry-After) and everything resumes when it
is back; the signing secret lives in a private file, not in Redis.
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
from typing import Any, Callable, Iterator, Optional

from .analysis.errors import AnalysisError
from .cache import RETRY_AFTER_S, StoreUnavailable, patiently  # noqa: F401 - this module's interface
from .paths import ConfigError, default_cache_dir  # noqa: F401 - part of this module's interface

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


class BusyError(RuntimeError):
    """Every job slot is taken; the message says so and asks to try again."""

    def __init__(self, max_jobs: int) -> None:
        super().__init__(f"The server is busy: all {max_jobs} background job slots are taken. "
                         "Try again in a few seconds.")
        self.max_jobs = max_jobs


# ------------------------------------------------------------------- shared key-value store
#: Seconds a Redis command may wait for a connection or an answer before the store counts
#: as unreachable.
REDIS_TIMEOUT_S = 3.0
#: Seconds a job on a Celery worker waits for an unreachable Redis before it fails.
JOB_STORE_PATIENCE_S = 60.0


def store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the store (Redis) is unreachable", from every client used."""
    errors: list[type[BaseException]] = [StoreUnavailable]
    try:
        import redis

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                   redis.exceptions.BusyLoadingError]
    except ImportError:  # pragma: no cover - one-machine install without redis
        pass
    try:
        from kombu.exceptions import OperationalError

        errors.append(OperationalError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def redis_client(url: str) -> Any:
    """A redis-py client that gives up on an unreachable server within seconds."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                socket_connect_timeout=REDIS_TIMEOUT_S,
                                health_check_interval=10)


class RedisKV:
    """The few diskcache ``Cache`` methods used here, on Redis (values pickled by us).

    A command that meets a broken connection (Redis restarted) is tried once more on a fresh
    one; an unreachable Redis raises :class:`StoreUnavailable` within seconds.
    """

    def __init__(self, url: str, prefix: str = PREFIX, patience: float = 0.0) -> None:
        self.url, self.prefix = url, prefix
        #: Seconds a command keeps trying while Redis is unreachable (0 in a web worker, which
        #: answers 503 at once; a job waits for Redis to come back rather than fail).
        self.patience = patience
        self.r = redis_client(url)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _do(self, command: str, *args: Any, **kwargs: Any) -> Any:
        return patiently(lambda: getattr(self.r, command)(*args, **kwargs), self.patience)

    def _do_call(self, fn: Callable[[], Any]) -> Any:
        return patiently(fn, self.patience)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` or ``default``."""
        raw = self._do("get", self._k(key))
        return default if raw is None else pickle.loads(raw)  # noqa: S301 - written by us

    def set(self, key: str, value: Any, expire: Optional[float] = None) -> bool:
        """Store ``value`` (for ``expire`` seconds, or for ever)."""
        px = None if expire is None else max(1, int(expire * 1000))
        return bool(self._do("set", self._k(key), pickle.dumps(value), px=px))

    def add(self, key: str, value: Any, expire: Optional[float] = None) -> bool:
        """Store ``value`` only if ``key`` is absent; True if it was stored (atomic)."""
        px = None if expire is None else max(1, int(expire * 1000))
        return bool(self._do("set", self._k(key), pickle.dumps(value), px=px, nx=True))

    def touch(self, key: str, expire: Optional[float] = None) -> bool:
        """Renew the expiry of ``key``; False if it is gone."""
        if expire is None:
            return bool(self._do("persist", self._k(key))) or \
                bool(self._do("exists", self._k(key)))
        return bool(self._do("pexpire", self._k(key), max(1, int(expire * 1000))))

    def delete(self, key: str) -> bool:
        """Remove ``key``."""
        return bool(self._do("delete", self._k(key)))

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the counter ``key`` (created at 0)."""
        # counters are plain Redis integers, not pickles
        return int(self._do("incrby", self._k(key) + ":n", delta))

    def count(self, key: str) -> int:
        """The counter ``key``."""
        raw = self._do("get", self._k(key) + ":n")
        return int(raw) if raw is not None else 0

    def keys(self, pattern: str) -> list[str]:
        """The keys matching ``pattern`` (a glob, without the prefix), prefix removed."""
        n = len(self.prefix)
        return [k.decode()[n:] for k in self._do("keys", self._k(pattern))]


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by this user only, or check it: a folder
    of another user, or one others can enter, is refused (ConfigError)."""
    import stat


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
class _RedisSlotLock:
    """Slot ``key`` as redis-py's ``Lock``: its value is the holder's token, and taking,
    renewing and giving it back are single atomic commands (``SET NX PX`` and the lock's Lua
    scripts) that act only for the token holding it. The token travels with the job (the
    web worker reserves, a Celery worker runs), so any process holding it owns the slot."""

    def __init__(self, kv: "RedisKV") -> None:
        self.kv = kv

    def _lock(self, key: str, token: str, ttl: float) -> Any:
        lock = self.kv.r.lock(self.kv._k(key), timeout=ttl, thread_local=False)
        lock.local.token = token.encode()
        return lock

    def take(self, key: str, token: str, ttl: float) -> bool:
        lock = self.kv.r.lock(self.kv._k(key), timeout=ttl, thread_local=False)
        return bool(self.kv._do_call(lambda: lock.acquire(blocking=False, token=token)))

    def renew(self, key: str, token: str, ttl: float) -> bool:
        from redis.exceptions import LockError

        lock = self._lock(key, token, ttl)
        try:
            return bool(self.kv._do_call(lambda: lock.extend(ttl, replace_ttl=True)))
        except LockError:  # expired, or another job's now
            return False

    def drop(self, key: str, token: str) -> bool:
        from redis.exceptions import LockError

        lock = self._lock(key, token, 1.0)
        try:
            self.kv._do_call(lock.release)
            return True
        except LockError:
            return False

    def holder(self, key: str) -> Optional[str]:
        raw = self.kv._do("get", self.kv._k(key))
        return raw.decode() if isinstance(raw, bytes) else None


class _DiskSlotLock:
    """Slot ``key`` in a diskcache ``Cache``, with the same token rules as redis-py's lock:
    taken with the atomic ``add``; renewed and given back inside one SQLite transaction
    (``transact``) that first checks the token. (diskcache's own ``Lock`` has no owner: its
    ``release`` deletes whatever holds the key, and its ``acquire`` cannot fail fast.)"""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def take(self, key: str, token: str, ttl: float) -> bool:
        return bool(self.cache.add(key, token, expire=ttl, retry=True))

    def renew(self, key: str, token: str, ttl: float) -> bool:
        with self.cache.transact(retry=True):
            return self.cache.get(key) == token and bool(self.cache.touch(key, expire=ttl))

    def drop(self, key: str, token: str) -> bool:
        with self.cache.transact(retry=True):
            return self.cache.get(key) == token and bool(self.cache.delete(key))

    def holder(self, key: str) -> Optional[str]:
        value = self.cache.get(key)
        return value if isinstance(value, str) else None


class Slots:
    """At most ``n`` jobs running or queued, counted in a store shared by every process.

    Slot ``i`` is a lock in the store whose value is the token of the job holding it
    (redis-py's ``Lock`` in a lab; the same token rules on diskcache on one machine): only
    the token's holder renews or gives it back, so a slot that expired and went to another
    job is never renewed or freed by the first. The token is handed on with the job: a
    page's callback reserves (:meth:`reserve`, expiring after ``reserved_s`` unless its job
    starts), the job process that runs it holds it (:meth:`hold`, renewed every
    :data:`HEARTBEAT_S` seconds and expiring :data:`STALE_S` seconds after its holder is
    killed). Beside each slot, ``<slot>:who`` describes its job (label, state, pid) for
    :meth:`active` and :meth:`release_pid`; it never decides who holds a slot.

    ``scope`` names the deployment (two servers sharing a store keep their own slots).
    """

    def __init__(self, kv: Any, n: int, scope: str = "", reserved_s: float = RESERVED_S
                 ) -> None:
        if n < 1:
            raise ValueError("max_jobs must be at least 1")
        self.kv, self.n, self.scope, self.reserved_s = kv, n, scope, reserved_s
        self.locks = (_RedisSlotLock(kv) if isinstance(kv, RedisKV) else
                      _DiskSlotLock(getattr(kv, "cache", kv)))

    def _key(self, i: int) -> str:
        return f"slot:{self.scope}:{i}" if self.scope else f"slot:{i}"

    def _describe(self, i: int, token: str, ttl: float, **info: Any) -> None:
        self.kv.set(self._key(i) + ":who", {"token": token, "t": time.time(), **info},
                    expire=ttl)

    def reserve(self, label: str = "") -> Optional[str]:
        """A new job's token, holding a free slot until the job starts; None when all are taken."""
        token = secrets.token_urlsafe(18)
        for i in range(self.n):
            if self.locks.take(self._key(i), token, self.reserved_s):
                self._describe(i, token, self.reserved_s, label=label, state="queued")
                return token
        return None

    def claim(self, token: str, expire: float = STARTING_S) -> bool:
        """Keep the reservation ``token`` while its job process starts (the job's own
        heartbeat takes over); False if it has expired."""
        return self.keep(token, expire, state="starting")

    def keep(self, token: Optional[str], expire: float, state: str = "queued",
             label: str = "") -> bool:
        """Renew the slot ``token`` holds for ``expire`` seconds; False if it holds none."""
        i = self._find(token) if token else None
        if i is None or not self.locks.renew(self._key(i), str(token), expire):
            return False
        who = self.kv.get(self._key(i) + ":who")
        label = who.get("label", label) if isinstance(who, dict) else label
        self._describe(i, str(token), expire, label=label, state=state)
        return True

    def take(self, token: str, label: str, expire: float) -> bool:
        """Take a free slot for an existing ``token`` (a job run again keeps its place)."""
        for i in range(self.n):
            if self.locks.take(self._key(i), token, expire):
                self._describe(i, token, expire, label=label, state="queued")
                return True
        return False

    def release_pid(self, pid: int) -> None:
        """Give back any slot held by the job process ``pid`` (it ended)."""
        for i in range(self.n):
            who = self.kv.get(self._key(i) + ":who")
            if isinstance(who, dict) and who.get("pid") == pid and who.get("token"):
                self._drop(i, str(who["token"]))

    def _find(self, token: str) -> Optional[int]:
        for i in range(self.n):
            if self.locks.holder(self._key(i)) == token:
                return i
        return None

    def _drop(self, i: int, token: str) -> None:
        if self.locks.drop(self._key(i), token):
            self.kv.delete(self._key(i) + ":who")

    def release(self, token: str) -> None:
        """Give back the slot ``token`` holds (nothing if it has none)."""
        i = self._find(token)
        if i is not None:
            self._drop(i, token)

    def active(self) -> list[dict[str, Any]]:
        """The slots taken now (queued or running jobs)."""
        out = []
        for i in range(self.n):
            token = self.locks.holder(self._key(i))
            if token is None:
                continue
            who = self.kv.get(self._key(i) + ":who")
            out.append(who if isinstance(who, dict) and who.get("token") == token else
                       {"token": token, "label": "", "state": "queued"})
        return out

    @contextmanager
    def hold(self, token: Optional[str], label: str = "") -> Iterator[bool]:
        """Run a job in the slot ``token`` reserved (yields False if it has none).

        The slot is renewed every :data:`HEARTBEAT_S` seconds while the job runs; if the
        process dies the slot expires within :data:`STALE_S` seconds.
        """
        i = self._find(token) if token else None
        if i is None or not self.locks.renew(self._key(i), str(token), STALE_S):
            yield False
            return
        key, token = self._key(i), str(token)
        info = {"label": label, "state": "running", "pid": os.getpid()}
        self._describe(i, token, STALE_S, **info)

        def renew() -> None:
            # lost (it expired while the store was unreachable): taken again if still free
            if self.locks.renew(key, token, STALE_S) or self.locks.take(key, token, STALE_S):
                self._describe(i, token, STALE_S, **info)

        with heartbeat(renew, key):
            try:
                yield True
            finally:
                self._drop(i, token)

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
def heartbeat(renew: Callable[[], Any], name: str, every: float = HEARTBEAT_S
              ) -> Iterator[None]:
    """Call ``renew`` every ``every`` seconds while the block runs (a lock's expiry renewed
    by its holder: redis-py's ``Lock`` has no renewal of its own)."""
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(every):
                try:
                    renew()
                except Exception:  # noqa: BLE001 - a store hiccup must not kill the job
                    log.warning("heartbeat of %s failed", name, exc_info=True)
        except SystemExit:  # a threaded server stopping raises it in its threads
            log.warning("%s no longer renewed: its server is stopping", name)

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{name}")
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
        """The secret every web worker of the deployment agrees on (signs sessions and jobs).

        Kept in a private file (``secret``, mode 0600, in a 0700 folder) in the deployment's
        cache folder, written once, atomically, by the first process that needs it: it
        survives restarts of the web workers, of gunicorn and of Redis (which a lab runs with
        ``--save ""``). Web workers on several machines share it through
        ``ATTENTION_LENS_SECRET_KEY`` instead (the server prefers that when it is set).
        """
        return read_or_create_secret((self.cache_dir or default_cache_dir()) / SECRET_FILE)


#: The name of the signing-secret file in a deployment's cache folder.
SECRET_FILE = "secret"


def read_or_create_secret(path: Path) -> str:
    """The secret in ``path``; created (0600, atomically, once) if it does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(50):
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
        if len(text) >= 32:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(path, 0o600)  # a copied file: private again
                log.warning("%s was readable by others (mode %o): made it 0600", path, mode)
            return text
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: read theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"could not read the signing secret in {path}")


# ------------------------------------------------------------------------ Celery (a lab)
def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


#: Seconds a job may run on a Celery worker (``ATTENTION_LENS_JOB_DEADLINE``): past it the
#: task is stopped (soft limit, then the pool child is killed 30 s later) and the page says so.
CELERY_DEADLINE_S = _env_seconds("ATTENTION_LENS_JOB_DEADLINE", 900.0)
#: Seconds an unacknowledged task waits before Redis hands it to another worker: longer than
#: the hard deadline, so a task still running is never delivered twice.
VISIBILITY_MARGIN_S = 120.0
#: Seconds a finished job's result (and its bookkeeping) stays in Redis unread.
RESULT_EXPIRES_S = 3600
#: Runs of one task before it is reported as failed (a task whose pool child is killed, e.g.
#: by the out-of-memory killer, is run again once).
MAX_ATTEMPTS = 2
#: Seconds a running task's heartbeat lives: a task whose worker died is noticed this long
#: after (short, so it is sent again while its job slot is still held).
ALIVE_TTL_S = 3.0
#: Seconds a job must look lost, on consecutive polls, before it is reported or sent again.
LOST_AFTER_S = 2.0
#: Seconds a queued task may wait while no worker is alive before the page is told.
NO_WORKER_S = 20.0


def _fix_kombu_redis_reconnect() -> None:
    """Kombu before 5.4 leaves a worker that lost Redis connected but consuming nothing once
    Redis is back (a channel that failed to register still unregisters its successor from
    the poller; kombu's fix #2007, released in 5.4.0). Applies the same fix to older kombu."""
    from kombu import __version__ as kombu_version
    from kombu.transport import redis as kr

    if tuple(int(p) for p in kombu_version.split(".")[:2]) >= (5, 4) or \
            getattr(kr.Channel, "_attention_lens_fixed", False):
        return
    init, connparams = kr.Channel.__init__, kr.Channel._connparams

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._registered = False
        init(self, *args, **kwargs)
        self._registered = True  # added to the poller

    def _connparams(self: Any, asynchronous: bool = False) -> dict:
        params = connparams(self, asynchronous)
        if asynchronous:
            base, channel = params["connection_class"].__mro__[1], self

            class Connection(base):  # type: ignore[misc, valid-type]
                def disconnect(self: Any, *args: Any) -> None:
                    base.disconnect(self, *args)
                    if getattr(channel, "_registered", False):
                        channel._on_connection_disconnect(self)
            params["connection_class"] = Connection
        return params

    kr.Channel.__init__, kr.Channel._connparams = __init__, _connparams
    kr.Channel._attention_lens_fixed = True


def make_celery(broker: str, deadline_s: Optional[float] = None) -> Any:
    """The Celery app of a deployment: Redis (``broker``) as broker and result store.

    Configured for workers that can die: a task is acknowledged only when it ends
    (``task_acks_late``) and put back in the queue when its pool child dies
    (``task_reject_on_worker_lost``); every task has a deadline (time limits) and Redis's
    visibility timeout exceeds it; results expire; connections to Redis time out within
    seconds and are retried for ever, so a worker survives a Redis restart.
    """
    from celery import Celery

    _fix_kombu_redis_reconnect()
    deadline = float(deadline_s or CELERY_DEADLINE_S)
    app = Celery("attention_lens", broker=broker, backend=broker, task_cls=job_task_class())
    transport = {"visibility_timeout": int(deadline + 30 + VISIBILITY_MARGIN_S),
                 "socket_timeout": REDIS_TIMEOUT_S + 2,
                 "socket_connect_timeout": REDIS_TIMEOUT_S,
                 "health_check_interval": 10}
    app.conf.update(
        worker_prefetch_multiplier=1, task_acks_late=True, task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True, task_track_started=True,
        task_soft_time_limit=int(deadline), task_time_limit=int(deadline + 30),
        broker_transport_options=transport, result_backend_transport_options=transport,
        redis_socket_timeout=REDIS_TIMEOUT_S + 2, redis_socket_connect_timeout=REDIS_TIMEOUT_S,
        redis_retry_on_timeout=True, result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False)

    return app


#: The Celery task that computes a weight analysis for the API on a worker (registered by
#: the API, :func:`attention_lens.server.api.register_worker_tasks`).
WEIGHT_TASK = "attention_lens.weight_analysis"


def _task_key(task_id: str, what: str) -> str:
    return f"task:{task_id}:{what}"


def _task_kv(app: Any) -> RedisKV:
    kv = getattr(app, "_attention_lens_kv", None)
    if kv is None:
        kv = app._attention_lens_kv = RedisKV(app.conf.broker_url)
    return kv


def job_task_class() -> type:
    """The Celery task class of a deployment's jobs (built lazily: Celery is optional).

    Each run records in Redis that the task started, keeps a heartbeat while it runs and
    marks it finished; a task run :data:`MAX_ATTEMPTS` times already (its pool child died
    each time) stores a failure the page shows instead of running again, and a copy of a
    task that finished, or was reported lost, is dropped.
    """
    from celery import Task
    from celery.exceptions import Ignore

    class JobTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            tid = getattr(self.request, "id", None)
            if not tid or not self.name.startswith("background_callback_"):
                return super().__call__(*args, **kwargs)
            kv = _task_kv(self.app)
            if kv.get(_task_key(tid, "finished")) or kv.get(_task_key(tid, "lost")):
                log.warning("task %s: a copy already ran or runs; dropped", tid)
                raise Ignore()
            ttl = RESULT_EXPIRES_S
            attempts = kv.incr(_task_key(tid, "attempts"))
            kv.touch(_task_key(tid, "attempts") + ":n", ttl)
            if attempts > MAX_ATTEMPTS:
                log.error("task %s stopped %d times without finishing: reported failed", tid,
                          attempts - 1)
                _store_failure(self.app, args, f"the job stopped unexpectedly {attempts - 1} "
                               "times (its worker process was killed, e.g. out of memory)")
                kv.set(_task_key(tid, "finished"), time.time(), expire=ttl)
                raise Ignore()
            worker = str(getattr(self.request, "hostname", "") or "").split("@")[-1]
            if attempts > 1:  # run again after its worker died: it keeps its job slot
                keep_slot(_job_token(args))
            kv.set(_task_key(tid, "started"), {"t": time.time(), "pid": os.getpid(),
                                               "worker": worker, "attempt": attempts},
                   expire=ttl)
            try:
                with alive(kv, _task_key(tid, "alive"), ttl=ALIVE_TTL_S):
                    return super().__call__(*args, **kwargs)
            finally:
                try:
                    kv.set(_task_key(tid, "finished"), time.time(), expire=ttl)
                except StoreUnavailable:
                    log.warning("task %s finished while Redis was unreachable", tid)

    return JobTask


@contextmanager
def alive(kv: Any, key: str, every: float = HEARTBEAT_S, ttl: float = STALE_S
          ) -> Iterator[None]:
    """Keep ``key`` set (re-created if the store lost it) while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                kv.set(key, os.getpid(), expire=ttl)
            except Exception:  # noqa: BLE001 - a store outage must not kill the job
                log.warning("heartbeat %s: the store is unreachable", key)
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"alive-{key}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + REDIS_TIMEOUT_S * 2 + 1)
        try:
            kv.delete(key)
        except Exception:  # noqa: BLE001
            pass


def failure_outputs(outputs_list: Any, message: str) -> Any:
    """A page job's outputs saying ``message`` with Run again (the strip's conventions:
    ``<page>-alerts``, ``<page>-job-after``, ``<page>-job-note``); nothing else changes."""
    no = {"_dash_no_update": "_dash_no_update"}
    if not isinstance(outputs_list, list):
        return no
    import dash_bootstrap_components as dbc

    shown = {"display": "flex"}  # the strip's Run again row, shown (components.job_strip)

    out = []
    for spec in outputs_list:
        cid = spec.get("id") if isinstance(spec, dict) else None
        prop = spec.get("property") if isinstance(spec, dict) else None
        if not isinstance(cid, str):
            out.append(no)
        elif cid.endswith("-alerts") and prop == "children":
            alert = dbc.Alert(message[:1].upper() + message[1:] + ".", color="danger",
                              dismissable=True, className="al-alert")  # as shell.alert
            out.append([alert.to_plotly_json()])
        elif cid.endswith("-job-after") and prop == "style":
            out.append(shown)
        elif cid.endswith("-job-note") and prop == "children":
            out.append("The job did not finish.")
        else:
            out.append(no)
    return out


def _job_token(args: Any) -> Optional[str]:
    """The job-slot token of a page job's task arguments (its request), if any."""
    try:
        request = args[2][0]
    except (IndexError, KeyError, TypeError):
        return None
    token = request.get("token") if isinstance(request, dict) else None
    return str(token) if token else None


def keep_slot(token: Optional[str], label: str = "a job run again") -> bool:
    """Hold a job slot for ``token`` again (a job run a second time, after its worker died,
    keeps its place): renew its slot, or take a free one; False when none is free."""
    if not token:
        return False
    slots = current().slots
    return slots.keep(token, RESERVED_S) or slots.take(token, label, RESERVED_S)


def _store_failure(app: Any, args: tuple, message: str) -> None:
    """Store a failure as the result of the Dash job whose task arguments are ``args``."""
    import json

    from plotly.utils import PlotlyJSONEncoder

    result_key, context = args[0], (args[3] if len(args) > 3 else None) or {}
    outputs = failure_outputs(context.get("outputs_list"), message)
    app.backend.set(result_key, json.dumps(outputs, cls=PlotlyJSONEncoder))


def lab_manager(celery_app: Any) -> Any:
    """Dash's ``CeleryManager`` that never leaves a page waiting for a job that is gone.

    It records every job it starts (its task and arguments) in Redis. While a page polls a
    job with no result yet it checks the job's heartbeat: a job whose worker died (the whole
    worker killed) is sent again, once, to the surviving workers; a job the store lost
    (Redis restarted without saving), a job that failed in its worker (deadline, a second
    death) or one no worker is alive to run is reported to the page with Run again.
    """
    from dash import CeleryManager

    class LabCeleryManager(CeleryManager):
        def __init__(self, app: Any) -> None:
            super().__init__(app)
            self.kv = _task_kv(app)

        def call_job_fn(self, key: str, job_fn: Any, args: Any, context: Any) -> str:
            from celery.utils import uuid

            tid = uuid()
            call = (key, self._make_progress_key(key), args, dict(context))
            self.kv.set(_task_key(tid, "call"), {"name": job_fn.name, "args": call,
                                                 "t": time.time()},
                        expire=RESULT_EXPIRES_S)
            job_fn.apply_async(call, task_id=tid)
            return tid

        def get_result(self, key: str, job: Any) -> Any:
            result = super().get_result(key, job)
            if result is not self.UNDEFINED or not job:
                return result
            problem = self.check(str(job))
            if problem is None:
                return self.UNDEFINED
            log.warning("job %s: %s", job, problem)
            self.kv.set(_task_key(str(job), "lost"), time.time(), expire=RESULT_EXPIRES_S)
            call = self.kv.get(_task_key(str(job), "call")) or {}
            args = call.get("args") or (None, None, None, {})
            token = _job_token(args)
            if token:
                current().slots.release(token)
            try:
                self.handle.control.revoke(str(job))
            except Exception:  # noqa: BLE001 - best effort
                pass
            return failure_outputs((args[3] or {}).get("outputs_list"), problem)

        def check(self, job: str) -> Optional[str]:
            """None while ``job`` is queued or running; else what happened to it."""
            kv = self.kv
            if kv.get(_task_key(job, "alive")):
                kv.delete(_task_key(job, "suspect"))
                return None
            state = self.handle.AsyncResult(job).state
            if state == "FAILURE":
                res = self.handle.AsyncResult(job).result
                name = type(res).__name__ if isinstance(res, BaseException) else "error"
                if name in ("TimeLimitExceeded", "SoftTimeLimitExceeded"):
                    return (f"the job ran past its deadline of {int(CELERY_DEADLINE_S)} s and "
                            "was stopped")
                return f"the job failed in its worker ({name})"
            if state in ("SUCCESS", "REVOKED"):
                return None  # its result was read already, or it was cancelled
            call = kv.get(_task_key(job, "call"))
            started = kv.get(_task_key(job, "started"))
            if call is None:
                if not self.confirmed(job):
                    return None
                return ("the job store (Redis) restarted and lost this job; nothing was "
                        "saved")
            if started is not None:
                # it started and its heartbeat stopped: its pool child died (its worker puts
                # it back in the queue) or its whole worker did (sent again from here); its
                # job slot is kept meanwhile
                keep_slot(_job_token(call["args"]))
                if started.get("worker") and kv.get(f"worker:{started['worker']}"):
                    return None
                if not self.confirmed(job, ALIVE_TTL_S * 0.5):
                    return None
                if kv.add(_task_key(job, "resent"), time.time(), expire=RESULT_EXPIRES_S):
                    kv.delete(_task_key(job, "started"))
                    kv.delete(_task_key(job, "suspect"))
                    log.warning("job %s: its worker stopped; sent to the other workers", job)
                    self.handle.send_task(call["name"], args=call["args"], task_id=job)
                    return None
                return ("the worker running this job stopped twice (killed, or out of "
                        "memory)")
            waited = time.time() - float(call["t"])
            if waited > NO_WORKER_S and not kv.keys("worker:*"):
                return (f"no job worker is running (the job waited {int(waited)} s); the lab's "
                        "'attention-lens worker' must be started again")
            return None

        def confirmed(self, job: str, after: float = LOST_AFTER_S) -> bool:
            """True once ``job`` has looked lost for ``after`` seconds (a heartbeat that was
            only late, or a store just back, is not a lost job)."""
            key = _task_key(job, "suspect")
            self.kv.add(key, time.time(), expire=60)
            since = self.kv.get(key)
            return since is not None and time.time() - float(since) >= after

    return LabCeleryManager(celery_app)


def worker_presence(broker: str, name: str) -> threading.Event:
    """Announce a worker in Redis (``worker:<name>``) until the returned event is set."""
    kv = RedisKV(broker)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                kv.set(f"worker:{name}", time.time(), expire=ALIVE_TTL_S)
            except Exception:  # noqa: BLE001 - Redis away: keep trying
                pass
            stop.wait(HEARTBEAT_S)

    threading.Thread(target=beat, daemon=True, name="worker-presence").start()
    return stop


def create(cache_dir: Optional[Path | str] = None, celery_broker: Optional[str] = None,
           max_jobs: int = DEFAULT_MAX_JOBS, results_size: int = 4 * 2**30,
           deployment: Optional[str] = None) -> Background:
    """The background of a deployment: disk caches under ``cache_dir``, or Celery + Redis.

    On one machine, jobs run in processes forked from a clean job host
    (:class:`attention_lens.jobhost.JobManager`). On the default cache folder,
    ``deployment`` (e.g. ``host:port/``) keys the job slots, so two servers started without
    a cache folder do not share slots; servers given the same folder share them.
    """
    from .jobhost import JobManager

    if celery_broker:
        celery_app = make_celery(celery_broker)
        return Background(lab_manager(celery_app), RedisKV(celery_broker),
                          RedisKV(celery_broker, PREFIX + "results:"), max_jobs,
                          Path(cache_dir) if cache_dir else None, celery_broker, celery_app)
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
