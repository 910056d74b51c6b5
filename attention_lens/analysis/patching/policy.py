"""Activation patching and path patching declared once (:mod:`..declare`, scope pair): their
parameters, their cost estimated from the model's shape, and so their endpoints
``POST /api/patching`` and ``POST /api/path-patching``, their cache keys and whether they run
inline or as a background job (the one threshold, :data:`..declare.INLINE_MAX_GFLOP`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ...model.checkpoint import LoadedModel
from ..declare import Bool, Choice, HeadPair, ParamError, declare, fields_of, forward_gflop
from .grids import activation_patching, patching_over_pairs
from .pairs import PairInput
from .paths import path_patching, path_patching_table
from .results import PairSetPatching
from .terms import COMPONENTS, GRANULARITIES, GRANULARITY_LABELS, GRID_AXES, MLP_MODES


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


# ------------------------------------------------------------------------ path patching
def _path_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """Path patching's estimated work in forward passes of the pair (:func:`path_gflop` per
    sender; the table sends from every head)."""
    senders = cfg.n_layers * cfg.n_heads if values.get("table") else 1
    return senders * path_gflop(cfg, n_tokens) / forward_gflop(cfg, n_tokens)


def paths(lm: LoadedModel, pair: PairInput, sender: Optional[list] = None, table: bool = False,
          ln_mode: str = "recomputed", mlps: str = "recomputed",
          progress: Optional[Callable[[float], None]] = None) -> Any:
    """Path patching of one pair from ``sender`` (:func:`.path_patching`), or the table over
    every sender (:func:`.path_patching_table`)."""
    if table:
        report = None if progress is None else (
            lambda done, total: progress(done / max(total, 1)))
        return path_patching_table(lm, **pair.args(), ln_mode=ln_mode, mlps=mlps,
                                   progress=report)
    return path_patching(lm, **pair.args(), sender=tuple(sender), ln_mode=ln_mode, mlps=mlps)


def _one_sender(values: dict) -> None:
    if values["table"] and values["sender"] is not None:
        raise ParamError("send either 'sender' or 'table': true, not both")
    if not values["table"] and values["sender"] is None:
        raise ParamError("missing field 'sender' ([layer, head] of the sender head), or "
                         "send 'table': true for every sender")


PATH_PATCHING = declare(
    "path-patching", paths, scope="pair", cost=_path_cost, check=_one_sender,
    without=("pairs",), label="path patching (MLPs {mlps})",
    to_json=lambda res: {"components": list(COMPONENTS), "result": res},
    params=[HeadPair("sender"), Bool("table", False, page=False),
            Choice("ln_mode", "recomputed", ("recomputed", "frozen"), page=False),
            Choice("mlps", "recomputed", MLP_MODES, page=False)])
