"""Exporting figures and their data: CSV/JSON per figure, and a zip of a whole page.

Static images are rendered server-side by kaleido on the system Chromium (kaleido finds
``/usr/bin/chromium``; ``BROWSER_PATH`` overrides). Plotly.js comes from the installed
plotly package and MathJax is off, so rendering makes no request to another host.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as _dt
import io
import json
import logging
import threading
import time
import zipfile
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import plotly.graph_objects as go

from . import __version__
from .api_json import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from .analysis.forward import ForwardPass

log = logging.getLogger("attention_lens.export")

IMAGE_SCALE = 3
DEFAULT_SIZE = (1000, 600)
TRACE_COLUMNS = ("x", "y", "z", "text", "customdata")


@dataclass
class Panel:
    """One figure of a page with the data behind it (exported as CSV/JSON and in the zip)."""

    name: str
    figure: go.Figure
    data: Any = None


class ExportError(RuntimeError):
    """Static export is impossible here (no Chromium, render failure); the message says why."""


# ------------------------------------------------------------------------------ data
def to_jsonable(value: Any) -> Any:
    """``value`` made JSON-safe with its numbers exact (the app's one encoder)."""
    return jsonable(value, digits=None)


def panel_json(panel: Panel, state: Optional[dict] = None) -> str:
    """The data behind one figure as JSON (the analysis result, fields as lists)."""
    body = {"figure": panel.name, "model": (state or {}).get("model"),
            "prompt": (state or {}).get("text"), "data": to_jsonable(panel.data)}
    return json.dumps(body, ensure_ascii=False, indent=1)


def _column(values: Any) -> list[Any]:
    if values is None:
        return []
    arr = np.asarray(values, dtype=object)
    return arr.reshape(-1).tolist() if arr.ndim else [arr.item()]


def figure_rows(fig: go.Figure) -> tuple[list[str], list[list[Any]]]:
    """Long-form rows of every trace's data: trace, name, type, x, y, z, text, customdata.

    Heatmaps (``z`` a matrix) give one row per cell with its x and y category.
    """
    header = ["trace", "name", "type", *TRACE_COLUMNS]
    rows: list[list[Any]] = []
    for t_idx, trace in enumerate(fig.data):
        name, kind = getattr(trace, "name", None) or "", trace.type
        z = getattr(trace, "z", None)
        if z is not None and np.ndim(np.asarray(z, dtype=object)) == 2:
            zz = np.asarray(z, dtype=object)
            xs = _column(getattr(trace, "x", None)) or list(range(zz.shape[1]))
            ys = _column(getattr(trace, "y", None)) or list(range(zz.shape[0]))
            text = getattr(trace, "text", None)
            tt = np.asarray(text, dtype=object) if text is not None else None
            for i in range(zz.shape[0]):
                for j in range(zz.shape[1]):
                    cell_text = (tt[i, j] if tt is not None and tt.ndim == 2
                                 and tt.shape == zz.shape else "")
                    rows.append([t_idx, name, kind, xs[j] if j < len(xs) else j,
                                 ys[i] if i < len(ys) else i, zz[i, j], cell_text, ""])
            continue
        cols = {c: _column(getattr(trace, c, None)) if hasattr(trace, c) else []
                for c in TRACE_COLUMNS}
        if hasattr(trace, "customdata") and trace.customdata is not None:
            cd = np.asarray(trace.customdata, dtype=object)
            cols["customdata"] = ([json.dumps(to_jsonable(r), ensure_ascii=False) for r in cd]
                                  if cd.ndim == 2 else _column(cd))
        n = max((len(v) for v in cols.values()), default=0)
        for i in range(n):
            rows.append([t_idx, name, kind] + [cols[c][i] if i < len(cols[c]) else ""
                                               for c in TRACE_COLUMNS])
    return header, rows


def figure_csv(fig: go.Figure) -> str:
    """The data of every trace of ``fig`` as CSV (see :func:`figure_rows`)."""
    header, rows = figure_rows(fig)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in to_jsonable(row)])
    return out.getvalue()


# ---------------------------------------------------------------------------- images
def find_chromium() -> Optional[str]:
    """Path of the Chromium kaleido would use, or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None


def _size(fig: go.Figure) -> tuple[int, int]:
    width = fig.layout.width or DEFAULT_SIZE[0]
    height = fig.layout.height or DEFAULT_SIZE[1]
    return int(width), int(height)


@dataclass
class ExportLimits:
    """How many page exports a process draws at once, and how long one may take."""

    max_concurrent: int = 2
    timeout_s: float = 120.0


_LIMITS = ExportLimits()
_SLOTS = threading.BoundedSemaphore(_LIMITS.max_concurrent)


def configure(max_concurrent: Optional[int] = None, timeout_s: Optional[float] = None) -> None:
    """Set the export limits of this process (the server calls this from its configuration)."""
    global _SLOTS
    if max_concurrent is not None and max_concurrent != _LIMITS.max_concurrent:
        _LIMITS.max_concurrent = max(1, int(max_concurrent))
        _SLOTS = threading.BoundedSemaphore(_LIMITS.max_concurrent)
    if timeout_s is not None:
        _LIMITS.timeout_s = float(timeout_s)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The export browser's event loop. A threaded server stopping raises SystemExit in the
    threads it started (Dash's test runner does): the loop then ends quietly, and the next
    export starts a new one."""
    try:
        loop.run_forever()
    except SystemExit:
        log.info("the export browser's event loop was stopped with its server")

class _Renderer:
    """One Chromium (one kaleido tab) per process, started on first use and shared by exports.

    Starting a browser per export cost seconds and up to gigabytes each; here every export
    queues its figures on the same tab, on an event loop in a background thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._kaleido: Any = None
        self._thread: Optional[threading.Thread] = None

    def _open(self, timeout: float) -> tuple[asyncio.AbstractEventLoop, Any]:
        with self._lock:
            if self._loop is not None and not (self._thread and self._thread.is_alive()):
                # the loop's thread died (killed with its host server, say): start afresh
                log.warning("the export browser's event loop stopped; starting a new one")
                self._discard()
            if self._loop is None:
                import kaleido

                async def start() -> Any:
                    k = kaleido.Kaleido(n=1, timeout=timeout, mathjax=False)
                    await k.__aenter__()
                    return k

                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True,
                                                name="attention-lens-kaleido")
                self._thread.start()
                try:
                    self._kaleido = asyncio.run_coroutine_threadsafe(start(), loop).result(
                        timeout)
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)
                    raise
                self._loop = loop
            return self._loop, self._kaleido

    def render(self, fig: go.Figure, opts: dict[str, Any], deadline: float) -> bytes:
        """``fig`` drawn with kaleido ``opts``, or TimeoutError past ``deadline`` (monotonic).

        A render that fails is tried once more on a fresh browser (Chromium can lose a tab).
        """
        for attempt in (1, 2):
            loop, k = self._open(max(1.0, deadline - time.monotonic()))
            future = asyncio.run_coroutine_threadsafe(k.calc_fig(fig, opts=opts), loop)
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except (TimeoutError, FutureTimeout):
                future.cancel()
                self.close(k)  # the tab may still be busy with it
                raise
            except Exception as exc:  # noqa: BLE001 - kaleido/Chromium failures of every kind
                log.warning("export render failed (attempt %d): %s", attempt, str(exc)[:200])
                self.close(k)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _discard(self) -> None:
        """Forget the browser without asking it to close (its loop may be dead): kill it."""
        proc = getattr(self._kaleido, "subprocess", None)
        if proc is not None:
            try:
                proc.kill()
                proc.wait(5)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop, self._kaleido, self._thread = None, None, None

    def reset(self) -> None:
        """Kill the shared browser and its loop at once; the next export starts new ones."""
        with self._lock:
            self._discard()

    def close(self, which: Any = None) -> None:
        """Stop the shared browser (only if it is still ``which``); the next use starts one."""
        with self._lock:
            if self._loop is None or (which is not None and which is not self._kaleido):
                return
            loop, k, self._loop, self._kaleido = self._loop, self._kaleido, None, None
        try:
            asyncio.run_coroutine_threadsafe(k.__aexit__(None, None, None), loop).result(15)
        except BaseException:  # noqa: BLE001 - it is being thrown away either way
            log.warning("the export browser did not close cleanly")
        finally:
            loop.call_soon_threadsafe(loop.stop)


_RENDERER = _Renderer()


def render_images(figs: Sequence[go.Figure], formats: Sequence[str] = ("png", "svg"),
                  timeout: Optional[float] = None) -> list[dict[str, bytes]]:
    """Render each figure in each format on the shared browser; ``[{fmt: bytes}]`` per figure.

    At most :func:`configure`'s ``max_concurrent`` exports draw at once in a process (more
    get an :class:`ExportError` saying so at once), and one export takes at most ``timeout``
    seconds (default: the configured one).
    """
    if find_chromium() is None:
        raise ExportError("Export page needs Chromium on the server to draw the figures "
                          "(install it, e.g. `apt-get install chromium`, or set "
                          "BROWSER_PATH). The PNG and SVG buttons under each graph work "
                          "without it.")
    limit = _LIMITS.timeout_s if timeout is None else timeout
    slots = _SLOTS
    if not slots.acquire(blocking=False):
        raise ExportError(f"{_LIMITS.max_concurrent} page export(s) are already being drawn "
                          "on the server; try again in a minute (the PNG and SVG buttons "
                          "under each graph work meanwhile).")
    try:
        deadline = time.monotonic() + limit
        out: list[dict[str, bytes]] = []
        for fig in figs:
            width, height = _size(fig)
            images = {}
            for fmt in formats:
                opts = {"format": fmt, "width": width, "height": height,
                        "scale": IMAGE_SCALE if fmt == "png" else 1}
                images[fmt] = _RENDERER.render(fig, opts, deadline)
            out.append(images)
        return out
    except (TimeoutError, FutureTimeout):
        raise ExportError(f"drawing the figures took longer than {limit:.0f} s") from None
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - kaleido/Chromium failures of every kind
        raise ExportError(f"Chromium could not draw the figures ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from None
    finally:
        slots.release()


# ------------------------------------------------------------------------------- zip
def manifest(page: str, panels: Sequence[Panel], state: dict, settings: dict,
             fp: Optional["ForwardPass"] = None) -> dict[str, Any]:
    """What a page export contains and how to reproduce it."""
    m: dict[str, Any] = {
        "app": "attention-lens",
        "app_version": __version__,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "page": page,
        "model": state.get("model"),
        "prompt": state.get("text"),
        "pinned_position": state.get("pos"),
        "settings": to_jsonable(settings),
        "figures": [{"name": p.name,
                     "files": [f"{p.name}.{ext}" for ext in ("png", "svg", "csv", "json",
                                                             "plotly.json")]}
                    for p in panels],
        "image_scale_png": IMAGE_SCALE,
    }
    if fp is not None:
        m.update(token_ids=to_jsonable(fp.token_ids), tokens=list(fp.tokens),
                 n_prompt_tokens=fp.n_prompt_tokens, truncated=fp.truncated)
    return m


def page_zip(page: str, panels: Sequence[Panel], state: dict, settings: dict,
             fp: Optional["ForwardPass"] = None, *, images: bool = True,
             timeout: Optional[float] = None) -> bytes:
    """A zip of every figure of a page as PNG and SVG, its data (CSV, JSON) and a manifest."""
    if not panels:
        raise ExportError("this page has no figures to export")
    rendered = render_images([p.figure for p in panels], timeout=timeout) if images else None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, panel in enumerate(panels):
            if rendered is not None:
                zf.writestr(f"{panel.name}.png", rendered[i]["png"])
                zf.writestr(f"{panel.name}.svg", rendered[i]["svg"])
            zf.writestr(f"{panel.name}.csv", figure_csv(panel.figure))
            zf.writestr(f"{panel.name}.json", panel_json(panel, state))
            zf.writestr(f"{panel.name}.plotly.json", panel.figure.to_json())
        zf.writestr("manifest.json", json.dumps(manifest(page, panels, state, settings, fp),
                                                ensure_ascii=False, indent=1))
    return buf.getvalue()
