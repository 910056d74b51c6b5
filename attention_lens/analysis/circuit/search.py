"""Circuit search (top-k edges, pruned to paths from the input to the logits) and faithfulness.

Faithfulness of a circuit C (Wang et al. 2022; Miller et al. 2024): run the clean prompt with
every edge outside C ablated (zero, mean, or resampled from the corrupted prompt) and read
the metric; then (m(C) − m(∅)) / (m(full) − m(∅)), where the full circuit keeps every edge
(the clean run: 1) and the empty one ablates all of them (0). Beside it, the same for
random circuits of the same number of edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import AnalysisError
from .graph import EdgeGraph, ProgressFn
from .scores import ABLATIONS, PairRun, Problem
from .sparse import SparseRuns, one_thread, plan, run_cost


def _check_k(k: int, n_edges: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= n_edges:
        raise AnalysisError(f"k (edges kept) must be a whole number from 0 to {n_edges} (the "
                            f"model's edges), got {k!r}")
    return int(k)


def prune(graph: EdgeGraph, keep: np.ndarray) -> np.ndarray:
    """The kept edges that lie on a path from the input to the logits, [E] bool."""
    keep = np.asarray(keep, dtype=bool)
    node_of = graph.receiver_node()[graph.dst]  # [E] component of each edge's receiver
    order = np.argsort(graph.sender_layer, kind="stable")
    reached = np.zeros(graph.n_senders, dtype=bool)
    reached[0] = True
    # senders in layer order: a component is reached when a kept edge from a reached sender
    # enters one of its inputs (all its senders come from earlier layers, or are heads of
    # its own layer for an MLP, which come before it in this order)
    for s in order[1:]:
        into = keep & (node_of == s)
        reached[s] = bool(reached[graph.src[into]].any())
    useful = np.zeros(graph.n_senders, dtype=bool)
    to_logits = keep & (node_of == -1)
    useful[graph.src[to_logits]] = True
    for s in order[::-1]:
        if useful[s]:
            continue
        out = keep & (graph.src == s)
        tgt = node_of[out]
        useful[s] = bool(useful[tgt[tgt >= 0]].any())
    return keep & reached[graph.src] & ((node_of == -1) | useful[np.maximum(node_of, 0)])


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` edges of largest |score|, [E] bool (ties: the earlier edge)."""
    k = _check_k(k, len(scores))
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-np.abs(scores), kind="stable")[:k]] = True
    return keep


def circuit(graph: EdgeGraph, scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k edges by |score|, pruned to paths from the input to the logits, [E] bool."""
    return prune(graph, top_k(scores, k))


def circuit_metrics(prob: Problem, masks: np.ndarray, ablation: Optional[str] = None,
                    progress: Optional[ProgressFn] = None, start: int = 0,
                    sparse: Optional[bool] = None) -> np.ndarray:
    """Mean metric over the pairs of the clean runs with every edge outside each circuit
    ablated: masks [C, E] bool -> [C]. ``start``: every edge into layers before it is kept,
    so the runs begin there from the clean run.

    From the first layer (``start`` 0) a circuit is run sparsely (see :mod:`.sparse`: only
    the components its kept edges reach are computed) where that is estimated to cost less
    than the full masked run, and the same circuit twice is run once; ``sparse`` True or
    False forces one way (the results agree to float rounding, tested)."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros((len(prob.pairs), len(masks)))
    g = prob.graph
    # the same circuit twice (e.g. random circuits of every edge, or the full circuit) is
    # run once
    first: dict[bytes, int] = {}
    copies = []
    for c, keep in enumerate(masks):
        src = first.setdefault(np.packbits(keep).tobytes(), c)
        if src != c:
            copies.append((c, src))
    unique = np.array(sorted(first.values()), dtype=int)
    total, done = len(unique) * len(prob.pairs), 0
    with torch.no_grad():
        for i, p in enumerate(prob.pairs):
            abl = prob.ablated(p, ablation)
            chunk = prob.batch_size(p)
            todo = unique
            if start == 0 and sparse is not False:
                todo, done = _sparse_metrics(p, abl, masks, unique, out[i], bool(sparse),
                                             progress, done, total)
            for j in range(0, len(todo), chunk):
                ids = todo[j:j + chunk]
                m = torch.as_tensor(masks[ids], dtype=p.clean_acts.dtype)
                x = p.clean_acts[0].expand(len(m), -1, -1)
                U = g.upstream_attn(start) if start < g.n_layers else g.n_senders
                rows = p.engine.run(x, abl, m, start=start, prefix=p.clean_acts[:U])
                out[i, ids] = p.of_rows(rows).double().numpy()
                done += len(m)
                if progress:
                    progress(done, total)
    for c, src in copies:
        out[:, c] = out[:, src]
    return out.mean(0)


def _sparse_metrics(p: PairRun, abl: torch.Tensor, masks: np.ndarray, which: np.ndarray,
                    out: np.ndarray, force: bool, progress: Optional[ProgressFn], done: int,
                    total: int) -> tuple[np.ndarray, int]:
    """Metrics of the circuits ``which`` that cost less run sparsely (all when ``force``),
    written into ``out``; returns the circuits left for full masked runs and the count of
    runs done."""
    eng = p.engine
    runs: Optional[SparseRuns] = None
    left = []
    with one_thread():
        for c in which:
            pl = plan(eng, masks[c])
            if not force and not run_cost(eng, pl)[1]:
                left.append(c)
                continue
            if runs is None:
                runs = SparseRuns(eng, p.clean_acts[0], abl)
            out[c] = float(p.of_rows(runs.run(masks[c], pl)[None]).double()[0])
            done += 1
            if progress:
                progress(done, total)
    return np.array(left, dtype=int), done


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top-k circuits and of random circuits of the same sizes.

    Attributes:
        ablations: the ablations, one row each.
        k: [K] edges taken by |score| before pruning.
        sizes: [K] edges kept after pruning (the circuit's size).
        faithfulness: [A, K] (m(C) − m(∅)) / (m(full) − m(∅)).
        ratio: [A, K] m(C) / m(full).
        random: [A, K, R] faithfulness of R random circuits of each size.
        circuit_metric: [A, K] m(C).
        full_metric: [A] m(full) (every edge kept: the clean metric).
        empty_metric: [A] m(∅) (every edge ablated).
        n_random: R.
        seed: seed of the random circuits.
    """

    ablations: tuple[str, ...]
    k: np.ndarray
    sizes: np.ndarray
    faithfulness: np.ndarray
    ratio: np.ndarray
    random: np.ndarray
    circuit_metric: np.ndarray
    full_metric: np.ndarray
    empty_metric: np.ndarray
    n_random: int
    seed: int

    def edges_to_reach(self, level: float = 0.8, ablation: str = "resample",
                       random: bool = False) -> Optional[int]:
        """Fewest edges (of the sizes on the curve) whose faithfulness reaches ``level``
        (for random circuits: their mean); None when none does."""
        a = self.ablations.index(ablation)
        f = self.random[a].mean(-1) if random else self.faithfulness[a]
        hit = np.nonzero(f >= level)[0]
        return int(self.sizes[hit].min()) if len(hit) else None


def curve_ks(n_edges: int, n_sizes: int) -> np.ndarray:
    """``n_sizes`` numbers of edges from 1 to ``n_edges``, spaced geometrically (distinct)."""
    if n_sizes < 2:
        raise AnalysisError("the faithfulness curve needs at least two sizes")
    ks = np.unique(np.round(np.geomspace(1, n_edges, n_sizes)).astype(int))
    extra = iter(np.linspace(1, n_edges, 4 * n_sizes).round().astype(int))
    while len(ks) < min(n_sizes, n_edges):
        ks = np.unique(np.append(ks, next(extra)))
    return ks


def faithfulness_curve(prob: Problem, scores: np.ndarray, *,
                       ablations: Sequence[str] = ABLATIONS, n_sizes: int = 20,
                       n_random: int = 20, seed: int = 0,
                       progress: Optional[ProgressFn] = None) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits over ``n_sizes`` values of k, beside ``n_random``
    random circuits of each size, under each ablation."""
    g = prob.graph
    E = g.n_edges
    for a in ablations:
        if a not in ABLATIONS:
            raise AnalysisError(f"ablation must be one of {', '.join(ABLATIONS)}; got {a!r}")
    if not 0 <= n_random <= 100:
        raise AnalysisError(f"random circuits per size must be 0 to 100, got {n_random}")
    ks = curve_ks(E, n_sizes)
    circuits = np.stack([circuit(g, scores, int(k)) for k in ks])
    sizes = circuits.sum(1)
    rng = np.random.default_rng(seed)
    rand = np.zeros((len(ks), n_random, E), dtype=bool)
    for i, size in enumerate(sizes):
        for j in range(n_random):
            rand[i, j, rng.choice(E, size=int(size), replace=False)] = True
    # one batch: full, empty, the circuits, the random circuits
    masks = np.concatenate([np.ones((1, E), bool), np.zeros((1, E), bool), circuits,
                            rand.reshape(-1, E)])
    A = len(ablations)
    faith = np.zeros((A, len(ks)))
    ratio = np.zeros((A, len(ks)))
    cm = np.zeros((A, len(ks)))
    rnd = np.zeros((A, len(ks), n_random))
    full = np.zeros(A)
    empty = np.zeros(A)
    for a, ablation in enumerate(ablations):
        def report(done: int, total: int, a: int = a) -> None:
            if progress:
                progress(a * total + done, A * total)

        m = circuit_metrics(prob, masks, ablation, report)
        full[a], empty[a] = m[0], m[1]
        denom = m[0] - m[1]
        f = (m - m[1]) / denom if denom != 0 else np.full_like(m, np.nan)
        cm[a] = m[2:2 + len(ks)]
        faith[a] = f[2:2 + len(ks)]
        ratio[a] = m[2:2 + len(ks)] / m[0] if m[0] != 0 else np.nan
        rnd[a] = f[2 + len(ks):].reshape(len(ks), n_random)
    return FaithfulnessCurve(ablations=tuple(ablations), k=ks, sizes=sizes, faithfulness=faith,
                             ratio=ratio, random=rnd, circuit_metric=cm, full_metric=full,
                             empty_metric=empty, n_random=n_random, seed=seed)


#: Most removals ACDC tries in one batch of runs.
ACDC_RUN = 64


def acdc(prob: Problem, threshold: float, ablation: Optional[str] = None,
         progress: Optional[ProgressFn] = None) -> tuple[np.ndarray, float]:
    """Greedy edge removal in the manner of ACDC (Conmy et al. 2023): receivers from the
    logits back to the first layer, each receiver's edges from its latest sender back; an
    edge is removed (ablated) for good when that changes the metric of the current circuit
    by less than ``threshold`` (in the metric's units). Returns the circuit pruned to paths
    from the input to the logits, [E] bool, and its metric."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            np.isnan(threshold) or threshold < 0:
        raise AnalysisError(f"the ACDC threshold must be a number >= 0, got {threshold!r}")
    g = prob.graph
    keep = np.ones(g.n_edges, dtype=bool)
    current = float(circuit_metrics(prob, keep[None], ablation)[0])
    order = sorted(range(g.n_edges), key=lambda e: (-int(g.dst[e]), -int(g.src[e])))
    # the removals are tried a run of edges at once, each trial with every earlier edge of
    # the run removed as well: the trials up to the first edge that stays are exactly the
    # one-at-a-time trials; after it they are recomputed. Most edges go, so runs grow.
    i, run = 0, 4
    while i < len(order):
        chunk = order[i:i + run]
        masks = np.repeat(keep[None], len(chunk), axis=0)
        for j, e in enumerate(chunk):
            masks[j:, e] = False
        # receivers go from the logits back: every edge into an earlier layer is still kept
        layer = min(int(g.receiver_layer[g.dst[e]]) for e in chunk)
        trials = circuit_metrics(prob, masks, ablation, start=layer)
        stayed = False
        for j, e in enumerate(chunk):
            i += 1
            if abs(float(trials[j]) - current) < threshold:
                keep[e] = False
                current = float(trials[j])
            else:
                stayed = True
                break
        run = 4 if stayed else min(2 * run, ACDC_RUN)
        if progress:
            progress(i, len(order))
    kept = prune(g, keep)
    # the circuit's metric from one run of it alone (the trials ran in batches)
    return kept, float(circuit_metrics(prob, kept[None], ablation)[0])
