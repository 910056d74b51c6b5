"""Job slots on both stores (diskcache on one machine, a real Redis in a lab): a slot belongs
to the token that holds it, travels with its job to another process, and comes back when its
holder is killed with ``kill -9`` or its reservation is never claimed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from attention_lens import background

from .test_background import redis_url, wait_until  # noqa: F401 - the real redis-server fixture


def _slots(where: str, n: int, reserved_s: float = background.RESERVED_S) -> background.Slots:
    if where.startswith("redis://"):
        return background.Slots(background.RedisKV(where), n, reserved_s=reserved_s)
    return background.Slots(background.DiskKV(Path(where) / "coord", eviction_policy="none"),
                            n, reserved_s=reserved_s)


@pytest.fixture(params=["disk", "redis"])
def where(request, tmp_path) -> str:
    return request.getfixturevalue("redis_url") if request.param == "redis" else str(tmp_path)


def test_a_slot_lost_while_held_stays_with_the_job_that_took_it(where):
    """A job whose slot expired (its heartbeat stalled, the store was away) and went to
    another job neither renews nor frees that job's slot when it ends."""
    slots = _slots(where, 1)
    first = slots.reserve("first")
    with slots.hold(first, "first") as ok:
        assert ok and [s["state"] for s in slots.active()] == ["running"]
        slots.kv.delete(slots._key(0))  # expired meanwhile
        second = slots.reserve("second")
        assert second and slots.reserve("third") is None
        assert not slots.claim(first)  # not the first job's to renew
    # the first job ended: the second job's slot is still its own
    assert [(s["token"], s["label"]) for s in slots.active()] == [(second, "second")]
    slots.release(first)
    assert [s["token"] for s in slots.active()] == [second]
    with slots.hold(second, "second") as ok:
        assert ok
    assert slots.active() == []


def test_an_unclaimed_reservation_is_released_and_a_late_job_is_refused(where):
    slots = _slots(where, 2, reserved_s=0.4)
    tokens = [slots.reserve("a"), slots.reserve("b")]
    assert all(tokens) and slots.reserve("c") is None
    time.sleep(0.7)
    assert slots.active() == []
    with slots.hold(tokens[0]) as ok:  # its job came too late: "busy", nothing held
        assert not ok
    assert slots.active() == [] and not slots.claim(tokens[1])


def _hold(where: str, token: str, ready) -> None:
    """A job process: runs in the slot ``token`` a web worker reserved, until killed."""
    slots = _slots(where, 2)
    with slots.hold(token, "held elsewhere") as ok:
        ready.send((ok, os.getpid()))
        time.sleep(600)


def test_a_slot_reserved_here_is_held_by_the_job_process_and_freed_when_it_is_killed(where):
    slots = _slots(where, 2)
    token = slots.reserve("a page's job")
    assert slots.claim(token)  # the job manager: its process is starting
    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_hold, args=(where, token, w))
    proc.start()
    w.close()
    try:
        assert r.poll(120), "the job process did not start"
        ok, pid = r.recv()
        assert ok
        held = slots.active()
        assert [(s["token"], s["state"], s["pid"]) for s in held] == [(token, "running", pid)]
        time.sleep(background.STALE_S + 1)  # renewed past its expiry while the job lives
        assert [s["token"] for s in slots.active()] == [token]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: slots.active() == [], timeout=background.STALE_S + 5,
                   what="the killed job's slot")
        assert time.monotonic() - t0 <= background.STALE_S + 2
    finally:
        proc.kill()
        proc.join(10)


def test_the_job_host_gives_back_a_dead_jobs_slot_at_once(where):
    """``release_pid``: the process that watched a job frees its slot when it ends, without
    waiting for the slot to expire; only the slot that job holds."""
    slots = _slots(where, 2)
    mine, other = slots.reserve("mine"), slots.reserve("other")
    with slots.hold(mine) as ok:
        assert ok
        slots.release_pid(os.getpid() + 1)  # another process: nothing
        assert len(slots.active()) == 2
        slots.release_pid(os.getpid())
        assert [s["token"] for s in slots.active()] == [other]
    assert [s["token"] for s in slots.active()] == [other]


def test_a_stopping_server_stops_the_slot_renewal_quietly_and_the_slot_is_freed(tmp_path):
    """Dash's threaded runner raises SystemExit in every thread it started when it stops (a
    job run with ``slots.job`` in a request thread): the renewal ends without an
    unhandled-thread error, and leaving the block still frees the slot."""
    import ctypes
    import threading

    slots = _slots(str(tmp_path), 1)
    unhandled: list = []
    old_hook = threading.excepthook
    threading.excepthook = unhandled.append
    try:
        with slots.job("an API analysis"):
            beat = next(t for t in threading.enumerate() if t.name.startswith("heartbeat-"))
            assert ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(beat.ident), ctypes.py_object(SystemExit)) == 1
            beat.join(background.HEARTBEAT_S + 2)
            assert not beat.is_alive(), "the renewal did not stop"
            assert len(slots.active()) == 1
    finally:
        threading.excepthook = old_hook
    assert unhandled == []
    assert slots.active() == []
