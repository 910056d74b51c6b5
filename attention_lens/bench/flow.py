"""Suite 3 (``--page-flow``): every API endpoint and every page on a GPT-2-small-shaped
random model, first and second call, with the resident set size; ``--soak`` distinct prompts
then against the caches' configured bound."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..model import LoadedModel
from ..model.shapes import GPT2_SHAPE, random_gpt2_shape
from ..model.texts import flow_prompt
from ..registry import Registry
from .measure import _current_rss_mb, _rss_mb, _RssSampler


def api_calls(text: str) -> list[tuple[str, str, Optional[dict]]]:
    """(method, path, JSON body) of every API endpoint, on ``text`` where it reads a prompt."""
    body = {"text": text}
    return [
        ("POST", "/api/predict", body), ("POST", "/api/token-predictions", body),
        ("POST", "/api/attention", body), ("POST", "/api/activations", body),
        ("POST", "/api/logit-lens", body), ("GET", "/api/weights", None),
        ("GET", "/api/embeddings", None),
        ("POST", "/api/analogy", {"positive": ["king", "woman"], "negative": ["man"]}),
        ("POST", "/api/eigenvalues", body), ("POST", "/api/induction-score", body),
        ("POST", "/api/attribution", body),
        ("POST", "/api/ablation", {**body, "heads": [[0, 0], [5, 3]]}),
        ("GET", "/api/models", None),
    ]


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak resident MiB during the call, result)."""
    sampler = _RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    sampler.stop()
    return dt, sampler.peak, out


def _draw_page(P: Any, page: str, state: dict, compute: bool = True) -> str:
    """Build a page's figures with default settings; the alert it shows instead, or "".
    ``compute`` False: only what the page's own callback draws (a web worker's share; the
    analyses it leaves to background jobs are not computed)."""
    from ..analysis.errors import AnalysisError
    from ..weight_analyses import Missing

    try:
        P.page_panels(page, state, {}, compute=compute)
    except AnalysisError as exc:
        return str(exc)
    except Missing as exc:
        return str(exc)
    return ""


def bench_page_flow(lengths: tuple[int, ...] = (64, 256), soak: int = 0, visits: bool = True,
                    quiet: bool = False, only: Optional[list[str]] = None,
                    model: Optional[LoadedModel] = None, jobs: bool = True
                    ) -> Optional[dict]:
    """Every API endpoint and every page on a GPT-2-small-shaped random model (or ``model``).

    Each endpoint and page is called twice per prompt length (first: forward pass and
    analyses computed; second: from the caches), through the server's own Flask app and
    the pages' panels (no browser), with the resident set size sampled. ``soak`` distinct
    prompts then visit every page with default settings, and the resident size after them
    is reported against the registry's configured bound (``visits=False`` skips the
    per-length calls). Returns the measurements.
    """
    import tempfile

    from ..components import page as P
    from ..server.config import ServerConfig
    from ..model.hf import gpt2_tokenizer
    from ..server import create_server

    tok = gpt2_tokenizer() if model is None else model.tokenizer
    if tok is None:
        print("\nPage flow: skipped (GPT-2's vocabulary needs the 'hf' extra)")
        return None
    say = (lambda *a, **k: None) if quiet else print
    reg = Registry([])
    cache_dir = Path(tempfile.mkdtemp(prefix="attention-lens-bench-"))
    app = create_server(ServerConfig(model=GPT2_SHAPE["name"], cache_dir=cache_dir),
                        registry=reg)
    client = app.server.test_client()
    gc.collect()
    rss0 = _current_rss_mb()  # the app without a model
    lm = random_gpt2_shape(tokenizer=tok) if model is None else model
    reg.add(lm)
    reg.default = lm.name
    client.get("/")
    say(f"\nPage flow, {lm.name} " if model is not None else
        "\nPage flow, random model of GPT-2-small shape with GPT-2's vocabulary ", end="")
    say(f"({lm.cfg.n_params / 1e6:.0f}M parameters, +{_current_rss_mb() - rss0:.0f} MiB); "
        f"resident {_current_rss_mb():.0f} MiB; caches: forward {reg.max_forward_bytes >> 20}"
        f" MiB, weights {reg.max_weights_bytes >> 20} MiB")
    results: dict[str, Any] = {"api": {}, "pages": {}, "rss_base_mb": rss0}
    pages = sorted({*getattr(P, "_PANELS", {}), *(s.page for s in P.declared_pages())})
    pages = [p for p in pages if only is None or p in only]
    for n in lengths if visits else ():
        text = flow_prompt(lm, n, variant=n)
        fwd = [_timed(lambda: reg.forward(text, lm.name)) for _ in range(2)]
        ntok = fwd[0][2].n_tokens
        say(f"  {ntok} tokens{'':<32} {'first':>9} {'second':>9}  {'peak RSS':>9}")
        say(f"  forward pass (registry){'':<15} {fwd[0][0]:>8.2f}s {fwd[1][0]:>8.2f}s "
            f"{max(f[1] for f in fwd):>8.0f}M  (every call below reuses it)", flush=True)
        results.setdefault("forward", {})[ntok] = [f[:2] for f in fwd]
        for method, path, body in api_calls(text):
            def call(m=method, p=path, b=body):
                return (client.open(p, method=m, json=b) if b is not None else client.open(p))
            rows = []
            for _ in range(2):
                dt, peak, resp = _timed(call)
                rows.append((dt, peak, resp.status_code))
            results["api"][(path, ntok)] = rows
            status = "" if rows[0][2] == 200 else f"  HTTP {rows[0][2]}"
            say(f"  {method} {path:<36} {rows[0][0]:>8.2f}s {rows[1][0]:>8.2f}s "
                f"{max(r[1] for r in rows):>8.0f}M{status}", flush=True)
        state = {"model": lm.name, "text": text, "pos": None}
        if only is None or "logit-lens" in only:
            results.setdefault("lens", {})[ntok] = _lens_detail(lm, fwd[0][2], say)
        for page in pages:
            rows = []
            for _ in range(2):
                dt, peak, alert = _timed(lambda pg=page: _draw_page(P, pg, state))
                rows.append((dt, peak))
            results["pages"][(page, ntok)] = rows
            note = f"  (the page says: {alert[:70]})" if alert else ""
            say(f"  page /{page:<34} {rows[0][0]:>8.2f}s {rows[1][0]:>8.2f}s "
                f"{max(r[1] for r in rows):>8.0f}M{note}", flush=True)
    if soak:
        from .. import weight_analyses as W
        from ..analysis.patching import RUN_CACHE_BYTES

        bound = (reg.memory_bound() + W.store().memo_bytes + RUN_CACHE_BYTES) / 2**20
        t0 = time.perf_counter()
        for i in range(soak):
            state = {"model": lm.name, "text": flow_prompt(lm, max(lengths), variant=1000 + i),
                     "pos": None}
            for page in pages:
                _draw_page(P, page, state, compute=jobs)
            gc.collect()
            say(f"    prompt {i + 1}: resident {_current_rss_mb():.0f} MiB "
                f"({time.perf_counter() - t0:.0f} s)", flush=True)
        gc.collect()
        now = _current_rss_mb()
        results["soak"] = {"prompts": soak, "rss_mb": now, "peak_mb": _rss_mb(),
                           "bound_mb": bound}
        say(f"  after {soak} distinct {max(lengths)}-token prompts on every page "
            f"({time.perf_counter() - t0:.0f} s): resident {now:.0f} MiB (peak "
            f"{_rss_mb():.0f} MiB); caches' bound {bound:.0f} MiB (models + forward "
            f"passes + weight analyses + the store's memo); {reg.cache_info()}")
    return results


def _lens_detail(lm: LoadedModel, fp: Any, say: Callable[..., None]) -> dict[str, float]:
    """The logit lens on a cached forward pass: the positions a page shows first, the whole
    grid, and its floor (the float32 products of every stage and position with W_U alone);
    medians of 3, wall and CPU seconds (the CPU over all threads)."""
    from ..analysis.logit_lens import _normalised, lens_stages, logit_lens
    from ..figures.logit_lens import WINDOW

    p = fp.n_tokens
    window = list(range(max(0, p - WINDOW), p))
    stages = lens_stages(lm)

    def products() -> None:
        with torch.no_grad():
            x = _normalised(lm, torch.cat([fp.cache[h] for _, h in stages]))
            for start in range(0, x.shape[0], 160):
                torch.addmm(lm.model.b_U, x[start:start + 160], lm.model.W_U)

    out = {}
    for name, fn in (("window", lambda: logit_lens(lm, fp, positions=window)),
                     ("full", lambda: logit_lens(lm, fp)), ("products", products)):
        runs = []
        for _ in range(3):
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
        out[name] = statistics.median(r[0] for r in runs)
        out[name + "_cpu"] = statistics.median(r[1] for r in runs)
    n_logits = len(stages) * p * lm.cfg.d_vocab
    say(f"  logit lens, cached pass: the {len(window)} positions in view {out['window']:.2f}s "
        f"(CPU {out['window_cpu']:.2f}s); all {p} positions {out['full']:.2f}s (CPU "
        f"{out['full_cpu']:.2f}s); the {n_logits / 1e6:.0f}M float32 products alone "
        f"{out['products']:.2f}s (CPU {out['products_cpu']:.2f}s)", flush=True)
    return out


