"""The one in-process cache: a byte-bounded LRU, memory given back, locks in the store.

Every in-process cache of the server is a :class:`ByteLRU` (cachetools' ``LRUCache`` sized by
:func:`nbytes_of`, made thread-safe): forward passes with their per-prompt results (the
registry), weight, dataset and pair analyses read from the deployment's store (the weight
store's front), patching runs, uploaded datasets and token streams. Each use is a named
region with its own byte budget (configurable as before: ``--cache-mb`` and the registry's
and store's arguments); an entry larger than its region's budget is not kept, and the least
recently used entries go first.

Behind the in-process regions lies the deployment's store (diskcache on one machine, Redis
in a lab, chosen by :mod:`attention_lens.background`); :func:`store_lock` is that store's own
lock (diskcache's ``Lock`` or redis-py's ``Lock``), so one analysis is computed once per
deployment.

Freed memory is given back to the operating system here only (:func:`release_memory`): after
an eviction and after a computation long enough to have held large temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional, Union

import cachetools
import numpy as np
import torch

from .analysis.errors import AnalysisError

#: Seconds a client is told to wait (``Retry-After``) while the store is unreachable.
RETRY_AFTER_S = 5


class StoreUnavailable(AnalysisError):
    """The deployment's store (Redis) does not answer; the API answers 503 + Retry-After and a
    page says so. Everything resumes by itself when the store is back."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("The job store is unreachable, retrying: try again in a few seconds"
                         + (f" ({detail})" if detail else "") + ".")
        self.retry_after = RETRY_AFTER_S


def patiently(fn: Callable[[], Any], patience: float) -> Any:
    """``fn()``, tried once more on a fresh connection when Redis's connection broke, and
    again every 0.5 s for ``patience`` seconds while it is unreachable; then
    :class:`StoreUnavailable`."""
    import redis

    give_up, attempt = time.monotonic() + patience, 0
    while True:
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError) as exc:
            attempt += 1
            if attempt > 1 and time.monotonic() >= give_up:
                raise StoreUnavailable(f"Redis: {type(exc).__name__}") from exc
            if attempt > 1:
                time.sleep(0.5)

log = logging.getLogger(__name__)

#: A computation that ran longer than this held large temporaries; after it the worker gives
#: freed memory back (one GPT-2-small worker held ~600 MiB of freed heap after 10 prompts on
#: every page: 2,392 MiB resident, 1,797 MiB after malloc_trim).
HEAVY_SECONDS = 0.5

Budget = Union[int, Callable[[], int], None]


def nbytes_of(value: Any, _seen: Optional[set[int]] = None) -> int:
    """Bytes held by an analysis result: its arrays and tensors, strings and containers.

    Walks dataclasses, dicts, lists, tuples and object arrays; shared objects count once.
    """
    seen = set() if _seen is None else _seen
    if id(value) in seen or value is None or isinstance(value, (bool, int, float)):
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        if value.dtype != object:
            return value.nbytes
        return value.nbytes + sum(nbytes_of(v, seen) for v in value.reshape(-1))
    if isinstance(value, (str, bytes)):
        return sys.getsizeof(value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes_of(k, seen) + nbytes_of(v, seen)
                                          for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + sum(nbytes_of(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sys.getsizeof(value) + sum(nbytes_of(getattr(value, f.name), seen)
                                          for f in dataclasses.fields(value))
    return sys.getsizeof(value)


_LIBC: Any = None


def release_memory() -> None:
    """Give freed memory back to the operating system (glibc keeps freed heap pages, so a
    worker's resident size would otherwise stay at its peak after caches evict)."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


class _LRU(cachetools.LRUCache):
    """cachetools' LRU that counts what it evicts."""

    def __init__(self, maxsize: int, getsizeof: Callable[[Any], int]) -> None:
        super().__init__(maxsize, getsizeof)
        self.evicted = 0

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.evicted += 1
        return item


def _value(budget: Budget) -> Optional[int]:
    return budget() if callable(budget) else budget


#: Every region of this process, by name (for monitoring).
REGIONS: "weakref.WeakValueDictionary[str, ByteLRU]" = weakref.WeakValueDictionary()


class ByteLRU:
    """A thread-safe LRU bounded in bytes (and optionally in entries).

    ``max_bytes`` and ``max_items`` are numbers or functions read at every store (so a
    setting changed at run time takes effect at the next store). ``sizeof`` gives a value's
    bytes (default :func:`nbytes_of`). A value larger than the whole byte budget is not kept;
    storing evicts the least recently used entries until the new one fits. Reading an entry
    makes it the most recently used.

    With ``keep_newest`` a value larger than the budget is kept all the same, alone (every
    other entry goes), until the next value is stored: the forward-pass cache keeps the pass
    the page's callbacks are reading even when it alone exceeds ``--cache-mb``.
    """

    def __init__(self, name: str, max_bytes: Budget, max_items: Budget = None,
                 sizeof: Callable[[Any], int] = nbytes_of, keep_newest: bool = False) -> None:
        self.name, self._max_bytes, self._max_items = name, max_bytes, max_items
        self._sizeof, self.keep_newest = sizeof, keep_newest
        self._big: Optional[tuple[Hashable, Any, int]] = None  # (key, value, bytes)
        self._lock = threading.RLock()
        self._lru = _LRU(self._bytes_budget(), sizeof)
        REGIONS[name] = self

    # ------------------------------------------------------------------ budgets
    def _bytes_budget(self) -> int:
        return max(0, int(_value(self._max_bytes) or 0))

    @property
    def max_bytes(self) -> int:
        """The byte budget now."""
        return self._bytes_budget()

    @max_bytes.setter
    def max_bytes(self, value: Budget) -> None:
        with self._lock:
            self._max_bytes = value
            self._fit()
        self._released(True)

    @property
    def max_items(self) -> Optional[int]:
        """The entry budget now (None: bytes only)."""
        n = _value(self._max_items)
        return None if n is None else int(n)

    @max_items.setter
    def max_items(self, value: Budget) -> None:
        with self._lock:
            self._max_items = value
            self._fit()
        self._released(True)

    def _fit(self) -> None:
        """Apply the budgets now (call with the lock held)."""
        budget = self._bytes_budget()
        if budget != self._lru.maxsize:  # cachetools' budget is fixed: move into a new one
            old, self._lru = self._lru, _LRU(budget, self._sizeof)
            self._lru.evicted = old.evicted
            for key in list(old.keys()):  # oldest first: the newest stay
                value = cachetools.Cache.__getitem__(old, key)
                try:
                    self._lru[key] = value
                except ValueError:  # larger than the new budget
                    self._lru.evicted += 1
        n = self.max_items
        while n is not None and len(self._lru) > max(n, 0):
            self._lru.popitem()

    # ------------------------------------------------------------------ access
    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if self._big is not None and self._big[0] == key:
                return self._big[1]
            try:
                return self._lru[key]
            except KeyError:
                return default

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._lru or (self._big is not None and self._big[0] == key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru) + (self._big is not None)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return int(self._lru.currsize) + (self._big[2] if self._big is not None else 0)

    def values(self) -> list[Any]:
        """The values, least recently used first."""
        with self._lock:
            out = [cachetools.Cache.__getitem__(self._lru, k) for k in list(self._lru.keys())]
            return out + ([self._big[1]] if self._big is not None else [])

    def _drop_big(self) -> None:
        if self._big is not None:
            self._big = None
            self._lru.evicted += 1

    def put(self, key: Hashable, value: Any, seconds: float = 0.0) -> bool:
        """Keep ``value`` under ``key``; False when it is larger than the whole budget (then
        nothing is kept under ``key``). ``seconds`` is how long computing it took: after a
        long computation, or an eviction, freed memory is given back."""
        with self._lock:
            before = self._lru.evicted
            self._fit()
            if self._big is not None and self._big[0] == key:
                self._big = None  # stored again (measured again) below
            self._drop_big()  # a value kept over the budget stays only while it is the newest
            try:
                self._lru[key] = value
                kept = True
            except ValueError:  # larger than the budget
                self._lru.pop(key, None)
                kept = self.keep_newest
                if kept:  # alone
                    while len(self._lru):
                        self._lru.popitem()
                    self._big = (key, value, int(self._sizeof(value)))
            n = self.max_items
            while n is not None and len(self._lru) > max(n, 0):
                self._lru.popitem()
            evicted = self._lru.evicted != before
        self._released(evicted or seconds > HEAVY_SECONDS)
        return kept

    def computed(self, seconds: float) -> None:
        """A value took ``seconds`` to compute and was not kept: after a long computation
        freed memory is given back."""
        self._released(seconds > HEAVY_SECONDS)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key`` and return its value (``default`` if absent)."""
        with self._lock:
            if self._big is not None and self._big[0] == key:
                value, self._big = self._big[1], None
                return value
            return self._lru.pop(key, default)

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate``; how many went."""
        with self._lock:
            gone = [k for k in list(self._lru.keys()) if predicate(k)]
            for k in gone:
                del self._lru[k]
            if self._big is not None and predicate(self._big[0]):
                gone.append(self._big[0])
                self._big = None
        self._released(bool(gone))
        return len(gone)

    def clear(self) -> None:
        """Remove everything."""
        with self._lock:
            had = len(self._lru) > 0 or self._big is not None
            self._lru.clear()
            self._big = None
        self._released(had)

    @staticmethod
    def _released(freed: bool) -> None:
        if freed:
            release_memory()

    def info(self) -> dict[str, Any]:
        """Entries, bytes and budgets."""
        with self._lock:
            return {"entries": len(self), "bytes": self.nbytes,
                    "max_bytes": int(self._lru.maxsize), "max_items": self.max_items,
                    "evicted": self._lru.evicted}


def info() -> dict[str, dict[str, Any]]:
    """Every region of this process: entries, bytes and budgets."""
    return {name: lru.info() for name, lru in list(REGIONS.items())}


def timed(compute: Callable[[], Any]) -> tuple[Any, float]:
    """``compute()`` and the seconds it took."""
    t0 = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - t0


# --------------------------------------------------------------------------- store locks
#: Seconds a lock in the store lives without being renewed (its holder died).
LOCK_TTL_S = 6.0
#: Seconds between renewals of a held lock.
LOCK_RENEW_S = 1.0
#: Seconds a waiter sleeps between looks at a lock another process holds.
LOCK_POLL_S = 0.1


class _DiskLock:
    """An expiring key in a diskcache ``Cache`` holding its holder's token, with redis-py's
    lock rules: taken with the atomic ``add``; renewed and released inside one SQLite
    transaction that first checks the token, so a holder whose lock expired and went to
    another process never renews or frees theirs. (diskcache's own ``Lock`` has no owner:
    its ``release`` deletes whatever holds the key, and its ``acquire`` spins.) Waited for
    without spinning."""

    def __init__(self, cache: Any, key: str, ttl: float) -> None:
        import secrets

        self.cache, self.key, self.ttl = cache, key, ttl
        self.token = secrets.token_hex(16)

    def acquire(self, stop: Callable[[], bool]) -> bool:
        while True:
            while self.key in self.cache:  # held elsewhere: look now and then
                if stop():
                    return False
                time.sleep(LOCK_POLL_S)
            if self.cache.add(self.key, self.token, expire=self.ttl, retry=True):
                return True

    def renew(self) -> None:
        with self.cache.transact(retry=True):
            if self.cache.get(self.key) == self.token:
                self.cache.touch(self.key, expire=self.ttl)

    def release(self) -> None:
        with self.cache.transact(retry=True):
            if self.cache.get(self.key) != self.token:
                log.warning("lock %s expired while held", self.key)
                return
            self.cache.delete(self.key)


class _RedisLock:
    """redis-py's ``Lock`` (a token the holder alone can renew and release).

    Like every other use of the store (:class:`attention_lens.background.RedisKV`), a broken
    connection is tried again on a fresh one, for ``patience`` seconds (a job waits for Redis
    to come back), then reported as :class:`attention_lens.cache.StoreUnavailable`.
    """

    def __init__(self, client: Any, key: str, ttl: float, patience: float = 0.0) -> None:
        self.lock = client.lock(key, timeout=ttl, sleep=LOCK_POLL_S, thread_local=False)
        self.patience = patience

    def _patiently(self, fn: Callable[[], Any]) -> Any:
        return patiently(fn, self.patience)

    def acquire(self, stop: Callable[[], bool]) -> bool:
        while not self._patiently(lambda: self.lock.acquire(
                blocking=True, blocking_timeout=LOCK_RENEW_S)):
            if stop():
                return False
        return True

    def renew(self) -> None:
        self.lock.reacquire()

    def release(self) -> None:
        from redis.exceptions import LockError

        try:
            self._patiently(self.lock.release)
        except LockError:  # expired and taken by another process meanwhile: theirs now
            log.warning("lock %s expired while held", self.lock.name)


def _lock_for(kv: Any, name: str, ttl: float) -> Any:
    client = getattr(kv, "r", None)
    if client is not None:  # RedisKV
        return _RedisLock(client, kv.prefix + name, ttl, float(getattr(kv, "patience", 0.0)))
    return _DiskLock(getattr(kv, "cache", kv), name, ttl)


@contextmanager
def store_lock(kv: Any, name: str, ttl: float = LOCK_TTL_S,
               stop: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Hold the store's lock ``name`` while the block runs (one holder per deployment).

    ``kv`` is the deployment's coordination store (``DiskKV`` or ``RedisKV``). The lock
    expires ``ttl`` seconds after its holder stops renewing it (the holder was killed); it is
    renewed every second while held. Waiting ends early, yielding False, when ``stop()``
    turns true (e.g. the result appeared in the store).
    """
    lock = _lock_for(kv, name, ttl)
    if not lock.acquire(stop):
        yield False
        return
    done = threading.Event()

    def renew() -> None:
        try:
            while not done.wait(LOCK_RENEW_S):
                try:
                    lock.renew()
                except Exception:  # noqa: BLE001 - a store hiccup must not kill the computation
                    log.warning("renewing lock %s failed", name, exc_info=True)
        except SystemExit:  # a threaded server stopping raises it in its threads: stop renewing
            log.warning("lock %s no longer renewed: its server is stopping", name)

    thread = threading.Thread(target=renew, daemon=True, name=f"lock-{name[:40]}")
    thread.start()
    try:
        yield True
    finally:
        done.set()
        thread.join(timeout=LOCK_RENEW_S + 1)
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - it expires by itself
            log.warning("releasing lock %s failed", name, exc_info=True)
