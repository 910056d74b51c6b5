"""Benchmark: ``python -m attention_lens.bench`` prints medians and peak memory.

1. Every per-prompt analysis on a 128-token prompt with the shipped two-layer model, with
   the forward pass cached by the :class:`~attention_lens.registry.Registry` (and the cost
   of a second page's analysis on the same prompt, reusing that forward pass).
2. Every weight analysis of the shipped model.
3. The weight analyses (OV/QK SVD, full-OV eigenvalues and copying scores, composition)
   of a random model of GPT-2-small shape built from our own ModelConfig (no training),
   next to a naive dense computation timed on a few heads or pairs and extrapolated.

Timings are medians of ``--reps`` runs. Memory, from two extra runs: the peak of
Python/numpy allocations (tracemalloc; torch's allocator is not traced) and the peak
growth of the resident set size sampled every millisecond (torch included; memory the
allocator kept from earlier runs is reused and not counted again).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .model import HookedTransformer, LoadedModel, ModelConfig
from .registry import DEFAULT_WEIGHTS, Registry

BENCH_TEXT = (
    "Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were "
    "perfectly normal, thank you very much. They were the last people you'd expect to be "
    "involved in anything strange or mysterious, because they just didn't hold with such "
    "nonsense. Mr Dursley was the director of a firm called Grunnings, which made drills. "
    "He was a big, beefy man with hardly any neck, although he did have a very large "
    "moustache. Mrs Dursley was thin and blonde and had nearly twice the usual amount of "
    "neck, which came in very useful as she spent so much of her time craning over garden "
    "fences, spying on the neighbours. The Dursleys had a small son called Dudley and in "
    "their opinion there was no finer boy anywhere. "
) * 3

GPT2_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, n_ctx=1024, d_vocab=50257,
                  attn_only=False, d_mlp=3072, act_fn="gelu_new", normalization_type="LN",
                  name="random-gpt2-shape")


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


def bench_prompt(reps: int) -> None:
    """Per-prompt analyses on a 128-token prompt with the shipped two-layer model."""
    from .analysis.composition import composition_scores
    from .analysis.eigen import attention_spectrum
    from .analysis.embeddings import project_tokens
    from .analysis.forward import run_forward
    from .analysis.heads import head_detection, probe_head_scores

    reg = Registry([DEFAULT_WEIGHTS])
    lm = reg.get("attn-only-2l")
    ids = lm.tokenizer.encode(BENCH_TEXT)[:128]
    text = lm.tokenizer.decode(ids)
    fp = reg.forward(text, lm.name)
    _header(f"Per-prompt analyses, {lm.name}, {fp.n_tokens}-token prompt "
            f"(forward pass cached by the registry)")
    _row("forward pass (cold, run_forward)", measure(lambda: run_forward(lm, text), reps))
    _row("forward pass (registry cache hit)", measure(lambda: reg.forward(text, lm.name), reps))
    from . import weight_analyses as W

    store = W.store()  # the shared store of weight analyses (computed once, then kept)
    probe, eigen, pca = store.get_or_compute(lm, W.probe_head_scores(), W.circuit_eigenvalues(),
                                             W.embedding_pca(n_components=2))
    cases: list[tuple[str, Optional[Callable], dict]] = [
        ("predictions.next_token", _optional("predictions", "next_token"), dict(k=10)),
        ("predictions.token_predictions", _optional("predictions", "token_predictions"),
         dict(k=5)),
        ("attention.attention_patterns", _optional("attention", "attention_patterns"), {}),
        ("attention.residual_stream", _optional("attention", "residual_stream"), {}),
        ("attention.head_outputs", _optional("attention", "head_outputs"), {}),
        ("logit_lens.logit_lens", _optional("logit_lens", "logit_lens"), dict(k=5)),
        ("attribution.logit_attribution", _optional("attribution", "logit_attribution"), {}),
        ("ablation.ablate_heads (2 heads, zero)", _optional("ablation", "ablate_heads"),
         dict(heads=[(1, 5), (1, 0)])),
        ("eigen.attention_spectrum", attention_spectrum, {}),
        ("heads.head_detection (cached probe/eigen)", head_detection,
         dict(probe=probe, eigen=eigen)),
    ]
    for name, fn, kwargs in cases:
        if fn is not None:
            _row(name, measure(lambda fn=fn, kw=kwargs: fn(lm, fp, **kw), reps))
    _row("embeddings.project_tokens (prompt)",
         measure(lambda: project_tokens(lm, pca, fp.token_ids), reps))
    lens = _optional("logit_lens", "logit_lens")
    if lens is not None:
        def second_page() -> None:
            lens(lm, reg.forward(text, lm.name), k=5)

        def without_cache() -> None:
            lens(lm, run_forward(lm, text), k=5)
        a, b = measure(second_page, reps), measure(without_cache, reps)
        _row("second page: cache hit + logit_lens", a,
             f"(vs {b['median_s'] * 1e3:.1f} ms with a fresh forward pass)")

    _header(f"Weight analyses, {lm.name} (computed once per model, then cached)")
    weight_cases = _weight_cases(lm, include_vocab=True)
    weight_cases.append(("probe_head_scores (T=50, B=10)", lambda: probe_head_scores(lm)))
    weight_cases.append(("composition_scores", lambda: composition_scores(lm)))
    for name, fn in weight_cases:
        _row(name, measure(fn, reps))
    _row("weight store hit (in-process memo)", measure(
        lambda: store.get(lm, W.circuit_eigenvalues()), reps))


def _weight_cases(lm: LoadedModel, include_vocab: bool) -> list[tuple[str, Callable]]:
    from .analysis.analogy import analogy
    from .analysis.circuits import circuit_svd
    from .analysis.eigen import circuit_eigenvalues, copying_score, full_ov_eigenvalues
    from .analysis.embeddings import embedding_pca, nearest_neighbours

    cases = [
        ("OV SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "OV")),
        ("QK SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "QK")),
        ("full-OV eigenvalues + copying scores",
         lambda: copying_score(full_ov_eigenvalues(lm))),
        ("all circuit eigenvalues (OV, full OV, QK, full QK)",
         lambda: circuit_eigenvalues(lm)),
    ]
    if include_vocab:
        cases += [
            ("embedding_pca (2000 frequent tokens, k=8)", lambda: embedding_pca(lm)),
            ("nearest_neighbours", lambda: nearest_neighbours(lm, "king")),
            ("analogy 3CosAdd", lambda: analogy(lm, ["king", "woman"], ["man"])),
        ]
    return cases


# ------------------------------------------------------------------ GPT-2 shape
class _IdTokenizer:
    """Stand-in tokenizer for a random model: token i displays as ``<i>``."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.strings = [f"<{i}>" for i in range(vocab_size)]

    def display(self, i: int) -> str:
        return self.strings[i]

    token_text = display


def random_gpt2_shape(seed: int = 0, tokenizer: Any = None) -> LoadedModel:
    """A random model of GPT-2-small shape (12 x 12 heads, d_model 768, vocab 50257).

    ``tokenizer``: e.g. GPT-2's own (``model.hf.gpt2_tokenizer()``) to read text; by default
    a stand-in that only displays ids.
    """
    cfg = ModelConfig(**GPT2_SHAPE)
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).init_weights(seed, std=0.02).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=cfg.name, model=model,
                       tokenizer=tokenizer or _IdTokenizer(cfg.d_vocab))


def _naive_full_ov(lm: LoadedModel, heads: list[tuple[int, int]]) -> None:
    """Per-head vocabulary factors, as a factored-matrix library without the shared Gram does.

    (W_E W_V) [d_vocab, d_head] and (W_O W_U) [d_head, d_vocab] per head, then eig of their
    d_head x d_head product in reverse order.
    """
    m = lm.model
    W_E, W_U = m.W_E, m.ln_final.w[:, None] * m.W_U
    for layer, head in heads:
        a = m.blocks[layer].attn
        ln = m.blocks[layer].ln1.w[:, None]
        left = W_E @ (ln * a.W_V[head])
        right = a.W_O[head] @ W_U
        torch.linalg.eigvals((right @ left).double())


def _naive_ov_svd(lm: LoadedModel, heads: list[tuple[int, int]]) -> None:
    m = lm.model
    for layer, head in heads:
        a = m.blocks[layer].attn
        torch.linalg.svdvals((a.W_V[head] @ a.W_O[head]).double())


def _naive_composition(lm: LoadedModel, pairs: list[tuple[int, int, int, int]]) -> None:
    m = lm.model
    for l1, h1, l2, h2 in pairs:
        a1, a2 = m.blocks[l1].attn, m.blocks[l2].attn
        ov = a1.W_V[h1] @ a1.W_O[h1]
        qk = a2.W_Q[h2] @ a2.W_K[h2].T
        ov2 = a2.W_V[h2] @ a2.W_O[h2]
        for right in (qk, qk.T, ov2):
            ((ov @ right).norm() / (ov.norm() * right.norm())).item()


def bench_gpt2_shape(reps: int) -> float:
    """Weight analyses of a random GPT-2-small-shaped model, with naive dense ratios.

    Returns the median time of the full-OV eigenvalues (for the TransformerLens ratio).
    """
    from .analysis.circuits import circuit_svd
    from .analysis.composition import composition_scores
    from .analysis.eigen import copying_score, full_ov_eigenvalues

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    lm = random_gpt2_shape()
    cfg = lm.cfg
    print(f"\nWeight analyses, random model of GPT-2-small shape ({cfg.n_layers} layers x "
          f"{cfg.n_heads} heads, d_model {cfg.d_model}, d_head {cfg.d_head}, d_vocab "
          f"{cfg.d_vocab}, {cfg.n_params / 1e6:.0f}M parameters): built in "
          f"{time.perf_counter() - t0:.1f} s, peak RSS +{_rss_mb() - rss0:.0f} MiB")
    print(f"  {'analysis':<44} {'median':>13}  {'py peak':>12}  {'rss peak +':>12}  naive dense")
    n_heads = cfg.n_layers * cfg.n_heads
    sample = [(0, 0), (5, 3), (11, 11)]
    n_pairs = sum(cfg.n_heads * cfg.n_heads * (cfg.n_layers - 1 - layer)
                  for layer in range(cfg.n_layers))
    pair_sample = [(0, 0, 1, 0), (3, 4, 7, 2), (10, 11, 11, 5)]
    rows = [
        ("OV SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "OV"),
         lambda: _naive_ov_svd(lm, sample), n_heads / len(sample),
         "dense 768x768 SVD per head"),
        ("QK SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "QK"), None, 0, ""),
        ("full-OV eigenvalues + copying scores",
         lambda: copying_score(full_ov_eigenvalues(lm)),
         lambda: _naive_full_ov(lm, sample), n_heads / len(sample),
         "per-head W_E W_V and W_O W_U factors"),
        ("composition scores (Q, K, V, all pairs)", lambda: composition_scores(lm),
         lambda: _naive_composition(lm, pair_sample), n_pairs / len(pair_sample),
         "dense 768x768 products per pair"),
    ]
    full_ov_median = float("nan")
    with torch.no_grad():
        for name, fn, naive, scale, how in rows:
            m = measure(fn, reps)
            if name.startswith("full-OV"):
                full_ov_median = m["median_s"]
            extra = ""
            if naive is not None:
                t1 = time.perf_counter()
                naive()
                est = (time.perf_counter() - t1) * scale
                extra = (f"{est:8.1f} s est. ({how}; timed on a sample, x{scale:.0f}) "
                         f"-> {est / m['median_s']:.0f}x faster")
            _row(name, m, extra)
    return full_ov_median


# ------------------------------------------------------------------ page flow
def flow_prompt(lm: LoadedModel, n_tokens: int, variant: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` tokens of ``lm`` (``variant`` shuffles its words, so
    each variant is a distinct prompt)."""
    import random

    words = BENCH_TEXT.split()
    random.Random(variant).shuffle(words)
    ids = lm.tokenizer.encode(" ".join(words * (1 + 4 * n_tokens // len(words))))[:n_tokens]
    return lm.tokenizer.decode(ids)


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
    from .analysis.errors import AnalysisError
    from .weight_analyses import Missing

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

    from .components import page as P
    from .server.config import ServerConfig
    from .model.hf import gpt2_tokenizer
    from .server import create_server

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
        from . import weight_analyses as W
        from .analysis.patching import RUN_CACHE_BYTES

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
    from .analysis.logit_lens import _normalised, lens_stages, logit_lens
    from .figures.logit_lens import WINDOW

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


#: Run by ``--transformer-lens PYTHON`` in that interpreter (a separate virtual environment
#: with transformer_lens installed): the same random shape, full-OV eigenvalues through
#: TransformerLens' FactoredMatrix (W_E @ OV @ W_U).eigenvalues, medians of ``reps`` runs.
_TL_SNIPPET = """
import json, statistics, sys, time, torch
import transformer_lens
from transformer_lens import HookedTransformer, HookedTransformerConfig
shape, reps = json.loads(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=shape["n_layers"], d_model=shape["d_model"],
    n_heads=shape["n_heads"], d_head=shape["d_head"], n_ctx=shape["n_ctx"],
    d_vocab=shape["d_vocab"], d_mlp=shape["d_mlp"], act_fn=shape["act_fn"],
    normalization_type=shape["normalization_type"])
model = HookedTransformer(cfg)
times = []
with torch.no_grad():
    for _ in range(reps):
        t = time.perf_counter()
        ev = (model.W_E @ model.OV @ model.W_U).eigenvalues
        (ev.sum(-1).real / ev.abs().sum(-1)).numpy()
        times.append(time.perf_counter() - t)
from importlib.metadata import version as _v
version = _v("transformer-lens")
print(json.dumps({"median_s": statistics.median(times), "times": times, "version": version,
                  "torch": torch.__version__}))
"""


def bench_transformer_lens(python: str, reps: int) -> Optional[float]:
    """Time TransformerLens' full-OV eigenvalues in another interpreter; return the median."""
    import json
    import subprocess

    try:
        out = subprocess.run([python, "-c", _TL_SNIPPET, json.dumps(GPT2_SHAPE), str(reps)],
                             capture_output=True, text=True, check=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"  TransformerLens run failed: {exc}")
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  TransformerLens {res['version']} (torch {res['torch']}) FactoredMatrix full-OV "
          f"eigenvalues: median {res['median_s']:.2f} s of {reps} "
          f"({', '.join(f'{t:.2f}' for t in res['times'])})")
    return float(res["median_s"])


# ------------------------------------------------------------------ activation patching
def _patching_pair(ids: list[int], corrupt_at: int, replacement: int) -> tuple[list[int],
                                                                              list[int]]:
    """A repeated sequence (second half = first half) and a copy with one token changed."""
    clean = ids + ids
    corrupted = list(clean)
    corrupted[corrupt_at] = replacement if replacement != clean[corrupt_at] else replacement + 1
    return clean, corrupted


def _tl_sampled(tl: Any, corrupted: list[int], clean: list[int], metric: Callable,
                granularity: str, n_cells: int, sample: int, seed: int = 0
                ) -> tuple[tuple[float, float], Any, Any]:
    """(wall, CPU) seconds of TransformerLens' patching loop on ``sample`` cells (all if
    fewer), its values, and the sampled cells (a DataFrame of indices)."""
    import itertools

    import pandas as pd
    from transformer_lens import patching as tlp

    setter, act, axes = {
        "resid_pre": (tlp.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
        "head_out_by_pos": (tlp.layer_pos_head_vector_patch_setter, "z",
                            ("layer", "pos", "head")),
    }[granularity]
    sizes = {"layer": tl.cfg.n_layers, "pos": len(clean), "head": tl.cfg.n_heads}
    cells = list(itertools.product(*(range(sizes[a]) for a in axes)))
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(cells), size=min(sample, len(cells)), replace=False))
    index = pd.DataFrame([cells[i] for i in pick], columns=list(axes))
    _, cache = tl.run_with_cache(torch.tensor([clean]))
    t0, c0 = time.perf_counter(), time.process_time()
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        out = tlp.generic_activation_patch(tl, torch.tensor([corrupted]), cache, metric,
                                           patch_setter=setter, activation_name=act,
                                           index_df=index)
    return (time.perf_counter() - t0, time.process_time() - c0), out.numpy(), index


def _hooks_grid(s: Any, granularity: str, batch: int = 64) -> tuple[np.ndarray, int]:
    """The same grid through the model's own hooks: full forward passes of the base prompt,
    ``batch`` patched runs per pass, one hook replacing the activation; the cells the engine
    skips (an identical value, or a row the last layer's metric cannot see) skipped too.
    Returns the grid and the patched runs computed."""
    lm, n = s.lm, s.n
    L, H = lm.cfg.n_layers, lm.cfg.n_heads
    hook, by_head = {"head_out_by_pos": ("attn.hook_z", True),
                     "resid_pre": ("hook_resid_pre", False)}[granularity]
    name = "z" if by_head else "resid_pre"
    out = np.full((L, s.n_tokens, H) if by_head else (L, s.n_tokens), s.base_metric)
    tokens = torch.tensor([s.base_ids[:n]], device=lm.model.device)
    done = 0
    with torch.no_grad():
        for layer in range(L):
            src, base = s.source[name, layer], s.base[name, layer]
            cells = [(p, h) for p in range(n) for h in (range(H) if by_head else (0,))
                     if not (by_head and layer == L - 1 and p != n - 1)
                     and not torch.equal(src[p, h] if by_head else src[p],
                                         base[p, h] if by_head else base[p])]
            for i in range(0, len(cells), batch):
                chunk = cells[i:i + batch]
                pos = torch.tensor([c[0] for c in chunk])
                heads = torch.tensor([c[1] for c in chunk])
                rows = torch.arange(len(chunk))

                def patch(x: torch.Tensor, hook: Any, pos=pos, heads=heads, rows=rows
                          ) -> torch.Tensor:
                    x = x.clone()
                    if by_head:
                        x[rows, pos, heads] = src[pos, heads]
                    else:
                        x[rows, pos] = src[pos]
                    return x
                logits = lm.model.run_with_hooks(tokens.expand(len(chunk), -1),
                                                 fwd_hooks=[(f"blocks.{layer}.{hook}", patch)])
                vals = s.metric(logits[:, -1]).double().numpy()
                for (p, h), v in zip(chunk, vals):
                    out[(layer, p, h) if by_head else (layer, p)] = v
                done += len(chunk)
    return out, done


def bench_patching(reps: int, tl_sample: int, gpt2: bool = True) -> None:
    """Activation patching grids, ours (exact, batched) beside TransformerLens' loop.

    TransformerLens runs on the same weights (tests/tl_oracle.py) in this process; where a
    grid would take it minutes it is timed on ``tl_sample`` random cells and extrapolated
    (the sampled cells are also compared with ours).
    """
    from .analysis.patching import _Setup, activation_patching

    oracle_path = DEFAULT_WEIGHTS.parent / "tests" / "tl_oracle.py"
    to_tl = None
    try:
        spec = importlib.util.spec_from_file_location("tl_oracle", oracle_path)
        oracle = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(oracle)
        to_tl = oracle.to_transformer_lens
    except (ImportError, OSError, AttributeError) as exc:
        print(f"  (TransformerLens side skipped: {exc})")

    def run(lm: LoadedModel, clean: list[int], corrupted: list[int], granularities: list[str],
            n_reps: int, heavy: bool = False) -> None:
        s = _Setup(lm, clean, corrupted, 0, 1, "logit_diff", "denoising", -1)
        top = s.corrupted.logits.topk(2).indices.tolist()
        correct = int(s.clean.logits.argmax())
        wrong = top[0] if top[0] != correct else top[1]
        kw = dict(correct=correct, wrong=wrong)
        tl = to_tl(lm) if to_tl is not None else None
        metric = _Setup(lm, clean, corrupted, correct, wrong, "logit_diff", "denoising",
                        -1).metric.on_full_logits
        for g in granularities:
            def once(g: str = g, attribution: bool = False) -> tuple[Any, float, float, float]:
                """One grid: (result, wall s, CPU s over all threads, peak RSS growth MiB)."""
                last = [0.0]

                def progress(done: int, total: int) -> None:
                    if heavy and time.perf_counter() - last[0] > 30:
                        last[0] = time.perf_counter()
                        print(f"    ... {done}/{total} patched runs", flush=True)
                gc.collect()
                sampler = _RssSampler()
                sampler.start()
                t0, c0 = time.perf_counter(), time.process_time()
                res = activation_patching(lm, clean, corrupted, granularity=g,
                                          attribution=attribution, progress=progress, **kw)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                return res, wall, cpu, sampler.stop()

            grid, wall, cpu, rss = once()
            walls = [wall] + [once()[1] for _ in range(n_reps - 1)]
            median = statistics.median(walls)
            extra = ("" if heavy else
                     f", with attribution patching {once(attribution=True)[1]:.3f} s")
            print(f"  {g}: {grid.n_runs} patched runs ({grid.n_computed} computed, the rest "
                  f"patch an identical value or cannot reach the metric): median {median:.3f} s "
                  f"of {len(walls)} (min {min(walls):.3f}; CPU {cpu:.3f} s over all threads)"
                  f"{extra}; peak RSS growth +{rss:.0f} MiB, process peak RSS "
                  f"{_rss_mb():.0f} MiB", flush=True)
            if tl is None:
                continue
            (secs, tl_cpu), theirs, index = _tl_sampled(tl, corrupted, clean, metric, g,
                                                        grid.n_runs, tl_sample)
            est = secs * grid.n_runs / len(index)
            est_cpu = tl_cpu * grid.n_runs / len(index)
            ours_cells = grid.values[tuple(index[c].to_numpy() for c in index.columns)]
            how = ("all cells" if len(index) == grid.n_runs else
                   f"{len(index)} random cells timed, x{grid.n_runs / len(index):.0f}")
            print(f"    TransformerLens {secs:.2f} s ({how}); max |ours - theirs| on those "
                  f"cells {np.abs(ours_cells - theirs).max():.1e}; CPU time ours {cpu:.2f} s "
                  f"vs TransformerLens {est_cpu:.1f} s -> {est_cpu / cpu:.0f}x")
            print(f"activation patching {g} ({lm.name}, {len(clean)}-token pair): ours "
                  f"{median:.3f} s vs TransformerLens {est:.1f} s -> "
                  f"{est / median:.0f}\u00d7 faster", flush=True)
            if heavy:
                continue
            setup = _Setup(lm, clean, corrupted, correct, wrong, "logit_diff", "denoising", -1)
            t0 = time.perf_counter()
            hooked, n_hooked = _hooks_grid(setup, g)
            hooks_s = time.perf_counter() - t0
            print(f"  the same grid through the model's own hooks (64 patched runs per pass, "
                  f"{n_hooked} computed): {hooks_s:.2f} s, max |engine - hooks| "
                  f"{np.abs(hooked - grid.values).max():.1e} -> the engine is "
                  f"{hooks_s / median:.0f}x faster", flush=True)

    torch.manual_seed(0)
    lm = Registry([DEFAULT_WEIGHTS]).get("attn-only-2l")
    ids = lm.tokenizer.encode(BENCH_TEXT)[:64]
    clean, corrupted = _patching_pair(ids, 4, lm.tokenizer.encode(" the")[0])
    print(f"\nActivation patching, {lm.name}, {len(clean)}-token pair (second half repeats "
          f"the first; token 4 corrupted), logit difference at the last position, denoising")
    run(lm, clean, corrupted, ["head_out_by_pos", "resid_pre"], reps)
    _patching_page()
    if not gpt2:
        return
    big = random_gpt2_shape()
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1000, big.cfg.d_vocab, 32)]
    clean, corrupted = _patching_pair(ids, 4, 500)
    print(f"\nActivation patching, random GPT-2-small shape ({big.cfg.n_layers} x "
          f"{big.cfg.n_heads} heads, d_model {big.cfg.d_model}), {len(clean)}-token pair "
          f"(token 4 corrupted)")
    run(big, clean, corrupted, ["head_out_by_pos"], 1, heavy=True)

# ------------------------------------------------------------------ circuit discovery
def _tl_eap(tl: Any, clean: list[int], corrupted: list[int], metric: Callable) -> np.ndarray:
    """EAP written with TransformerLens hooks (split q/k/v inputs, per-head results): the
    corrupted-minus-clean sender activations dotted with the gradient of the metric with
    respect to each receiver's input on the clean run; [senders, receiver inputs] summed over
    positions, senders (input, each head, each MLP) by receivers (each head's q, k, v input,
    each MLP's input, the final residual)."""
    cfg = tl.cfg
    tl.set_use_split_qkv_input(True)
    tl.set_use_attn_result(True)
    if not cfg.attn_only:
        tl.set_use_hook_mlp_in(True)
    senders = ["hook_embed", "hook_pos_embed"] + [
        f"blocks.{layer}.{h}" for layer in range(cfg.n_layers)
        for h in (("attn.hook_result",) if cfg.attn_only else ("attn.hook_result",
                                                              "hook_mlp_out"))]
    receivers = [f"blocks.{layer}.hook_{c}_input" for layer in range(cfg.n_layers)
                 for c in "qkv"]
    if not cfg.attn_only:
        receivers += [f"blocks.{layer}.hook_mlp_in" for layer in range(cfg.n_layers)]
    receivers.append(f"blocks.{cfg.n_layers - 1}.hook_resid_post")

    def acts(tokens: list[int]) -> torch.Tensor:
        _, cache = tl.run_with_cache(torch.tensor([tokens]), names_filter=senders)
        rows = [cache["hook_embed"][0] + cache["hook_pos_embed"][0]]
        for name in senders[2:]:
            a = cache[name][0]
            rows += list(a.unbind(1)) if a.ndim == 3 else [a]
        return torch.stack(rows)  # [S, n, d]

    diff = acts(corrupted) - acts(clean)
    grads: dict[str, torch.Tensor] = {}

    def keep(grad: torch.Tensor, hook: Any) -> None:
        grads[hook.name] = grad.detach()[0]

    for name in receivers:
        tl.add_hook(name, keep, dir="bwd")
    try:
        metric(tl(torch.tensor([clean]))).backward()
    finally:
        tl.reset_hooks()
    cols = []
    for name in receivers:
        g = grads[name]
        cols += list(g.unbind(1)) if g.ndim == 3 else [g]  # per head, or one input
    G = torch.stack(cols)  # [R, n, d]
    return torch.einsum("snd,rnd->sr", diff.double(), G.double()).numpy()


#: ACDC's threshold in the bench, as a fraction of the metric's range (full model minus every
#: edge ablated).
ACDC_RELATIVE = 0.02


def bench_circuit(reps: int, gpt2: bool = True) -> None:
    """Edge attribution (EAP, EAP-IG), exact edge patching and the faithfulness curve on
    attn-only-2l with a 128-token pair; the same EAP with TransformerLens hooks beside it."""
    from .analysis import patching as PT
    from .analysis.circuit import Problem, edge_scores, faithfulness_curve
    from .analysis.circuit.graph import edge_graph

    lm = Registry([DEFAULT_WEIGHTS]).get("attn-only-2l")
    ids = lm.tokenizer.encode(BENCH_TEXT)[:64]
    clean, corrupted = _patching_pair(ids, 4, lm.tokenizer.encode(" the")[0])
    correct, wrong = PT.default_answers(lm, clean, corrupted)
    pair = PT.PromptPair(clean, corrupted, correct, wrong)
    g = edge_graph(lm.cfg)
    print(f"\nCircuit discovery, {lm.name}, {len(clean)}-token pair (second half repeats the "
          f"first; token 4 corrupted), logit difference at the last position; {g.n_edges} "
          f"edges ({g.n_senders} senders, {len(g.receivers)} receiver inputs)")

    def timed(fn: Callable[[], Any], n: int) -> tuple[float, list[float], Any]:
        walls, out = [], None
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            walls.append(time.perf_counter() - t0)
        return statistics.median(walls), walls, out

    def line(name: str, median: float, walls: list[float], target: float, extra: str = ""
             ) -> None:
        ok = "within" if median <= target else "OVER"
        print(f"  {name:<52} median {median:7.3f} s of {len(walls)} (min {min(walls):.3f}); "
              f"target <= {target:g} s: {ok}{extra}", flush=True)

    def forward() -> None:
        with torch.no_grad():
            lm.model(torch.tensor([clean]))

    fwd_s, walls, _ = timed(forward, reps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  reference: one plain forward pass of the model on the pair's clean prompt "
          f"median {fwd_s:.3f} s of {len(walls)}; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    eap_s, walls, eap = timed(lambda: edge_scores(lm, [pair], method="eap"), reps)
    line("EAP, every edge (1 forward + 1 backward, setup incl.)", eap_s, walls, 0.5)
    ig_s, walls, ig = timed(lambda: edge_scores(lm, [pair], method="eap_ig", steps=5), reps)
    line("EAP-IG, 5 steps, every edge", ig_s, walls, 2.0)
    ex_s, walls, exact = timed(lambda: edge_scores(lm, [pair], method="exact"),
                               max(1, min(reps, 2)))
    line(f"exact edge patching, every edge ({g.n_edges} runs)", ex_s, walls, 30.0)
    corr = np.corrcoef(eap.scores, exact.scores)[0, 1]
    corr_ig = np.corrcoef(ig.scores, exact.scores)[0, 1]
    print(f"    correlation with exact edge patching: EAP {corr:.4f}, EAP-IG (5) {corr_ig:.4f}; "
          f"max |EAP - exact| {np.abs(eap.scores - exact.scores).max():.3f}")
    prob = Problem(lm, [pair], "logit_diff", -1, "resample")
    cv_s, walls, curve = timed(lambda: faithfulness_curve(prob, eap.scores, n_sizes=20,
                                                          n_random=20), max(1, min(reps, 2)))
    n_runs = 3 * (2 + len(curve.k) * 21)
    line(f"faithfulness curve, {len(curve.k)} sizes x 3 ablations x 20 random "
         f"({n_runs} runs)", cv_s, walls, 20.0)
    for a, ablation in enumerate(curve.ablations):
        reach = curve.edges_to_reach(0.8, ablation)
        rand = curve.edges_to_reach(0.8, ablation, random=True)
        print(f"    {ablation}: 80 % of the metric at {reach} edges (random circuits: "
              f"{rand}); faithfulness by size " + ", ".join(
                  f"{int(k)}:{f:.2f}" for k, f in zip(curve.sizes, curve.faithfulness[a])))
    from .analysis.circuit.search import acdc

    # the threshold relative to the metric's range (the full model's metric minus every
    # edge's resampled one), so it means the same on any model and metric
    a = list(curve.ablations).index("resample")
    full, empty = float(curve.full_metric[a]), float(curve.empty_metric[a])
    thr = ACDC_RELATIVE * abs(full - empty)
    ac_s, walls, (kept, metric) = timed(lambda: acdc(prob, thr), 1)
    line(f"ACDC-style greedy removal, threshold {ACDC_RELATIVE:.1%} of the metric's range "
         f"= {thr:.4f} (resample)", ac_s, walls, 30.0,
         f"; {int(kept.sum())} edges kept, metric {metric:.4f} (full model {full:.4f}, "
         f"every edge ablated {empty:.4f}); faithfulness "
         f"{(metric - empty) / (full - empty):.3f}")
    # TransformerLens, the same EAP computation written with its hooks
    oracle_path = DEFAULT_WEIGHTS.parent / "tests" / "tl_oracle.py"
    try:
        spec = importlib.util.spec_from_file_location("tl_oracle", oracle_path)
        oracle = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(oracle)
        tl = oracle.to_transformer_lens(lm)
    except (ImportError, OSError, AttributeError) as exc:
        print(f"  (TransformerLens side skipped: {exc})")
        tl = None
    if tl is not None:
        metric = prob.pairs[0].metric.on_full_logits
        _tl_eap(tl, clean, corrupted, metric)  # warm up
        tl_s, walls, theirs = timed(lambda: _tl_eap(tl, clean, corrupted, metric), reps)
        ours = np.zeros_like(theirs)
        col = {r: i for i, r in enumerate(g.receivers)}
        for e in range(g.n_edges):
            ours[g.src[e], col[g.receivers[g.dst[e]]]] = eap.scores[e]
        valid = np.zeros_like(theirs, bool)
        valid[g.src, [col[g.receivers[r]] for r in g.dst]] = True
        print(f"  TransformerLens hooks, the same EAP: median {tl_s:.3f} s of {len(walls)}; "
              f"max |ours - theirs| {np.abs(ours[valid] - theirs[valid]).max():.1e}")
        print(f"edge attribution: ours {eap_s:.3f} s vs TransformerLens {tl_s:.3f} s -> "
              f"{tl_s / eap_s:.1f}\u00d7 faster", flush=True)
    if not gpt2:
        return
    big = random_gpt2_shape()
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1000, big.cfg.d_vocab, 32)]
    clean, corrupted = _patching_pair(ids, 4, 500)
    big_pair = PT.PromptPair(clean, corrupted, 1000, 1001)
    steps: list[tuple[float, int, int]] = []
    gc.collect()
    sampler = _RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    res = edge_scores(big, [big_pair], method="eap",
                      progress=lambda d, t: steps.append((time.perf_counter() - t0, d, t)))
    wall = time.perf_counter() - t0
    rss = sampler.stop()
    print(f"\nCircuit discovery, random GPT-2-small shape ({big.cfg.n_layers} x "
          f"{big.cfg.n_heads} heads, d_model {big.cfg.d_model}), {len(clean)}-token pair: "
          f"EAP on {res.graph.n_edges:,} edges {wall:.2f} s (target <= 20 s; progress "
          f"reported {len(steps)} times); peak RSS growth +{rss:.0f} MiB, process peak RSS "
          f"{_rss_mb():.0f} MiB", flush=True)


#: Pairs the page has not seen: a sentence whose second copy stops inside a word.
PAGE_PAIR_SENTENCES = (
    " Tom took Mary to a small cafe near the old harbour after the long meeting.",
    " Lena sent Oskar a blue letter about modern Paris during the cold spring.",
    " Omar lent Julia a green bike for the trip along the quiet river last summer.",
)


def _patching_page() -> None:
    """The /patching page from a new pair to every drawn figure (exact and attribution grids,
    scatter, path patching from the sender head) on attn-only-2l, as its callbacks run; one
    draw per pair of :data:`PAGE_PAIR_SENTENCES`, so no pair is drawn twice."""
    import tempfile

    from .analysis.patching import corrupt_one_token
    from .components import page as P
    from .server.config import ServerConfig
    from .server import create_server

    reg = Registry([DEFAULT_WEIGHTS])
    cache = Path(tempfile.mkdtemp(prefix="attention-lens-bench-"))
    create_server(ServerConfig(model="attn-only-2l", cache_dir=cache), registry=reg)
    spec = P.spec_of("patching")
    lm = reg.get("attn-only-2l")
    state = {"model": lm.name, "text": "", "pos": None}
    times = []
    for i, sentence in enumerate(PAGE_PAIR_SENTENCES):
        clean = sentence + sentence[:-12]  # the copy stops short of its last words
        corrupted = corrupt_one_token(lm, clean)[0]
        state["text"] = clean + f" {i}"  # a prompt bar the page has not drawn either
        t0 = time.perf_counter()
        drawn = spec.render(state, clean=clean, corrupted=corrupted, correct="", wrong="")
        times.append(time.perf_counter() - t0)
        if not drawn.drew or drawn.errors:
            print(f"  /patching page: did not draw ({drawn.errors})")
            return
    print(f"  /patching page, a new pair to every figure drawn (attn-only-2l, "
          f"{len(lm.tokenizer.encode(clean))} tokens): median {statistics.median(times):.2f} s "
          f"of {len(times)} pairs (max {max(times):.2f} s)", flush=True)


def bench_graph(reps: int, gpt2: bool = True) -> None:
    """QK attribution and the exact attribution graph: attn-only-2l at 128 tokens, then
    (``gpt2``) a random GPT-2-small-shaped model with MLPs as opaque nodes, at as many tokens
    as the graph's edge budget reaches (41)."""
    from .analysis.forward import run_forward
    from .analysis.graph import EDGE_THRESHOLD, NODE_THRESHOLD, attribution_graph, prune_graph
    from .analysis.qk_attribution import qk_attribution, qk_attribution_row

    def cpu(fn: Callable[[], Any]) -> str:
        """CPU seconds of one call on one thread: the work itself, which a busy machine's
        wall time hides (and which spinning threads inflate); a quiet machine's wall-time
        bound."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t0 = time.process_time()
            fn()
            return f"1-thread cpu {time.process_time() - t0:.3f} s"
        finally:
            torch.set_num_threads(threads)

    def cases(lm: LoadedModel, n_tokens: int, layer: int, head: int) -> None:
        text = None if isinstance(lm.tokenizer, _IdTokenizer) else BENCH_TEXT
        ids = None if text else [int(i) for i in torch.randint(0, lm.cfg.d_vocab, (n_tokens,),
                                                                   generator=torch.Generator()
                                                                   .manual_seed(0))]
        fp = run_forward(lm, text or "", max_tokens=n_tokens, token_ids=ids)
        q = fp.n_tokens - 1
        print(f"  ({lm.name}, {fp.n_tokens} tokens, head L{layer}H{head}, query {q})")
        cell = lambda: qk_attribution(lm, fp, layer=layer, head=head, query=q,  # noqa: E731
                                      key=q // 2)
        row = lambda: qk_attribution_row(lm, fp, layer=layer, head=head, query=q)  # noqa: E731
        both = lambda: prune_graph(attribution_graph(lm, fp), NODE_THRESHOLD,  # noqa: E731
                                   EDGE_THRESHOLD)
        _row("qk_attribution (one cell)", measure(cell, reps), cpu(cell))
        _row("qk_attribution_row (whole query row)", measure(row, reps), cpu(row))
        graph = attribution_graph(lm, fp)
        size = f"{graph.n_nodes} nodes, {len(graph.weight)} edges"
        del graph
        _row(f"attribution_graph + prune_graph({NODE_THRESHOLD}, {EDGE_THRESHOLD})",
             measure(both, reps), f"{cpu(both)}; {size}")

    _header("QK attribution and attribution graph")
    cases(Registry([DEFAULT_WEIGHTS]).get("attn-only-2l"), 128, 1, 5)
    if gpt2:
        from .analysis.graph import largest_position

        big = random_gpt2_shape()
        # the exact graph's edge budget reaches position 40 of GPT-2 small
        cases(big, min(64, largest_position(big.cfg, 64) + 1), 11, 0)
# -------------------------------------------------------------- dataset heads, compare
def bench_heads(reps: int) -> None:
    """Dataset head metrics (shipped model, GPT-2 shape in a worker thread) and /compare."""
    from .analysis.compare import compare
    from .analysis.datasets import Windows, dataset_windows, load_dataset
    from .analysis.forward import run_forward
    from .analysis.head_metrics import head_metrics
    from .figures import compare as FC

    reg = Registry([DEFAULT_WEIGHTS])
    lm = reg.get("attn-only-2l")
    ds = load_dataset("validation")
    t0 = time.perf_counter()
    w = dataset_windows(lm, ds, length=128, max_windows=400)
    cut = time.perf_counter() - t0
    _header(f"Dataset head metrics, {lm.name}: {w.describe()} (cut in {cut * 1e3:.0f} ms)")
    _row("all head metrics, 400 windows x 128 tokens",
         measure(lambda: head_metrics(lm, w), max(1, min(reps, 3))), "(target <= 5 s)")

    g = random_gpt2_shape()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, g.cfg.d_vocab, size=(100, 128))
    gw = Windows(dataset="random ids", sha256="random", tokens=ids, starts=np.arange(100) * 128,
                 length=128, stride=128, n_stream_tokens=12800, n_available=100)
    reports: list[float] = []
    result: dict[str, Any] = {}

    def job() -> None:
        result["hm"] = head_metrics(g, gw, progress=reports.append)

    sampler = _RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    worker = threading.Thread(target=job, name="bench-heads-job")
    worker.start()
    worker.join()
    took = time.perf_counter() - t0
    print(f"  {'GPT-2-small shape, 100 windows x 128 (worker)':<44} {took * 1e3:>10.1f} ms"
          f"  {'':>8}      {sampler.stop():>8.1f} MiB  ({len(reports)} progress reports; "
          f"target <= 60 s)", flush=True)

    l1 = reg.get("attn-only-1l")
    base = lm.tokenizer.encode(BENCH_TEXT)[:128]
    text_a = lm.tokenizer.decode(base)
    variants = iter(range(10_000))

    def draw() -> None:
        # a changed prompt B: two cold forward passes, the comparison, five figures as JSON
        text_b = text_a.replace("Dursley", f"Smith{next(variants)}", 1)
        ids_b = lm.tokenizer.encode(text_b)[:128]
        fa, fb = run_forward(lm, text_a), run_forward(lm, "", token_ids=ids_b)
        c = compare(lm, fa, lm, fb, layer=1, head=5)
        for fig in (FC.loss_compare_figure(c), FC.predictions_compare_figure(c),
                    FC.attention_compare_figure(c), FC.lens_compare_figure(c),
                    FC.dla_compare_figure(c)):
            fig.to_json()

    def draw_models() -> None:
        fa, fb = run_forward(lm, text_a), run_forward(l1, text_a)
        c = compare(lm, fa, l1, fb, layer=1, head=5)
        for fig in (FC.loss_compare_figure(c), FC.predictions_compare_figure(c),
                    FC.attention_compare_figure(c), FC.lens_compare_figure(c),
                    FC.dla_compare_figure(c)):
            fig.to_json()

    _header("/compare, two 128-token prompts (forward passes, comparison, 5 figures)")
    _row("two prompts on attn-only-2l", measure(draw, reps), "(target <= 2 s)")
    _row("one prompt on attn-only-2l vs attn-only-1l", measure(draw_models, reps))


REAL_PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Harry Potter went home. Harry Potter",
    "1, 2, 3, 4, 5, 6, 7,",
]
TOKENIZER_STRINGS = [
    "The capital of France is", " Harry Potter", "  two  spaces,\ta tab and\nnew\n\nlines ",
    "Digits 0 12 345 6789 3.14159 1,000,000",
    "Unicode: Café naïve façade 東京 Москва ß",
    "Emoji 🙂🚀👩‍👩‍👧 🇫🇷", "def main():\n    return {'a': [1, 2]}  # code\n",
    "<|endoftext|>special<|im_start|>user\nhi<|im_end|>", "Ünïcödé\u00a0nbsp and ‘quotes’",
]


def bench_real_model(path: Optional[Path] = None, reps: int = 3, soak: int = 0,
                     jobs: bool = True) -> int:
    """SmolLM2 (``attention-lens models add smollm2``): load times, a 128-token forward pass,
    logits and tokens against transformers' own GGUF loader, two famous predictions,
    head × position patching on the IOI pair and, with ``soak``, one worker's resident size
    after that many distinct 128-token prompts on every page."""
    from .analysis.forward import run_forward, tokenize
    from .model.catalog import KNOWN
    from .model.gguf import load_gguf
    from .registry import user_models_dir

    path = path or user_models_dir() / KNOWN["smollm2"].file_name
    print(f"\nReal model: {path.name}")
    if not path.is_file():
        print("  not found: run `attention-lens models add smollm2` first (about 100 MB)")
        return 1
    cache = Path(tempfile.mkdtemp(prefix="attention-lens-bench-gguf-"))
    try:
        t0 = time.perf_counter()
        lm = load_gguf(path, cache_dir=cache)
        first = time.perf_counter() - t0
        print(f"  first load (read + dequantize + cache)   {first:8.2f} s", flush=True)
        del lm
        gc.collect()
        t0 = time.perf_counter()
        lm = load_gguf(path, cache_dir=cache)
        again = time.perf_counter() - t0
        assert lm.card["dequantized_from_cache"]
        print(f"  load from the dequantized cache          {again:8.2f} s", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    text = flow_prompt(lm, 128)
    ids, _ = tokenize(lm, text, 128)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            fp = run_forward(lm, text, 128)
        times.append(time.perf_counter() - t0)
    print(f"  forward with full cache, {len(ids)} tokens       {statistics.median(times):8.3f} s "
          f"(median of {reps})", flush=True)
    del fp
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print("  transformers not installed: no parity check")
        return 0
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    htok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    worst = 0.0
    for prompt in REAL_PROMPTS:
        ids = torch.tensor([tokenize(lm, prompt)[0]])
        with torch.no_grad():
            worst = max(worst, float((lm.model(ids) - hf(ids).logits).abs().max()))
    print(f"  logits vs transformers (GGUF), {len(REAL_PROMPTS)} prompts   max |diff| {worst:.2e}")
    same = sum(lm.tokenizer.encode(s) == htok.encode(s, add_special_tokens=False)
               for s in TOKENIZER_STRINGS)
    print(f"  tokenizer vs transformers (GGUF)         {same}/{len(TOKENIZER_STRINGS)} strings "
          "identical")
    for prompt, answer in ((REAL_PROMPTS[0], " Paris"), (REAL_PROMPTS[1], " Mary")):
        ids = tokenize(lm, prompt)[0]
        with torch.no_grad():
            probs = lm.model(torch.tensor([ids]))[0, -1].softmax(-1)
        tid = lm.tokenizer.encode(answer)
        top = lm.tokenizer.token_text(int(probs.argmax()))
        print(f"  {prompt[-28:]!r:<32} -> {answer!r} {float(probs[tid[0]]):.3f} "
              f"(top {top!r})")
    del hf
    bench_real_patching(lm)
    if soak:
        bench_page_flow((128,), soak=soak, visits=False, model=lm, jobs=jobs)
    return 0


def bench_real_patching(lm: Any) -> None:
    """Activation patching head × position on the IOI pair (/patching's default on a model
    that answers it), as /patching's background job computes it: exact grid and attribution."""
    from .analysis import patching as PT
    from .analysis.defaults import PAIR_EXAMPLES

    _, clean, corrupted, correct, wrong = PAIR_EXAMPLES[0]
    reports: list[float] = []
    t0 = time.perf_counter()
    grid = PT.activation_patching(lm, clean, corrupted, correct=correct, wrong=wrong,
                                  granularity="head_out_by_pos",
                                  progress=lambda done, total: reports.append(done))
    took = time.perf_counter() - t0
    (layer, pos, head), effect = PT.strongest_cells(grid, 1)[0]
    print(f"  patching head x position, IOI pair ({grid.values.size} cells, "
          f"{len(reports)} progress reports) {took:8.2f} s; strongest L{layer}H{head} at "
          f"{pos} {grid.clean_display[pos]!r} ({effect:+.2f})", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m attention_lens.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--skip-gpt2", action="store_true",
                        help="skip the GPT-2-small-shaped random model (needs ~1.5 GB)")
    parser.add_argument("--only-gpt2", action="store_true", help="run only that part")
    parser.add_argument("--page-flow", action="store_true",
                        help="every API endpoint and page on a GPT-2-small-shaped random model "
                             "at 64 and 256 tokens, first and second call, with peak RSS")
    parser.add_argument("--flow-lengths", default="64,256", metavar="N,N",
                        help="with --page-flow: prompt lengths in tokens")
    parser.add_argument("--flow-pages", metavar="PAGE,PAGE",
                        help="with --page-flow: only these pages (default: every page)")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="with --page-flow: N distinct 256-token prompts through every "
                             "page, then the resident size against the configured bound; "
                             "with --real-model: N distinct 128-token prompts")
    parser.add_argument("--soak-web-only", action="store_true",
                        help="with --soak: run only the pages' own callbacks (a web worker's "
                             "share), not the analyses they leave to background jobs")
    parser.add_argument("--only-graph", action="store_true",
                        help="run only QK attribution and the attribution graph")
    parser.add_argument("--heads", action="store_true",
                        help="run only the dataset head metrics and /compare benchmark")
    parser.add_argument("--transformer-lens", metavar="PYTHON",
                        help="interpreter of a separate venv with transformer_lens installed: "
                             "time its full-OV eigenvalues side by side")
    parser.add_argument("--patching", action="store_true",
                        help="run only the activation-patching part (with TransformerLens)")
    parser.add_argument("--circuit", action="store_true",
                        help="run only circuit discovery (EAP, EAP-IG, exact edge patching, "
                             "faithfulness) with TransformerLens' hooks timed beside it")
    parser.add_argument("--real-model", nargs="?", const="", metavar="GGUF",
                        help="measure SmolLM2 (or this GGUF file): load, forward, parity with "
                        "transformers; run `attention-lens models add smollm2` first")
    parser.add_argument("--tl-sample", type=int, default=96,
                        help="patched runs TransformerLens is timed on per grid (extrapolated)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} "
          f"threads; medians of {args.reps} runs")
    if args.real_model is not None:
        sys.exit(bench_real_model(Path(args.real_model) if args.real_model else None,
                                  max(1, min(args.reps, 5)), soak=args.soak,
                                  jobs=not args.soak_web_only))
    if args.page_flow:
        bench_page_flow(tuple(int(n) for n in args.flow_lengths.split(",")), soak=args.soak,
                        only=args.flow_pages.split(",") if args.flow_pages else None)
        return
    if args.patching:
        bench_patching(args.reps, args.tl_sample, gpt2=not args.skip_gpt2)
        return
    if args.circuit:
        bench_circuit(args.reps, gpt2=not args.skip_gpt2)
        return
    if args.only_graph:
        bench_graph(args.reps, gpt2=not args.skip_gpt2)
        return
    if args.heads:
        bench_heads(args.reps)
        return
    if not args.only_gpt2:
        bench_prompt(args.reps)
    if not args.skip_gpt2:
        ours = bench_gpt2_shape(max(1, min(args.reps, 3)))
        if args.transformer_lens:
            theirs = bench_transformer_lens(args.transformer_lens, max(1, min(args.reps, 3)))
            if theirs is not None:
                print(f"  full-OV eigenvalues: ours {ours:.2f} s vs TransformerLens "
                      f"{theirs:.2f} s -> {theirs / ours:.1f}x faster")
    if not args.only_gpt2:
        bench_graph(max(1, min(args.reps, 3)), gpt2=not args.skip_gpt2)
        bench_heads(args.reps)
        bench_patching(args.reps, args.tl_sample, gpt2=not args.skip_gpt2)


if __name__ == "__main__":
    main()
