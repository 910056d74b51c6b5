"""Circuit discovery as a declared analysis (:mod:`..declare`, scope pair): ``POST
/api/circuit`` with its validation, its cache key, and whether it runs inline or as a job
(its cost estimated from the model's shape: the masked runs over the edge graph it makes)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ...model.checkpoint import LoadedModel
from ..declare import Bool, Choice, Int, Number, Sized, declare, forward_gflop
from ..patching import PairInput
from .discovery import (
    DEFAULT_K,
    DEFAULT_RANDOM,
    DEFAULT_SIZES,
    MAX_RANDOM,
    MAX_SIZES,
    SEARCHES,
    CircuitDiscovery,
    curve_runs,
    discover_circuit,
    masked_run_flop,
)
from .graph import edge_graph
from .scores import ABLATION_LABELS, ABLATIONS, MAX_STEPS, METHOD_LABELS, METHODS

#: A masked run's time as a multiple of its floating-point work at a matrix product's rate
#: (measured: attn-only-2l on 43 tokens, 0.12 GFLOP a run, about 9 ms on one core where a
#: matrix product runs near 30 GFLOP/s).
MASKED_RUN_OVERHEAD = 2.0
#: ACDC's default threshold (metric units): the largest change of the metric an edge's
#: removal may cause for the edge to be removed for good.
DEFAULT_THRESHOLD = 0.05


def _n_edges(cfg: Any) -> int:
    return edge_graph(cfg).n_edges


def masked_runs(cfg: Any, values: Mapping[str, Any]) -> int:
    """Masked runs over the edge graph of one pair: the edge scores (EAP: a forward and a
    backward pass, about three runs; EAP-IG: three a step; exact: one an edge), ACDC's
    removals (one an edge), the circuit's faithfulness (two an ablation) and the curve."""
    n_edges = edge_graph(cfg).n_edges
    method = values.get("method", "eap")
    runs = {"eap": 3, "eap_ig": 3 * int(values.get("steps", 5)) + 1}.get(method, n_edges + 2)
    if values.get("search") == "acdc":
        runs += n_edges
    runs += 2 * len(ABLATIONS)
    if values.get("curve", True):
        runs += curve_runs(int(values.get("n_sizes", DEFAULT_SIZES)),
                           int(values.get("n_random", DEFAULT_RANDOM)))
    return runs


def circuit_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """The work of circuit discovery in forward passes of the (longest) pair: its masked runs
    over every pair, each :data:`MASKED_RUN_OVERHEAD` times its floating-point work."""
    run = MASKED_RUN_OVERHEAD * masked_run_flop(cfg, n_tokens) / 1e9
    work = values.get("n_pairs", 1) * masked_runs(cfg, values) * run
    return work / forward_gflop(cfg, n_tokens)


def discover(lm: LoadedModel, pair: PairInput, method: str = "eap",
             ablation: str = "resample", steps: int = 5, k: int = DEFAULT_K,
             n_sizes: int = DEFAULT_SIZES, n_random: int = DEFAULT_RANDOM, curve: bool = True,
             search: str = "top_k", threshold: float = 0.0,
             progress: Optional[Callable[[float], None]] = None) -> CircuitDiscovery:
    """Circuit discovery (:func:`.discovery.discover_circuit`) on the pair or set of pairs,
    at its metric and position."""
    return discover_circuit(lm, list(pair.pairs), metric=pair.metric, position=pair.position,
                            method=method, ablation=ablation, steps=steps, k=k,
                            n_sizes=n_sizes, n_random=n_random, curve=curve, search=search,
                            threshold=threshold,
                            progress=None if progress is None else
                            (lambda done, total: progress(done / max(total, 1))))


def _threshold_of_acdc(values: dict) -> dict:
    """The threshold is ACDC's alone: other searches key and report it as 0."""
    return values if values["search"] == "acdc" else {**values, "threshold": 0.0}


def _circuit_json(res: CircuitDiscovery) -> dict[str, Any]:
    return {"circuit": res.to_json(), "edges": res.scores.graph.edge_labels(),
            "scores": res.scores.scores, "in_circuit": res.kept.tolist()}


CIRCUIT = declare(
    "circuit", discover, scope="pair", cost=circuit_cost, to_json=_circuit_json,
    without=("direction",), canonical=_threshold_of_acdc, label="{method} circuit discovery",
    params=[Choice("method", "eap", METHODS, labels=METHOD_LABELS, page=False),
            Choice("ablation", "resample", ABLATIONS, labels=ABLATION_LABELS, page=False),
            Int("steps", 5, 1, MAX_STEPS, page=False),
            Sized("k", DEFAULT_K, 0, _n_edges, page=False,
                  what_of=lambda cfg: f" ({cfg.name} has {_n_edges(cfg)} edges)"),
            Int("n_sizes", DEFAULT_SIZES, 2, MAX_SIZES, page=False),
            Int("n_random", DEFAULT_RANDOM, 0, MAX_RANDOM, page=False),
            Bool("curve", True, page=False),
            Choice("search", "top_k", SEARCHES, page=False),
            Number("threshold", DEFAULT_THRESHOLD, page=False,
                   what=" (the largest metric change an ACDC removal may cause)")])

__all__ = ["CIRCUIT", "DEFAULT_THRESHOLD", "MASKED_RUN_OVERHEAD", "circuit_cost", "discover", "masked_runs"]
