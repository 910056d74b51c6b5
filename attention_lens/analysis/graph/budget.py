"""How large an exact graph may grow, and where it is built by default."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import AnalysisError
from ..forward import ForwardPass


def estimated_edges(cfg, n_tokens: int) -> int:
    """Edges of the full graph of a ``n_tokens`` prompt (to decide whether to run it as a job)."""
    per_pos = cfg.n_heads + 1 + (0 if cfg.attn_only else 1)
    pairs_all = n_tokens * (n_tokens + 1) // 2
    total = 0
    for layer in range(cfg.n_layers):
        pairs = n_tokens if layer == cfg.n_layers - 1 else pairs_all
        total += pairs * (1 + layer * per_pos) * cfg.n_heads
    # and into the target: every node at its position, and the final LayerNorm's bias
    return total + 1 + cfg.n_layers * per_pos + (cfg.normalization_type == "LN")


#: Most edges one exact graph may have. Building and pruning one takes about 60 bytes per
#: edge at its peak (measured: 308 M edges, GPT-2 small explaining position 255, grew a worker
#: by 17.7 GB), so this keeps a graph near half a GB; GPT-2 small reaches position 40.
MAX_EDGES = 2 ** 23


def largest_position(cfg, n_tokens: int) -> int:
    """The last position (< ``n_tokens``) whose graph stays within :data:`MAX_EDGES`."""
    p = n_tokens - 1
    while p > 0 and estimated_edges(cfg, p + 1) > MAX_EDGES:
        p -= 1
    return p


def check_size(cfg, n_tokens: int) -> None:
    """Refuse a graph over ``n_tokens`` positions that would exceed :data:`MAX_EDGES` edges,
    saying how far this model's graphs reach."""
    edges = estimated_edges(cfg, n_tokens)
    if edges > MAX_EDGES:
        reach = largest_position(cfg, n_tokens)
        raise AnalysisError(
            f"the exact graph at position {n_tokens - 1} would have {edges / 1e6:,.0f} M edges "
            f"(about {edges * 60 / 2 ** 30:,.1f} GB to build and prune); graphs here hold at "
            f"most {MAX_EDGES / 1e6:,.1f} M edges, which on this model reaches position "
            f"{reach}: choose a position up to {reach}")


def default_position(fp: ForwardPass, last: Optional[int] = None) -> int:
    """Where the graph is most telling by default: the position, among those whose token
    appeared earlier, where the model predicts the actual next token most confidently (an
    in-context copy); the last position (or ``last``) when there is none. Positions after
    ``last`` (the reach of :func:`largest_position`) are not considered."""
    ids = fp.token_ids
    logp = fp.logits.double().log_softmax(-1).numpy()
    end = fp.n_tokens - 1 if last is None else min(last, fp.n_tokens - 1)
    best, best_lp = end, -np.inf
    for p in range(1, min(end + 1, fp.n_tokens - 1)):  # the last token has no next one
        nxt = int(ids[p + 1])
        if ids[p] in ids[:p] and int(logp[p].argmax()) == nxt and logp[p, nxt] > best_lp:
            best, best_lp = p, logp[p, nxt]
    return best
