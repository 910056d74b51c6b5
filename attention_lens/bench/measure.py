"""Timing and memory measurement shared by every suite: medians of repeated runs, the
peak of Python allocations (tracemalloc) and the peak growth of the resident set size sampled
every millisecond; the table's row and header."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import resource
import statistics
import sys
import threading
import time
import tracemalloc
from typing import Any, Callable, Optional

from ..registry import DEFAULT_WEIGHTS

def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _current_rss_mb() -> float:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
    except OSError:
        return _rss_mb()


class _RssSampler(threading.Thread):
    """Samples the resident set size every millisecond; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.start_mb = self.peak = _current_rss_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self._stop_event.wait(0.001):
            self.peak = max(self.peak, _current_rss_mb())

    def stop(self) -> float:
        """Stop sampling and return the peak growth in MiB."""
        self._stop_event.set()
        self.join()
        return max(self.peak, _current_rss_mb()) - self.start_mb


def measure(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    """Median seconds of ``reps`` calls, then tracemalloc peak (MiB) and peak-RSS growth."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    gc.collect()
    sampler = _RssSampler()
    sampler.start()
    fn()
    rss_peak = sampler.stop()
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"median_s": statistics.median(times), "min_s": min(times),
            "py_peak_mb": peak / 2 ** 20, "rss_growth_mb": rss_peak}


def _row(name: str, m: dict[str, float], extra: str = "") -> None:
    print(f"  {name:<44} {m['median_s'] * 1e3:>10.1f} ms  {m['py_peak_mb']:>8.1f} MiB"
          f"  {m['rss_growth_mb']:>8.1f} MiB  {extra}", flush=True)


def _header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'analysis':<44} {'median':>13}  {'py peak':>12}  {'rss peak +':>12}")


def _optional(module: str, name: str) -> Optional[Callable]:
    try:
        return getattr(importlib.import_module(f"attention_lens.analysis.{module}"), name)
    except (ImportError, AttributeError) as exc:
        print(f"  (skipped {module}.{name}: not available: {exc})")
        return None


def tl_oracle() -> Any:
    """The tests' TransformerLens oracle module (``tests/tl_oracle.py`` of a source checkout),
    or None with a note when it cannot be loaded."""
    oracle_path = DEFAULT_WEIGHTS.parent / "tests" / "tl_oracle.py"
    try:
        spec = importlib.util.spec_from_file_location("tl_oracle", oracle_path)
        oracle = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(oracle)
        return oracle
    except (ImportError, OSError, AttributeError) as exc:
        print(f"  (TransformerLens side skipped: {exc})")
        return None
