"""Patching declared once (:mod:`..declare`, scope pair): its parameters, its cost estimated
from the model's shape, and so its endpoint ``POST /api/patching``, its cache key and whether
it runs inline or as a background job (the one threshold,
:data:`..declare.INLINE_MAX_GFLOP`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ...model.checkpoint import LoadedModel
from ..declare import Bool, Choice, declare, fields_of, forward_gflop
from .grids import activation_patching, patching_over_pairs
from .pairs import PairInput
from .results import PairSetPatching
from .terms import GRANULARITIES, GRANULARITY_LABELS, GRID_AXES


def grid_cells(cfg: Any, granularity: str, n_tokens: int) -> int:
    """Patched runs of one pair's grid (one per cell)."""
    size = {"layer": cfg.n_layers, "pos": n_tokens, "head": cfg.n_heads}
    runs = 1
    for axis in GRID_AXES[granularity]:
        runs *= size[axis]
    return runs


def _row_gflop(cfg: Any, n_tokens: int) -> float:
    """Work (GFLOP) of one layer on one row: its weights, and attention over ``n_tokens`` keys."""
    c = cfg
    weights = 4 * c.d_model * c.n_heads * c.d_head
    if not c.attn_only:
        weights += 2 * c.d_model * (c.d_mlp or 4 * c.d_model)
    return (2 * weights + 4 * n_tokens * c.n_heads * c.d_head) / 1e9


def grid_gflop(cfg: Any, n_tokens: int, granularity: str, attribution: bool = True,
               n_pairs: int = 1) -> float:
    """Estimated work (GFLOP) of the engine's grid (:mod:`.engine`): a patch in layer l
    recomputes about half the rows of each layer between l and the last, one row of its own
    layer and of the last, and two columns of the unembedding; attribution patching adds one
    forward and one backward pass (three passes)."""
    L = cfg.n_layers
    rows_per_layer = ((L - 2) * (L - 1) / 2 * n_tokens / 2 + 2 * L) / L if L > 1 else 1.0
    work = grid_cells(cfg, granularity, n_tokens) * rows_per_layer * _row_gflop(cfg, n_tokens)
    if attribution:
        work += 3 * forward_gflop(cfg, n_tokens)
    return n_pairs * work


def path_gflop(cfg: Any, n_tokens: int) -> float:
    """Estimated work (GFLOP) of path patching from one sender: a receiver batch of
    3 x n_heads runs in each later layer, each recomputing the rest of the network."""
    per_layer = 3 * cfg.n_heads * n_tokens * _row_gflop(cfg, n_tokens)
    return cfg.n_layers * cfg.n_layers / 2 * per_layer


def _cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """The grid's estimated work in forward passes of the pair (:func:`grid_gflop`)."""
    gflop = grid_gflop(cfg, n_tokens, values["granularity"], values["attribution"],
                       values.get("n_pairs", 1))
    return gflop / forward_gflop(cfg, n_tokens)


def patching(lm: LoadedModel, pair: PairInput, granularity: str = "head_out_by_pos",
             attribution: bool = True,
             progress: Optional[Callable[[float], None]] = None) -> Any:
    """Activation patching of one pair (:func:`.activation_patching`), or of a set of pairs
    (:func:`.patching_over_pairs`, always with attribution patching)."""
    report = None if progress is None else (lambda done, total: progress(done / max(total, 1)))
    if pair.is_set:
        return patching_over_pairs(lm, list(pair.pairs), granularity=granularity,
                                   metric=pair.metric, direction=pair.direction,
                                   position=pair.position, progress=report)
    return activation_patching(lm, **pair.args(), granularity=granularity,
                               attribution=attribution, progress=report)


def _to_json(res: Any) -> dict[str, Any]:
    if isinstance(res, PairSetPatching):
        data = fields_of(res)
        data.pop("grids")
        return {"granularity": res.granularity, "axes": list(res.axes),
                "n_pairs": len(res.grids), "result": data}
    return {"result": res}


PATCHING = declare(
    "patching", patching, scope="pair", cost=_cost, to_json=_to_json,
    label="{granularity} activation patching",
    params=[Choice("granularity", "head_out_by_pos", GRANULARITIES, label="patch",
                   labels=GRANULARITY_LABELS),
            Bool("attribution", True, page=False)])
