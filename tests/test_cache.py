"""The one in-process cache (a byte-bounded LRU) and the store's bounded counters."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from attention_lens import background
from attention_lens import cache as C
from attention_lens import weight_analyses as W
from attention_lens.registry import DEFAULT_WEIGHTS, Registry


def arr(n_bytes: int, fill: float = 0.0) -> np.ndarray:
    return np.full(n_bytes // 8, fill, dtype=np.float64)


def test_the_lru_evicts_the_least_recently_used_by_bytes(monkeypatch):
    trims = []
    monkeypatch.setattr(C, "release_memory", lambda: trims.append(1))
    lru = C.ByteLRU("test", 2500)
    assert lru.put("a", arr(1000)) and lru.put("b", arr(1000))
    assert lru.nbytes == 2000 and trims == []
    assert lru.get("a") is not None  # a is now the most recently used: b goes first
    assert lru.put("c", arr(1000))
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.nbytes == 2000 and len(trims) == 1  # an eviction gives memory back
    assert lru.put("d", arr(2400))  # fits alone: both others go, oldest first
    assert len(lru) == 1 and lru.nbytes == 2400
    assert lru.info()["evicted"] == 3


def test_an_entry_larger_than_the_budget_is_not_kept_and_evicts_nothing():
    lru = C.ByteLRU("test", 2500)
    lru.put("a", arr(1000))
    assert lru.put("huge", arr(4000)) is False
    assert "huge" not in lru and "a" in lru and lru.nbytes == 1000
    # a key given a value too large for the budget no longer holds its old value
    assert lru.put("a", arr(8000)) is False
    assert "a" not in lru and lru.nbytes == 0


def test_budgets_in_bytes_and_entries_are_read_at_every_store():
    budget = {"bytes": 10_000, "items": 3}
    lru = C.ByteLRU("test", lambda: budget["bytes"], lambda: budget["items"])
    for i in range(5):
        lru.put(i, arr(1000))
    assert [v[0] for v in lru.values()] == [0.0] * 3 and len(lru) == 3
    assert 2 in lru and 1 not in lru  # count bound: the two oldest went
    budget["bytes"] = 2000  # a setting changed at run time: applied at the next store
    lru.put(9, arr(1000))
    assert len(lru) == 2 and 9 in lru and 4 in lru and lru.nbytes == 2000
    lru.max_bytes = 1000  # or set directly
    assert len(lru) == 1 and 9 in lru


def test_keep_newest_holds_one_value_over_the_budget_until_the_next():
    lru = C.ByteLRU("test", 2500, keep_newest=True)
    lru.put("a", arr(1000))
    assert lru.put("big", arr(4000)) and "big" in lru and "a" not in lru
    assert len(lru) == 1 and lru.nbytes == 4000 and lru.get("big") is not None
    lru.put("b", arr(1000))
    assert "big" not in lru and len(lru) == 1 and lru.nbytes == 1000


def test_sizes_follow_a_sizeof_and_nbytes_of_counts_shared_arrays_once():
    lru = C.ByteLRU("test", 100, sizeof=len)
    lru.put("x", "a" * 60)
    lru.put("y", "b" * 60)
    assert "x" not in lru and lru.nbytes == 60
    a = arr(800)
    assert C.nbytes_of([a, a]) < 2 * a.nbytes + 200


def test_every_cache_of_the_server_is_a_region_of_the_one_lru(tmp_path):
    from attention_lens.analysis import datasets, patching

    reg = Registry([DEFAULT_WEIGHTS])
    store = W.Store(background.DiskKV(tmp_path / "r"), background.DiskKV(tmp_path / "c"))
    for lru in (reg._forward, reg._weights, store._memo, patching._RUNS, datasets._UPLOADS,
                datasets._STREAMS):
        assert isinstance(lru, C.ByteLRU)
    assert {"forward", "weights", "analyses", "patching runs", "uploaded datasets",
            "token streams"} <= set(C.info())
    # the budgets stay configurable as before
    reg.max_forward_bytes = 12345
    assert reg._forward.max_bytes == 12345
    store.memo_bytes = 777
    assert store._memo.max_bytes == 777


def test_the_store_counters_expire(tmp_path, tiny):
    """Counts of computations and reads live in a store with eviction off: each expires
    ``COUNTER_TTL_S`` after its last change, so they cannot pile up for ever."""
    coord = background.DiskKV(tmp_path / "coord", eviction_policy="none")
    results = background.DiskKV(tmp_path / "analyses")
    req = W.probe_head_scores()
    W.Store(results, coord).compute(tiny, req)
    reader = W.Store(results, coord)  # another process's store: reads from the shared one
    reader.cached(tiny, req)
    stats = reader.stats(tiny, req, [os.getpid()])
    assert stats["computed"] == 1 and stats["served"][os.getpid()] == 1
    key = W.cache_key(tiny, req)
    now = time.time()
    for counter in (f"served:{key}:{os.getpid()}:n", f"computed:{key}:n",
                    f"computed-by:{key}"):
        _, expires = coord.cache.get(counter, expire_time=True)
        assert expires is not None and now < expires <= now + W.COUNTER_TTL_S + 1, counter
    # the lock is gone once the computation ended
    assert not [k for k in coord.cache.iterkeys() if str(k).startswith("lock:")]


@pytest.mark.parametrize("budget", [1, 10**9])
def test_forward_passes_and_their_results_share_the_forward_budget(tiny, budget):
    reg = Registry([])
    reg.add(tiny)
    reg.max_forward_bytes = budget
    fp = reg.forward("abc abc", "tiny")
    calls = []
    reg.per_prompt(fp, "k", lambda: calls.append(1) or arr(800))
    reg.per_prompt(fp, "k", lambda: calls.append(1) or arr(800))
    info = reg.cache_info()
    if budget == 1:  # the newest pass stays, alone, but no result larger than the budget
        assert info["forward"] == 1 and info["forward_bytes"] == fp.nbytes
        assert calls == [1, 1] and reg.forward("abc abc", "tiny") is fp
        other = reg.forward("xyz", "tiny")  # a newer pass replaces it
        assert reg.cache_info()["forward"] == 1 and reg.cached_forward(
            "tiny", other.token_ids) is other and reg.forward("abc abc", "tiny") is not fp
    else:
        assert info["forward"] == 1 and calls == [1]
        assert info["forward_bytes"] == fp.nbytes + 800
