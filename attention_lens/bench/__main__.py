"""``python -m attention_lens.bench``: run the suites the flags name and print the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __doc__ as _DOC
from .circuit import bench_circuit
from .flow import bench_page_flow
from .graph import bench_graph
from .heads import bench_heads
from .patching import bench_patching
from .prompt import bench_prompt
from .real_model import bench_real_model
from .weights import bench_gpt2_shape, bench_transformer_lens


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m attention_lens.bench",
                                     description=_DOC.splitlines()[0])
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
