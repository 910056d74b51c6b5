"""Suite 7 (``--heads``): dataset head metrics (shipped model; GPT-2 shape in a worker thread)
and /compare."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ..model.shapes import random_gpt2_shape
from ..model.texts import BENCH_TEXT
from ..registry import DEFAULT_WEIGHTS, Registry
from .measure import _header, _row, _RssSampler, measure


# -------------------------------------------------------------- dataset heads, compare
def bench_heads(reps: int) -> None:
    """Dataset head metrics (shipped model, GPT-2 shape in a worker thread) and /compare."""
    from ..analysis.compare import compare
    from ..analysis.datasets import Windows, dataset_windows, load_dataset
    from ..analysis.forward import run_forward
    from ..analysis.head_metrics import head_metrics
    from ..figures import compare as FC

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
