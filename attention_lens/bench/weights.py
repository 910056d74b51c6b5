"""Suite 2: the weight analyses of a random model of GPT-2-small shape, beside a naive dense
computation timed on a few heads or pairs and extrapolated; optionally TransformerLens'
full-OV eigenvalues in another interpreter."""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..model import LoadedModel
from ..model.shapes import GPT2_SHAPE, random_gpt2_shape
from .measure import _row, _rss_mb, measure


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
    from ..analysis.circuits import circuit_svd
    from ..analysis.composition import composition_scores
    from ..analysis.eigen import copying_score, full_ov_eigenvalues

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

