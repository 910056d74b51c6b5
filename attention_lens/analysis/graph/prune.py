"""Prune an attribution graph by influence on its target, and keep what survives.

Pruning follows circuit-tracer (Ameisen et al. 2025): influence = Σ_n w Â^n on the
row-normalised absolute adjacency, keep the nodes that make up ``node_threshold`` of the total
influence (tokens and the target always), then the edges that make up ``edge_threshold`` of
the edge influence, then drop nodes left without outgoing (or, for heads, incoming) edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

import numpy as np

from ...model.checkpoint import LoadedModel
from ..errors import AnalysisError
from ..forward import ForwardPass
from ..predictions import TokenLike
from .build import AttributionGraph, Progress, attribution_graph


@dataclass(frozen=True)
class PrunedGraph:
    """Which nodes and edges survive pruning, and each node's cumulative influence.

    Attributes:
        node_threshold: share of the total node influence kept (0, 1].
        edge_threshold: share of the total edge influence kept (0, 1].
        node_mask: [N] kept nodes.
        edge_mask: [E] kept edges.
        influence: [N] each node's influence on the target (Σ_n w Â^n, circuit-tracer).
        cumulative: [N] share of the total influence held by the nodes at least as
            influential as each node (circuit-tracer's ``cumulative_scores``; small = important).
        edge_score: [E] edge influence on the pruned graph.
    """

    node_threshold: float
    edge_threshold: float
    node_mask: np.ndarray
    edge_mask: np.ndarray
    influence: np.ndarray
    cumulative: np.ndarray
    edge_score: np.ndarray = field(repr=False)

    @property
    def n_nodes(self) -> int:
        """Number of kept nodes."""
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        """Number of kept edges."""
        return int(self.edge_mask.sum())


#: The shares of total influence a pruned graph keeps by default (circuit-tracer's): the one
#: definition the page, the API and the functions below read.
NODE_THRESHOLD = 0.8
EDGE_THRESHOLD = 0.98


def check_threshold(name: str, value: float) -> float:
    """Return ``value`` if it is a share in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
        raise AnalysisError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise AnalysisError(f"{name} must lie in (0, 1] (a share of the total influence), "
                            f"got {value}")
    return float(value)


def _influence(graph: AttributionGraph, keep: np.ndarray, weights: np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """Σ_n w Â^n over the kept edges (Â: |adjacency| normalised over each node's inputs).

    Returns the influence of every node and the normalised weight of every edge. Edges are
    laid out by their destination's layer, so one sweep from the target down suffices:
    influence(u) = Σ_v Â[v, u] (influence(v) + w(v)).
    """
    n = graph.n_nodes
    a = np.where(keep, np.abs(graph.weight), 0.0)
    row = np.bincount(graph.dst, weights=a, minlength=n)
    norm_w = a / np.maximum(row[graph.dst], 1e-10)
    dst_layer = graph.layer[graph.dst]
    cuts = np.flatnonzero(np.diff(dst_layer)) + 1
    if (dst_layer[cuts] < dst_layer[cuts - 1]).any():  # pragma: no cover - construction order
        raise AssertionError("edges are not laid out by destination layer")
    bounds = np.concatenate([[0], cuts, [len(dst_layer)]])
    influence = np.zeros(n)
    for start, end in zip(bounds[-2::-1], bounds[:0:-1]):
        d = graph.dst[start:end]
        influence += np.bincount(graph.src[start:end],
                                 weights=norm_w[start:end] * (influence + weights)[d],
                                 minlength=n)
    return influence, norm_w


def _find_threshold(scores: np.ndarray, share: float) -> float:
    """The score above which the largest scores make up ``share`` of the total."""
    ordered = np.sort(scores)[::-1]
    total = ordered.sum()
    if total <= 0:
        return 0.0
    cumulative = np.cumsum(ordered) / total
    index = min(int(np.searchsorted(cumulative, share)), len(ordered) - 1)
    return float(ordered[index])


def prune_graph(graph: AttributionGraph, node_threshold: float = NODE_THRESHOLD,
                edge_threshold: float = EDGE_THRESHOLD) -> PrunedGraph:
    """Prune by cumulative influence on the target, as circuit-tracer prunes.

    At 1.0 (both thresholds) everything is kept.
    """
    node_threshold = check_threshold("node threshold", node_threshold)
    edge_threshold = check_threshold("edge threshold", edge_threshold)
    n = graph.n_nodes
    logit_w = np.zeros(n)
    logit_w[graph.target] = 1.0
    always = np.isin(graph.kind, ("token", "target"))
    all_edges = np.ones(graph.weight.shape, dtype=bool)
    influence, _ = _influence(graph, all_edges, logit_w)

    node_mask = np.ones(n, dtype=bool)
    if node_threshold < 1.0:
        node_mask = influence >= _find_threshold(influence, node_threshold)
    node_mask |= always
    kept = node_mask[graph.src] & node_mask[graph.dst]
    pruned_infl, norm_w = _influence(graph, kept, logit_w)
    edge_score = norm_w * (pruned_infl + logit_w)[graph.dst]
    edge_mask = kept.copy()
    if edge_threshold < 1.0:
        edge_mask &= edge_score >= _find_threshold(edge_score, edge_threshold)

    if node_threshold < 1.0 or edge_threshold < 1.0:
        needs_out = ~always
        needs_in = graph.kind == "head"
        while True:
            has_out = np.bincount(graph.src, weights=edge_mask, minlength=n) > 0
            has_in = np.bincount(graph.dst, weights=edge_mask, minlength=n) > 0
            new = node_mask & ~(needs_out & ~has_out) & ~(needs_in & ~has_in)
            edge_mask &= new[graph.src] & new[graph.dst]
            if (new == node_mask).all():
                break
            node_mask = new

    order = np.argsort(-influence, kind="stable")
    total = influence.sum()
    cumulative = np.zeros(n)
    cumulative[order] = np.cumsum(influence[order]) / (total if total > 0 else 1.0)
    return PrunedGraph(node_threshold=node_threshold, edge_threshold=edge_threshold,
                       node_mask=node_mask, edge_mask=edge_mask, influence=influence,
                       cumulative=cumulative, edge_score=edge_score)


# ---------------------------------------------------------------------- the kept part
@dataclass(frozen=True)
class GraphView:
    """The pruned graph alone (what a page draws and the API returns), with its totals.

    Attributes:
        graph: the kept nodes and edges, renumbered (the target is still the last node; node
            values are the exact values of the full graph).
        pruned: the pruning on that subgraph (masks all true; influence and cumulative
            influence as computed on the full graph).
        n_nodes_full: nodes of the full graph.
        n_edges_full: edges of the full graph.
        kept_target_share: Σ kept edges into the target / (logit − bias).
    """

    graph: AttributionGraph
    pruned: PrunedGraph
    n_nodes_full: int
    n_edges_full: int
    kept_target_share: float


def subgraph(graph: AttributionGraph, pruned: PrunedGraph) -> GraphView:
    """The kept nodes and edges of ``graph`` as a graph of their own."""
    keep = np.flatnonzero(pruned.node_mask)
    new = np.full(graph.n_nodes, -1, dtype=np.int64)
    new[keep] = np.arange(len(keep))
    edges = pruned.edge_mask & pruned.node_mask[graph.src] & pruned.node_mask[graph.dst]
    sub = AttributionGraph(
        display=graph.display, token_ids=graph.token_ids, position=graph.position,
        target_id=graph.target_id, target_display=graph.target_display,
        contrast_id=graph.contrast_id, contrast_display=graph.contrast_display,
        logit=graph.logit, bias=graph.bias, probability=graph.probability,
        n_layers=graph.n_layers, n_heads=graph.n_heads, normalization=graph.normalization,
        kind=graph.kind[keep], layer=graph.layer[keep], head=graph.head[keep],
        pos=graph.pos[keep], value=graph.value[keep], src=new[graph.src[edges]],
        dst=new[graph.dst[edges]], weight=graph.weight[edges])
    ones = np.ones(len(keep), dtype=bool)
    kept = PrunedGraph(node_threshold=pruned.node_threshold,
                       edge_threshold=pruned.edge_threshold, node_mask=ones,
                       edge_mask=np.ones(len(sub.weight), dtype=bool),
                       influence=pruned.influence[keep], cumulative=pruned.cumulative[keep],
                       edge_score=pruned.edge_score[edges])
    total = graph.logit - graph.bias
    into = sub.weight[sub.dst == sub.target].sum()
    return GraphView(graph=sub, pruned=kept, n_nodes_full=graph.n_nodes,
                     n_edges_full=len(graph.weight),
                     kept_target_share=float(into / total) if total else float("nan"))


def graph_view(lm: LoadedModel, fp: ForwardPass, *, target: Optional[TokenLike] = None,
               contrast: Optional[TokenLike] = None, position: int = -1,
               node_threshold: float = NODE_THRESHOLD,
               edge_threshold: float = EDGE_THRESHOLD,
               progress: Progress = None) -> GraphView:
    """Build the attribution graph, prune it and keep what survives."""
    node_threshold = check_threshold("node threshold", node_threshold)
    edge_threshold = check_threshold("edge threshold", edge_threshold)
    graph = attribution_graph(lm, fp, target=target, contrast=contrast, position=position,
                              progress=progress)
    return subgraph(graph, prune_graph(graph, node_threshold, edge_threshold))

