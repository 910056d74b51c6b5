"""One computation per weight analysis per deployment: real processes asking at once, on one
machine (diskcache's lock) and in a lab (redis-py's lock on a real Redis); a holder killed
with ``kill -9`` leaves no lock behind."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import wait
import os
import signal
import time
from pathlib import Path

import pytest

from attention_lens import background
from attention_lens import cache as C
from attention_lens import weight_analyses as W
from attention_lens.model.checkpoint import load_model
from attention_lens.registry import DEFAULT_WEIGHTS

from .test_background import redis_url  # noqa: F401 - the real redis-server fixture

MODEL = DEFAULT_WEIGHTS / "attn-only-2l"


def _stores(where: str) -> tuple:
    if where.startswith("redis://"):
        return (background.RedisKV(where, background.PREFIX + "results:"),
                background.RedisKV(where))
    return (background.DiskKV(Path(where) / "analyses"),
            background.DiskKV(Path(where) / "coord", eviction_policy="none"))


def _ask(where: str, seconds: float, barrier, out) -> None:
    """A process asking for the circuit eigenvalues, which take ``seconds`` to compute."""
    real = W.ANALYSES["circuit_eigenvalues"]

    def slow(lm, progress):
        out.send(("computing", os.getpid(), time.time()))
        time.sleep(seconds)
        return real.compute(lm, progress)

    W.ANALYSES["circuit_eigenvalues"] = W.Analysis(real.label, slow)
    lm = load_model(MODEL)
    results, coord = _stores(where)
    store = W.Store(results, coord)
    barrier.wait(120)
    eig = store.compute(lm, W.circuit_eigenvalues())
    out.send(("done", os.getpid(), float(eig.copying["full_ov"].sum()), time.time()))


def _stats(where: str) -> dict:
    results, coord = _stores(where)
    lm = load_model(MODEL)
    return W.Store(results, coord).stats(lm, W.circuit_eigenvalues())


def _where(kind: str, tmp_path: Path, request) -> str:
    return request.getfixturevalue("redis_url") if kind == "redis" else str(tmp_path)


class Events:
    """What the processes report, each on its own pipe (a process killed while writing to a
    shared queue could leave it locked)."""

    def __init__(self, readers) -> None:
        self.readers, self.pending = list(readers), []

    def get(self, timeout: float):
        end = time.time() + timeout
        while not self.pending:
            ready = wait(self.readers, max(0.0, end - time.time()))
            if not ready:
                raise TimeoutError("no report from the processes")
            for r in ready:
                try:
                    self.pending.append(r.recv())
                except EOFError:  # that process is gone
                    self.readers.remove(r)
        return self.pending.pop(0)


def _start(ctx, where: str, seconds: float, n: int):
    barrier, pipes = ctx.Barrier(n), [ctx.Pipe(duplex=False) for _ in range(n)]
    procs = [ctx.Process(target=_ask, args=(where, seconds, barrier, w)) for _, w in pipes]
    for p in procs:
        p.start()
    for _, w in pipes:
        w.close()  # the children hold the writing ends
    # the parent holds the barrier until the children opened it
    return procs, Events(r for r, _ in pipes), barrier


def _end(procs) -> None:
    for p in procs:
        p.join(60)
        if p.is_alive():  # a failed test's child: stopped, not left behind
            p.kill()
            p.join(10)


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_two_processes_asking_at_once_compute_once(kind, tmp_path, request):
    where = _where(kind, tmp_path, request)
    ctx = mp.get_context("spawn")
    procs, out, _barrier = _start(ctx, where, 2.0, 2)
    try:
        got = [out.get(timeout=180) for _ in range(3)]
    finally:
        _end(procs)
    computing = [g for g in got if g[0] == "computing"]
    done = [g for g in got if g[0] == "done"]
    assert len(computing) == 1 and len(done) == 2, got
    assert done[0][2] == done[1][2]  # the one result, read by the other process
    waiter = next(d for d in done if d[1] != computing[0][1])
    # it waited for the one computation and read its result
    assert waiter[3] >= computing[0][2] + 2.0
    stats = _stats(where)
    assert stats["computed"] == 1 and stats["computed_by"]["pid"] == computing[0][1]
    assert all(p.exitcode == 0 for p in procs)


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_killed_holder_leaves_no_lock_behind(kind, tmp_path, request):
    """The process computing is killed with kill -9: the one waiting computes it itself
    within the lock's lifetime, and nothing of the dead one is stored."""
    where = _where(kind, tmp_path, request)
    ctx = mp.get_context("spawn")
    procs, out, _barrier = _start(ctx, where, 3.0, 2)
    try:
        first = out.get(timeout=180)
        assert first[0] == "computing"
        os.kill(first[1], signal.SIGKILL)
        killed_at = time.time()
        second = out.get(timeout=60)
        assert second[0] == "computing" and second[1] != first[1]
        assert time.time() - killed_at <= C.LOCK_TTL_S + 5  # the dead holder's lock expired
        done = out.get(timeout=60)
        assert done[0] == "done" and done[1] == second[1]
    finally:
        _end(procs)
    stats = _stats(where)
    assert stats["computed"] == 1 and stats["computed_by"]["pid"] == second[1]


def test_a_stopping_server_stops_the_renewal_quietly_and_the_lock_is_released(tmp_path):
    """Dash's threaded runner raises SystemExit in every thread it started when it stops; in
    the renewal thread that ends the renewal without an unhandled-thread error, and leaving
    the block still releases the lock."""
    import ctypes
    import threading

    kv = background.DiskKV(tmp_path / "coord", eviction_policy="none")
    unhandled: list = []
    old_hook = threading.excepthook
    threading.excepthook = unhandled.append
    try:
        with C.store_lock(kv, "renewal-stop") as held:
            assert held
            renew = next(t for t in threading.enumerate() if t.name == "lock-renewal-stop")
            assert ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(renew.ident), ctypes.py_object(SystemExit)) == 1
            renew.join(C.LOCK_RENEW_S + 2)
            assert not renew.is_alive(), "the renewal did not stop"
    finally:
        threading.excepthook = old_hook
    assert unhandled == []
    with C.store_lock(kv, "renewal-stop", stop=lambda: True) as again:
        assert again, "the lock was not released"


def test_a_lock_that_expired_and_was_taken_stays_with_its_new_holder(tmp_path):
    """One machine: a holder whose lock expired (it stalled past the lock's life) and went to
    another holder neither renews nor frees the new holder's lock when it ends."""
    kv = background.DiskKV(tmp_path / "coord", eviction_policy="none")
    first = C._lock_for(kv, "stalled", 0.3)
    assert first.acquire(lambda: False)
    time.sleep(0.5)  # expired: nobody renewed it
    second = C._lock_for(kv, "stalled", 30)
    assert second.acquire(lambda: False)
    first.renew()
    first.release()
    assert not C._lock_for(kv, "stalled", 30).acquire(lambda: True), \
        "the first holder freed the second holder's lock"
    second.release()
    assert C._lock_for(kv, "stalled", 30).acquire(lambda: True)
