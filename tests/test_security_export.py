"""Page export is bounded: a cap on concurrent exports with a clear message, a timeout, one
shared browser per process; its peak memory is measured."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

from attention_lens import export

pytestmark = pytest.mark.skipif(export.find_chromium() is None and os.environ.get("CI") != "true",
                                reason="page export needs Chromium on this machine")


def panels(n: int = 3) -> list[SimpleNamespace]:
    out = []
    for i in range(n):
        fig = go.Figure(go.Heatmap(z=[[(r * c + i) % 7 for c in range(40)] for r in range(40)]))
        fig.update_layout(title=f"figure {i}", width=600, height=400)
        out.append(SimpleNamespace(name=f"fig{i}", figure=fig, data={"i": i}))
    return out


def tree() -> list[int]:
    """This process and all its descendants (from /proc)."""
    pids, i = [os.getpid()], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            try:
                pids += [int(p) for p in task.read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def browsers() -> int:
    """Chromium browser processes (not their renderers/helpers) under this process."""
    n = 0
    for pid in tree()[1:]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"chrom" in Path(cmd[0].decode(errors="replace")).name.encode() and \
                not any(a.startswith(b"--type=") for a in cmd):
            n += 1
    return n


def export_zip(results: list, barrier: threading.Barrier, items) -> None:
    barrier.wait(30)
    try:
        results.append(export.page_zip("test", items, {"model": "m", "text": "t"}, {}))
    except export.ExportError as exc:
        results.append(exc)


def test_concurrent_exports_are_capped_with_a_clear_message_and_share_one_browser():
    items = panels()
    export.page_zip("test", items[:1], {}, {})  # start the shared browser
    assert browsers() == 1
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(tree()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list = []
    barrier = threading.Barrier(4)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=export_zip, args=(results, barrier, items))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join(10)
    zips = [r for r in results if isinstance(r, bytes)]
    refused = [r for r in results if isinstance(r, export.ExportError)]
    print(f"4 concurrent exports, cap 2: {len(zips)} drawn, {len(refused)} refused in "
          f"{elapsed:.1f} s; peak RSS of the process tree {max(samples):.0f} MB "
          f"(before {samples[0]:.0f} MB); browsers {browsers()}")
    assert len(results) == 4 and 1 <= len(zips) <= 2 and len(refused) >= 2
    for exc in refused:
        assert "already being drawn" in str(exc) and "try again" in str(exc)
    for blob in zips:
        names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
        assert {"fig0.png", "fig2.svg", "manifest.json"} <= set(names)
    assert browsers() == 1  # one shared Chromium, not one per export


def test_an_export_past_its_timeout_stops_with_a_message():
    with pytest.raises(export.ExportError, match="longer than"):
        export.page_zip("test", panels(4), {}, {}, timeout=0.05)
    assert export.page_zip("test", panels(1), {}, {})  # the next export works again


def test_the_export_loop_ends_quietly_when_its_server_stops_the_thread():
    """Dash's threaded runner raises SystemExit in every thread it started when it stops:
    the export browser's loop thread ends without an unhandled-thread error (the next export
    starts a new loop)."""
    import asyncio
    import ctypes

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=export._run_loop, args=(loop,), daemon=True)
    unhandled: list = []
    old_hook = threading.excepthook
    threading.excepthook = unhandled.append
    try:
        thread.start()
        deadline = time.monotonic() + 5
        while not loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)) == 1
        loop.call_soon_threadsafe(lambda: None)  # wake the loop so the exception is raised
        thread.join(5)
        assert not thread.is_alive()
    finally:
        threading.excepthook = old_hook
        loop.close()
    assert unhandled == []
