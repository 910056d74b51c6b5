"""Suite 5 (``--circuit``): edge attribution (EAP, EAP-IG), exact edge patching, the
faithfulness curve and ACDC on attn-only-2l, TransformerLens' hooks beside them, and EAP on a
GPT-2-small-shaped model as a job would run it."""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from ..model.texts import BENCH_TEXT
from ..registry import DEFAULT_WEIGHTS, Registry
from .measure import _rss_mb, _RssSampler, tl_oracle
from .patching import _patching_pair, gpt2_shape_pair


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
    from ..analysis import patching as PT
    from ..analysis.circuit import Problem, edge_scores, faithfulness_curve
    from ..analysis.circuit.graph import edge_graph

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
    from ..analysis.circuit.search import acdc

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
    oracle, tl = tl_oracle(), None
    try:
        tl = oracle.to_transformer_lens(lm) if oracle is not None else None
    except (ImportError, OSError, AttributeError) as exc:
        print(f"  (TransformerLens side skipped: {exc})")
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
    big, clean, corrupted = gpt2_shape_pair()
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

