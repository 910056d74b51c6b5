"""One circuit-discovery run for the page and the API: scores, the circuit, its faithfulness
curve, and the exports (circuit JSON, edge-score CSV, curve CSV)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ...model.checkpoint import LoadedModel
from .. import patching as PT
from ..errors import AnalysisError
from .graph import ProgressFn
from .scores import ABLATIONS, METHODS, EdgeScores, Problem, edge_scores
from .sparse import masked_run_flop
from .search import (
    FaithfulnessCurve,
    _check_k,
    acdc,
    circuit,
    circuit_metrics,
    faithfulness_curve,
)

#: How the circuit is chosen: top k by |score| (pruned), or greedy ACDC-style removal.
SEARCHES = ("top_k", "acdc")
#: Edges taken by |score| before pruning, by default.
DEFAULT_K = 20
#: Sizes on the faithfulness curve and random circuits per size, by default.
DEFAULT_SIZES, DEFAULT_RANDOM = 20, 20
#: Most sizes on the curve and random circuits per size.
MAX_SIZES, MAX_RANDOM = 40, 50
#: Estimated work the page's faithfulness curve may take (:func:`curve_work`; the curve's
#: size shrinks from the default until it fits). Measured on SmolLM2-135M, IOI pair (14
#: tokens): the default 20 x 20 curve, estimated 1.2e12, took 119 s of CPU and 405 s on 2
#: cores busy with other work (load 12); this budget is about half of that.
CURVE_FLOP = 6e11
#: The page computes the curve in the circuit's own job below this much work (estimated);
#: above it, as a second job once the circuit is drawn.
CURVE_INLINE_FLOP = 6e11
#: Fewest sizes and random circuits per size a curve sized from the model's cost keeps.
MIN_SIZES, MIN_RANDOM = 6, 4


#: A circuit head is a name mover when it attends at least this much from the metric's
#: position to the earlier copies of the correct answer (as /attention's copying heads).
MOVER_MIN_ATTENTION = 0.3
#: Default k: one edge in this many, at least :data:`DEFAULT_K` (a big model's top 20 edges
#: rarely form a path from the input to the logits).
EDGES_PER_KEPT = 600


def default_k(n_edges: int) -> int:
    """The page's default number of edges taken by |score|: :data:`DEFAULT_K`, or one edge
    in :data:`EDGES_PER_KEPT` on big graphs."""
    return max(DEFAULT_K, n_edges // EDGES_PER_KEPT)


@dataclass(frozen=True)
class NameMover:
    """A circuit head that, at the metric's position of pair 1's clean prompt, attends to the
    earlier copies of the correct answer (``attention``: the summed weight) and writes toward
    it: ``dla`` is its direct logit attribution (its output through the final norm's scale
    on that run, dotted with the unembedding of the correct minus the wrong answer)."""

    layer: int
    head: int
    attention: float
    dla: float
    positions: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


def name_movers(lm: LoadedModel, ids: Sequence[int], n: int, correct: int,
                wrong: Optional[int], heads: Sequence[tuple[int, int]],
                min_attention: float = MOVER_MIN_ATTENTION) -> tuple[NameMover, ...]:
    """The ``heads`` (of a circuit) that attend from position n-1 of ``ids`` to the earlier
    copies of ``correct`` with a summed weight of at least ``min_attention``, strongest
    direct logit attribution first (a negative one writes against the answer)."""
    import torch

    positions = tuple(i for i in range(n - 1) if int(ids[i]) == int(correct))
    if not positions or not heads:
        return ()
    model = lm.model
    layers = sorted({layer for layer, _ in heads})
    wanted = {f"blocks.{layer}.attn.hook_{k}" for layer in layers for k in ("pattern", "z")}
    wanted.add("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([list(ids[:n])]),
                                        names_filter=lambda name: name in wanted)
        U = model.W_U.detach().double()
        direction = U[:, correct] - (U[:, wrong] if wrong is not None else 0)
        norm = getattr(model, "ln_final", None)
        kind = getattr(norm, "kind", None)
        if kind is not None:
            direction = direction * norm.w.detach().double()
            scale = cache["ln_final.hook_scale"][0, n - 1].double().reshape(())
        else:
            scale = torch.tensor(1.0, dtype=torch.float64)
        out = []
        for layer, head in heads:
            att = float(cache[f"blocks.{layer}.attn.hook_pattern"][0, head, n - 1,
                                                                   list(positions)].sum())
            if att < min_attention:
                continue
            z = cache[f"blocks.{layer}.attn.hook_z"][0, n - 1, head].double()
            write = z @ model.blocks[layer].attn.W_O[head].detach().double()
            if kind == "LN":
                write = write - write.mean()
            out.append(NameMover(layer, head, att, float(write @ direction / scale),
                                 positions))
    return tuple(sorted(out, key=lambda m: -m.dla))


@dataclass(frozen=True)
class CircuitDiscovery:
    """A circuit found on a set of pairs, with its faithfulness.

    Attributes:
        scores: every edge's score (see :class:`EdgeScores`).
        k: edges taken by |score| before pruning.
        kept: [E] bool, the circuit's edges (top k, pruned to input-to-logit paths).
        faithfulness: {ablation: faithfulness of the circuit}.
        curve: the faithfulness curve (None when not asked for).
        settings: the parameters of the run (JSON-ready).
        clean_display: display strings of pair 1's clean prompt.
    """

    scores: EdgeScores
    k: int
    kept: np.ndarray
    faithfulness: dict[str, float]
    curve: Optional[FaithfulnessCurve]
    settings: dict[str, Any]
    clean_display: tuple[str, ...]
    movers: tuple["NameMover", ...] = ()

    @property
    def n_kept(self) -> int:
        """Edges in the circuit."""
        return int(self.kept.sum())

    def nodes(self) -> list[str]:
        """The components the circuit's edges touch (input, heads, MLPs, logits), in graph
        order."""
        g = self.scores.graph
        used = set(g.src[self.kept].tolist())
        node_of = g.receiver_node()
        targets = node_of[g.dst[self.kept]]
        used |= set(targets[targets >= 0].tolist())
        names = [g.senders[s] for s in sorted(used)]
        if (targets < 0).any():
            names.append("logits")
        return names

    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every head in the circuit."""
        out = []
        for name in self.nodes():
            if name.startswith("L") and "H" in name:
                layer, head = name[1:].split("H")
                out.append((int(layer), int(head)))
        return out

    def edges(self) -> list[dict[str, Any]]:
        """The circuit's edges, strongest first: sender, receiver, input, score (and, where
        the scores are split by position, ``by_position``: the score at each position)."""
        g = self.scores.graph
        bp = self.scores.by_position
        idx = np.nonzero(self.kept)[0]
        idx = idx[np.argsort(-np.abs(self.scores.scores[idx]), kind="stable")]
        out = []
        for e in idx:
            recv = g.receivers[g.dst[e]]
            node, _, comp = recv.partition(".")
            row = {"sender": g.senders[g.src[e]], "receiver": node,
                   "input": comp or ("in" if node != "logits" else "resid"),
                   "score": float(self.scores.scores[e])}
            if bp is not None:
                row["by_position"] = [float(v) for v in bp[e]]
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        """The circuit export: nodes, edges with scores, faithfulness, curve, settings."""
        out: dict[str, Any] = {
            "settings": self.settings, "nodes": self.nodes(), "edges": self.edges(),
            "n_edges_total": self.scores.graph.n_edges, "n_edges_kept": self.n_kept,
            "faithfulness": self.faithfulness,
            "clean_metric": self.scores.clean_metric,
            "corrupted_metric": self.scores.corrupted_metric,
        }
        out["name_movers"] = [{"head": m.name, "attention_to_answer": m.attention,
                               "direct_logit_attribution": m.dla,
                               "answer_positions": list(m.positions)} for m in self.movers]
        if self.curve is not None:
            out["curve"] = curve_json(self.curve)
        return out

    def edge_csv(self) -> str:
        """Every edge's score as CSV: sender, receiver, input, score, in_circuit."""
        g = self.scores.graph
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["sender", "receiver", "input", "score", "in_circuit"])
        for e in range(g.n_edges):
            node, _, comp = g.receivers[g.dst[e]].partition(".")
            w.writerow([g.senders[g.src[e]], node, comp, f"{self.scores.scores[e]:.9g}",
                        int(self.kept[e])])
        return buf.getvalue()


def curve_json(curve: FaithfulnessCurve) -> dict[str, Any]:
    """A faithfulness curve as plain lists."""
    return {"ablations": list(curve.ablations), "k": curve.k.tolist(),
            "sizes": curve.sizes.tolist(), "faithfulness": curve.faithfulness.tolist(),
            "ratio": curve.ratio.tolist(), "random": curve.random.tolist(),
            "full_metric": curve.full_metric.tolist(),
            "empty_metric": curve.empty_metric.tolist(), "n_random": curve.n_random,
            "seed": curve.seed,
            "edges_to_80": {a: curve.edges_to_reach(0.8, a) for a in curve.ablations},
            "random_edges_to_80": {a: curve.edges_to_reach(0.8, a, random=True)
                                   for a in curve.ablations}}


def curve_csv(curve: FaithfulnessCurve) -> str:
    """The curves as CSV: ablation, k, edges, faithfulness, random mean, 5 % and 95 %."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ablation", "k", "edges", "faithfulness", "metric_ratio", "random_mean",
                "random_p05", "random_p95"])
    for a, ablation in enumerate(curve.ablations):
        for i in range(len(curve.k)):
            r = curve.random[a, i]
            stats = ([f"{r.mean():.6g}", f"{np.percentile(r, 5):.6g}",
                      f"{np.percentile(r, 95):.6g}"] if r.size else ["", "", ""])
            w.writerow([ablation, int(curve.k[i]), int(curve.sizes[i]),
                        f"{curve.faithfulness[a, i]:.6g}", f"{curve.ratio[a, i]:.6g}", *stats])
    return buf.getvalue()


def curve_runs(n_sizes: int, n_random: int, n_ablations: int = len(ABLATIONS)) -> int:
    """Masked runs of a faithfulness curve: full, empty, each size and its random circuits,
    under each ablation."""
    return n_ablations * (2 + n_sizes * (1 + n_random))


def curve_work(cfg: Any, n: int, n_sizes: int, n_random: int,
               n_ablations: int = len(ABLATIONS), _costs: Optional[dict] = None) -> float:
    """Estimated work of a faithfulness curve on ``n`` positions (in floating-point work of
    full masked runs, see :func:`.sparse.run_cost`): per ablation the empty run that sparse
    runs read from, the full circuit, and each size's circuit and random circuits, each
    costed as a seeded random circuit of that many edges would be run (a circuit pruned to
    paths, or of fewer edges, computes no more components); the random circuits of every
    edge are the full circuit, run once."""
    from .graph import edge_graph
    from .search import curve_ks
    from .sparse import Shape, full_run_flop, plan, run_cost

    shape = Shape(cfg, edge_graph(cfg), n)
    E = shape.graph.n_edges
    full = full_run_flop(shape)
    costs = _costs if _costs is not None else {}
    work = 2 * full  # the empty run (read by every sparse run) and the full circuit
    for k in curve_ks(E, n_sizes):
        k = int(k)
        if k >= E:
            continue
        if k not in costs:
            keep = np.zeros(E, dtype=bool)
            keep[np.random.default_rng(k).choice(E, size=k, replace=False)] = True
            costs[k] = run_cost(shape, plan(shape, keep))[0]
        work += (1 + n_random) * costs[k]
    return n_ablations * work


def curve_size(cfg: Any, n_tokens: Sequence[int], budget: float = CURVE_FLOP
               ) -> tuple[int, int, float]:
    """Sizes and random circuits per size of the page's faithfulness curve, sized from the
    model's cost: the defaults (:data:`DEFAULT_SIZES` x :data:`DEFAULT_RANDOM`) when they fit
    ``budget`` (estimated work, :func:`curve_work`), else fewer random circuits, then fewer
    sizes (down to :data:`MIN_SIZES` x :data:`MIN_RANDOM`). Returns (sizes, random, work)."""
    key = (repr(cfg), tuple(n_tokens), budget)
    if key in _SIZED:
        return _SIZED[key]
    costs: dict[int, dict] = {n: {} for n in n_tokens}

    def work(sizes: int, rand: int) -> float:
        return sum(curve_work(cfg, n, sizes, rand, _costs=costs[n]) for n in n_tokens)

    sizes, rand = DEFAULT_SIZES, DEFAULT_RANDOM
    while work(sizes, rand) > budget and (sizes > MIN_SIZES or rand > MIN_RANDOM):
        if rand > MIN_RANDOM and (rand >= sizes or sizes <= MIN_SIZES):
            rand -= 1
        else:
            sizes -= 1
    _SIZED[key] = (sizes, rand, work(sizes, rand))
    return _SIZED[key]


_SIZED: dict[tuple, tuple[int, int, float]] = {}


def add_curve(lm: LoadedModel, pairs: Sequence[PT.PromptPair], disc: CircuitDiscovery, *,
              n_sizes: int = DEFAULT_SIZES, n_random: int = DEFAULT_RANDOM, seed: int = 0,
              progress: Optional[ProgressFn] = None) -> CircuitDiscovery:
    """``disc`` (found on ``pairs``) with its faithfulness curve: the curve of its scores'
    top-k circuits beside ``n_random`` random circuits of each of ``n_sizes`` sizes."""
    import dataclasses

    if not 2 <= int(n_sizes) <= MAX_SIZES:
        raise AnalysisError(f"the curve takes 2 to {MAX_SIZES} sizes, got {n_sizes}")
    if not 0 <= int(n_random) <= MAX_RANDOM:
        raise AnalysisError(f"random circuits per size must be 0 to {MAX_RANDOM}, "
                            f"got {n_random}")
    st = disc.settings
    prob = Problem(lm, pairs, st["metric"], st["position"], st["ablation"])
    fc = faithfulness_curve(prob, disc.scores.scores, n_sizes=int(n_sizes),
                            n_random=int(n_random), seed=seed, progress=progress)
    return dataclasses.replace(disc, curve=fc, settings={
        **st, "n_sizes": int(n_sizes), "n_random": int(n_random), "seed": seed})


def discover_circuit(lm: LoadedModel, pairs: Sequence[PT.PromptPair], *, method: str = "eap",
                     metric: str = "logit_diff", position: int = -1,
                     ablation: str = "resample", steps: int = 5, k: int = DEFAULT_K,
                     n_sizes: int = DEFAULT_SIZES, n_random: int = DEFAULT_RANDOM,
                     curve: bool = True, seed: int = 0, search: str = "top_k",
                     threshold: float = 0.0,
                     progress: Optional[ProgressFn] = None) -> CircuitDiscovery:
    """Score every edge, keep the top k (pruned to input-to-logit paths), and measure the
    circuit's faithfulness under every ablation, with the curve over k beside random
    circuits."""
    PT._check_choice(method, METHODS, "method")
    PT._check_choice(ablation, ABLATIONS, "ablation")
    if not 2 <= int(n_sizes) <= MAX_SIZES:
        raise AnalysisError(f"the curve takes 2 to {MAX_SIZES} sizes, got {n_sizes}")
    if not 0 <= int(n_random) <= MAX_RANDOM:
        raise AnalysisError(f"random circuits per size must be 0 to {MAX_RANDOM}, "
                            f"got {n_random}")
    from .graph import edge_graph

    _check_k(k, edge_graph(lm.cfg).n_edges)  # before any forward pass
    prob = Problem(lm, pairs, metric, position, ablation)
    PT._check_choice(search, SEARCHES, "search")
    # progress in parts: the scores one, ACDC's removals eight (one run per edge), the
    # circuit's faithfulness one, the curve three
    parts = {"scores": 1, "acdc": 8 if search == "acdc" else 0, "faith": 1,
             "curve": 3 if curve else 0}
    whole = sum(parts.values())

    def phase(name: str) -> ProgressFn:
        order = list(parts)
        before = sum(parts[k] for k in order[:order.index(name)])

        def report(done: int, total: int) -> None:
            if progress:
                progress(int(1000 * (before + parts[name] * done / max(total, 1))),
                         1000 * whole)
        return report

    res = edge_scores(lm, pairs, method=method, steps=steps, problem=prob,
                      progress=phase("scores"))
    if search == "acdc":
        kept, _ = acdc(prob, threshold, progress=phase("acdc"))
    else:
        kept = circuit(prob.graph, res.scores, k)
    faith = {}
    report = phase("faith")
    # every edge kept is the clean run, and every edge resampled the corrupted one: their
    # metrics are known; the others are masked runs
    full = prob.clean_metric
    for i, a in enumerate(ABLATIONS):
        if a == "resample":
            empty = prob.corrupted_metric
            mine, = circuit_metrics(prob, kept[None], a)
        else:
            empty, mine = circuit_metrics(prob, np.stack([np.zeros_like(kept), kept]), a)
        report(i + 1, len(ABLATIONS))
        faith[a] = float((mine - empty) / (full - empty)) if full != empty else float("nan")
    fc = None
    if curve:
        fc = faithfulness_curve(prob, res.scores, n_sizes=int(n_sizes),
                                n_random=int(n_random), seed=seed, progress=phase("curve"))
    first = prob.pairs[0]
    heads = CircuitDiscovery(scores=res, k=int(k), kept=kept, faithfulness={}, curve=None,
                             settings={}, clean_display=()).heads()
    movers = name_movers(lm, first.clean_ids, first.n, first.metric.correct,
                         first.metric.wrong, heads)
    disp = lm.tokenizer.display
    settings = {"model": lm.name, "method": method, "metric": res.metric,
                "position": position, "ablation": ablation, "steps": res.steps, "k": int(k),
                "n_pairs": len(prob.pairs), "n_sizes": int(n_sizes),
                "n_random": int(n_random), "seed": seed, "search": search,
                "threshold": float(threshold) if search == "acdc" else None,
                "gradient_at": "clean run" if method != "exact" else None}
    return CircuitDiscovery(scores=res, k=int(k), kept=kept, faithfulness=faith, curve=fc,
                            settings=settings, movers=movers,
                            clean_display=tuple(disp(i) for i in prob.pairs[0].clean_ids))
