"""Suite 8 (``--real-model``): SmolLM2 or another GGUF file: load, forward pass, parity with
transformers, IOI patching and an optional soak."""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..model.texts import REAL_PROMPTS, TOKENIZER_STRINGS, flow_prompt
from .flow import bench_page_flow


def bench_real_model(path: Optional[Path] = None, reps: int = 3, soak: int = 0,
                     jobs: bool = True) -> int:
    """SmolLM2 (``attention-lens models add smollm2``): load times, a 128-token forward pass,
    logits and tokens against transformers' own GGUF loader, two famous predictions,
    head × position patching on the IOI pair and, with ``soak``, one worker's resident size
    after that many distinct 128-token prompts on every page."""
    from ..analysis.forward import run_forward, tokenize
    from ..model.catalog import KNOWN
    from ..model.gguf import load_gguf
    from ..registry import user_models_dir

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
    from ..analysis import patching as PT
    from ..analysis.defaults import PAIR_EXAMPLES

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
