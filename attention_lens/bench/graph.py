"""Suite 6 (``--only-graph``): QK attribution and the exact attribution graph."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..model import LoadedModel
from ..model.shapes import IdTokenizer, random_gpt2_shape
from ..model.texts import BENCH_TEXT
from ..registry import DEFAULT_WEIGHTS, Registry
from .measure import _header, _row, measure


def bench_graph(reps: int, gpt2: bool = True) -> None:
    """QK attribution and the exact attribution graph: attn-only-2l at 128 tokens, then
    (``gpt2``) a random GPT-2-small-shaped model with MLPs as opaque nodes, at as many tokens
    as the graph's edge budget reaches (41)."""
    from ..analysis.forward import run_forward
    from ..analysis.graph import EDGE_THRESHOLD, NODE_THRESHOLD, attribution_graph, prune_graph
    from ..analysis.qk_attribution import qk_attribution, qk_attribution_row

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
        text = None if isinstance(lm.tokenizer, IdTokenizer) else BENCH_TEXT
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
        from ..analysis.graph import largest_position

        big = random_gpt2_shape()
        # the exact graph's edge budget reaches position 40 of GPT-2 small
        cases(big, min(64, largest_position(big.cfg, 64) + 1), 11, 0)
