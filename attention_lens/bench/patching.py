"""Suite 4 (``--patching``): activation patching grids, ours beside TransformerLens' loop and
the model's own hooks, and the /patching page from a new pair to every figure."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..model import LoadedModel
from ..model.shapes import random_gpt2_shape
from ..model.texts import BENCH_TEXT
from ..registry import DEFAULT_WEIGHTS, Registry
from .measure import _rss_mb, _RssSampler, tl_oracle


# ------------------------------------------------------------------ activation patching
def _patching_pair(ids: list[int], corrupt_at: int, replacement: int) -> tuple[list[int],
                                                                              list[int]]:
    """A repeated sequence (second half = first half) and a copy with one token changed."""
    clean = ids + ids
    corrupted = list(clean)
    corrupted[corrupt_at] = replacement if replacement != clean[corrupt_at] else replacement + 1
    return clean, corrupted


def gpt2_shape_pair() -> tuple[LoadedModel, list[int], list[int]]:
    """A random GPT-2-small-shaped model and a 64-token pair of random ids for it (32 ids
    repeated; token 4 corrupted)."""
    big = random_gpt2_shape()
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1000, big.cfg.d_vocab, 32)]
    return (big, *_patching_pair(ids, 4, 500))


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
    from ..analysis.patching import _Setup, activation_patching

    oracle = tl_oracle()
    to_tl = getattr(oracle, "to_transformer_lens", None)

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
    big, clean, corrupted = gpt2_shape_pair()
    print(f"\nActivation patching, random GPT-2-small shape ({big.cfg.n_layers} x "
          f"{big.cfg.n_heads} heads, d_model {big.cfg.d_model}), {len(clean)}-token pair "
          f"(token 4 corrupted)")
    run(big, clean, corrupted, ["head_out_by_pos"], 1, heavy=True)



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

    from ..analysis.patching import corrupt_one_token
    from ..components import page as P
    from ..server.config import ServerConfig
    from ..server import create_server

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

