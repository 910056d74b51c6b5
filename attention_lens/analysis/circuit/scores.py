"""Edge scores on clean/corrupted pairs: EAP, EAP-IG and exact edge patching.

For an edge u -> v and an ablated value ā_u of the sender (the corrupted prompt's activation
by default):

- **EAP** (Syed et al. 2023): (ā_u − a_u(x_c)) · ∂m/∂(input of v), the gradient taken on the
  **clean** run (as Syed et al. and Hanna et al. 2024 define it): one forward and one
  backward pass per pair give every edge.
- **EAP-IG** (Hanna et al. 2024): the same with the gradient averaged over the ``steps``
  points x' + (k/steps)(x_c − x') (k = 1 .. steps) on the straight line from the ablated
  input embedding x' to the clean one (one step is EAP).
- **Exact edge patching**: v's input gets ā_u − a_u added (that term of its input ablated),
  every other edge keeps its clean value, and the network is recomputed from v on.

Each score is (an estimate of) m(edge ablated) − m(clean). Over a set of pairs, the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, get_args

import numpy as np
import torch

from ...model.checkpoint import LoadedModel
from .. import patching as PT
from ..errors import AnalysisError
from ..predictions import token_id
from .graph import EdgeEngine, EdgeGraph, ProgressFn, edge_graph

Method = Literal["eap", "eap_ig", "exact"]
METHODS: tuple[str, ...] = get_args(Method)
METHOD_LABELS = {"eap": "EAP (gradient × difference)",
                 "eap_ig": "EAP-IG (integrated gradients)",
                 "exact": "exact edge patching"}
Ablation = Literal["resample", "mean", "zero"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)
ABLATION_LABELS = {"resample": "resample (the corrupted prompt's activation)",
                   "mean": "mean over the set's prompts, per position",
                   "zero": "zero"}
#: Most integration steps of EAP-IG.
MAX_STEPS = 256
#: Most floating-point work (estimated) exact edge patching may take.
MAX_EXACT_FLOP = 4e12
#: Bytes of receiver inputs one batch of masked runs may hold.
BATCH_BYTES = 256 * 2 ** 20


@dataclass
class PairRun:
    """One validated pair: its tokens, metric and every sender's clean and corrupted
    activation [S, n, d]."""

    clean_ids: list[int]
    corrupted_ids: list[int]
    n: int
    metric: PT.Metric
    clean_acts: torch.Tensor
    corrupted_acts: torch.Tensor
    clean_metric: float
    corrupted_metric: float
    engine: EdgeEngine

    def of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The metric of normalised final rows [B, d] -> [B]."""
        eng = self.engine
        return self.metric.of_rows(rows, eng.W_U, eng.b_U)


class Problem:
    """A set of pairs, their metric and the ablated sender values, ready for masked runs."""

    def __init__(self, lm: LoadedModel, pairs: Sequence[PT.PromptPair], metric: str,
                 position: int, ablation: str) -> None:
        self.kind = PT._check_choice(metric, PT.METRICS, "metric")
        self.ablation = PT._check_choice(ablation, ABLATIONS, "ablation")
        if not pairs:
            raise AnalysisError("the set of pairs holds no rows")
        if len(pairs) > PT.MAX_PAIRS:
            raise AnalysisError(f"the set holds {len(pairs):,} pairs; at most {PT.MAX_PAIRS} "
                                f"are analysed at once")
        self.lm = lm
        engines: dict[int, EdgeEngine] = {}
        self.pairs: list[PairRun] = []
        for i, pair in enumerate(pairs, start=1):
            try:
                self.pairs.append(self._pair(lm, pair, position, engines))
            except AnalysisError as exc:
                raise AnalysisError(f"pair {i}: {exc}" if len(pairs) > 1 else str(exc)
                                    ) from None
        self.graph: EdgeGraph = self.pairs[0].engine.graph
        if self.ablation == "mean":
            lengths = sorted({p.n for p in self.pairs})
            if len(lengths) > 1:
                raise AnalysisError(f"mean ablation averages each activation over the set's "
                                    f"prompts position by position, so the pairs must read "
                                    f"the metric at the same position; they read it after "
                                    f"{', '.join(map(str, lengths))} tokens")
            self._mean = torch.stack([a for p in self.pairs
                                      for a in (p.clean_acts, p.corrupted_acts)]).mean(0)

    def _pair(self, lm: LoadedModel, pair: PT.PromptPair, position: int,
              engines: dict[int, EdgeEngine]) -> PairRun:
        clean_ids, corrupted_ids = PT.pair_tokens(lm, pair.clean, pair.corrupted)
        pos = PT._check_position(position, len(clean_ids))
        n = pos + 1
        try:
            a = token_id(lm, pair.correct)
        except AnalysisError as exc:
            raise AnalysisError(f"correct answer: {exc}") from None
        b = None
        if self.kind in ("logit_diff", "normalized"):
            if pair.wrong is None or pair.wrong == "":
                raise AnalysisError("a logit difference needs a wrong answer token too")
            try:
                b = token_id(lm, pair.wrong)
            except AnalysisError as exc:
                raise AnalysisError(f"wrong answer: {exc}") from None
            if a == b:
                raise AnalysisError(f"the correct and the wrong answer are the same token "
                                    f"({lm.tokenizer.display(a)!r}); choose two different ones")
        eng = engines.get(n)
        if eng is None:
            eng = engines[n] = EdgeEngine(lm, n)
        with torch.no_grad():
            clean_acts, lc = eng.sender_acts(clean_ids)
            corrupted_acts, lr = eng.sender_acts(corrupted_ids)
            lc, lr = lc.float(), lr.float()
        ld_c = float(lc[a] - lc[b]) if b is not None else 0.0
        ld_r = float(lr[a] - lr[b]) if b is not None else 0.0
        if self.kind == "normalized" and ld_c == ld_r:
            raise AnalysisError("the clean and corrupted prompts give the same logit "
                                "difference, so it cannot be normalised; use the plain logit "
                                "difference")
        metric = PT.Metric(kind=self.kind, position=pos, correct=a, wrong=b, clean_ld=ld_c,
                           corrupted_ld=ld_r, clean_logprobs=lc.log_softmax(-1))
        return PairRun(clean_ids=clean_ids, corrupted_ids=corrupted_ids, n=n, metric=metric,
                       clean_acts=clean_acts, corrupted_acts=corrupted_acts,
                       clean_metric=float(metric(lc)), corrupted_metric=float(metric(lr)),
                       engine=eng)

    def ablated(self, p: PairRun, ablation: Optional[str] = None) -> torch.Tensor:
        """The ablated value of every sender on pair ``p`` [S, n, d]."""
        kind = ablation or self.ablation
        if kind == "resample":
            return p.corrupted_acts
        if kind == "zero":
            return torch.zeros_like(p.clean_acts)
        if not hasattr(self, "_mean"):
            lengths = sorted({q.n for q in self.pairs})
            if len(lengths) > 1:
                raise AnalysisError("mean ablation needs pairs that read the metric at the "
                                    "same position")
            self._mean = torch.stack([a for q in self.pairs
                                      for a in (q.clean_acts, q.corrupted_acts)]).mean(0)
        return self._mean

    @property
    def clean_metric(self) -> float:
        """Mean clean metric over the pairs."""
        return float(np.mean([p.clean_metric for p in self.pairs]))

    @property
    def corrupted_metric(self) -> float:
        """Mean corrupted metric over the pairs."""
        return float(np.mean([p.corrupted_metric for p in self.pairs]))

    def batch_size(self, p: PairRun) -> int:
        """Masked runs per batch for pair ``p`` (bounded by :data:`BATCH_BYTES`)."""
        cfg = self.lm.cfg
        # without LayerNorm the runs never form a receiver's input in full (d_model wide),
        # only its projections (d_head wide)
        width = cfg.d_head if p.engine.plain and cfg.attn_only else cfg.d_model
        per = 3 * cfg.n_heads * p.n * width * 4 * 4
        return int(max(1, min(128, BATCH_BYTES // per)))


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EdgeScores:
    """Every edge's score on a set of pairs.

    Attributes:
        method: one of :data:`METHODS`.
        graph: the edge graph (labels, senders and receivers of each edge).
        scores: [E] mean over pairs of m(edge ablated) − m(clean) (exact) or its estimate.
        by_position: [E, n] the same split by the sender's position (EAP and EAP-IG, when
            every pair has the metric at the same position; None otherwise).
        metric: one of the patching metrics.
        ablation: one of :data:`ABLATIONS`.
        steps: integration steps (EAP-IG; 1 for EAP, 0 for exact).
        n_pairs: pairs averaged.
        clean_metric: mean clean metric.
        corrupted_metric: mean corrupted metric.
    """

    method: str
    graph: EdgeGraph
    scores: np.ndarray
    by_position: Optional[np.ndarray]
    metric: str
    ablation: str
    steps: int
    n_pairs: int
    clean_metric: float
    corrupted_metric: float


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or \
            not 1 <= int(steps) <= MAX_STEPS:
        raise AnalysisError(f"steps must be a whole number from 1 to {MAX_STEPS}, "
                            f"got {steps!r}")
    return int(steps)


def receiver_grads(p: PairRun, x: torch.Tensor, abl: torch.Tensor) -> list[torch.Tensor]:
    """∂(Σ_batch m)/∂(input of every receiver) on runs from input activations x [B, n, d]
    with every edge kept; one tensor per receiver block (see :meth:`EdgeEngine.run`),
    summed over the batch."""
    probes: list = []
    with torch.enable_grad():
        rows = p.engine.run(x, abl, None, probes=probes)
        m = p.of_rows(rows).sum()
        flat = [t for q in probes for t in (q[2:] if isinstance(q, tuple) else (q,))]
        grads = torch.autograd.grad(m, flat)
    return p.engine.input_grads(probes, list(grads))


def scores_from_grads(graph: EdgeGraph, diff: torch.Tensor, grads: list[torch.Tensor],
                      layer_done: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Edge scores by position [E, n]: (ā_u − a_u) · g_v for each edge, ``diff`` [S, n, d]
    the ablated minus clean activations, ``grads`` per receiver block (``layer_done(l)``
    after each layer's receivers)."""
    S, n, _ = diff.shape
    diff = diff.double()
    out = torch.zeros(graph.n_edges, n, dtype=torch.float64)
    it = iter(grads)
    H = graph.n_heads
    for layer in range(graph.n_layers):
        g = next(it)  # [3H, n, d]
        first, U = graph.attn_block(layer)
        s = torch.einsum("und,rnd->run", diff[:U], g.double())
        out[first:first + 3 * H * U] = s.reshape(-1, n)
        if graph.has_mlp:
            g = next(it)  # [rows, d]
            first, U = graph.mlp_block(layer)
            rows = g.shape[0]
            block = torch.zeros(U, n, dtype=torch.float64)
            block[:, n - rows:] = torch.einsum("und,nd->un", diff[:U, n - rows:],
                                               g.double())
            out[first:first + U] = block
        if layer_done:
            layer_done(layer)
    g = next(it)  # [d]
    first, U = graph.logits_block()
    out[first:first + U, n - 1] = diff[:, n - 1] @ g.double()
    return out


def _gradient_scores(prob: Problem, steps: int, progress: Optional[ProgressFn]
                     ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    per_pos = []
    L = prob.graph.n_layers
    units = len(prob.pairs) * (L + 1)  # per pair: the backward pass, then each layer's scores
    for i, p in enumerate(prob.pairs):
        def layer_done(layer: int, i: int = i) -> None:
            if progress:
                progress(i * (L + 1) + layer + 2, units)

        abl = prob.ablated(p)
        x_c, x_a = p.clean_acts[0], abl[0]
        alphas = torch.arange(1, steps + 1, dtype=x_c.dtype) / steps
        x = x_a + alphas[:, None, None] * (x_c - x_a)  # [steps, n, d]
        if steps == 1:
            x = x_c[None]
        grads = receiver_grads(p, x, abl)  # summed over the steps: divided once, below
        if progress:
            progress(i * (L + 1) + 1, units)
        per_pos.append(scores_from_grads(prob.graph, abl - p.clean_acts, grads,
                                         layer_done) / steps)
    scores = np.mean([s.sum(1).numpy() for s in per_pos], axis=0)
    same = len({s.shape[1] for s in per_pos}) == 1
    by_pos = torch.stack(per_pos).mean(0).numpy() if same else None
    return scores, by_pos


def exact_cost(lm: LoadedModel, n_edges: int, n_tokens: Sequence[int]) -> float:
    """Estimated floating-point work of exact edge patching (one run per edge and pair)."""
    c = lm.cfg
    per_layer = 3 * c.n_heads * c.d_model * c.d_head * 2 + c.n_heads * c.d_head * c.d_model
    if not c.attn_only:
        per_layer += 2 * c.d_model * (c.d_mlp or 0)
    return float(sum(2.0 * n_edges * n * c.n_layers * per_layer for n in n_tokens))


def check_exact_size(lm: LoadedModel, n_edges: int, n_tokens: Sequence[int]) -> None:
    """Refuse exact edge patching that would take more than :data:`MAX_EXACT_FLOP`."""
    cost = exact_cost(lm, n_edges, n_tokens)
    if cost > MAX_EXACT_FLOP:
        runs = n_edges * len(n_tokens)
        raise AnalysisError(
            f"exact edge patching of {lm.name} patches each of its {n_edges:,} edges alone: "
            f"{runs:,} runs of up to {max(n_tokens)} tokens, about {cost / 1e12:,.1f} TFLOP "
            f"(this server does at most {MAX_EXACT_FLOP / 1e12:,.0f} TFLOP); use EAP or "
            f"EAP-IG, fewer pairs or shorter prompts")


def _exact_scores(prob: Problem, progress: Optional[ProgressFn]) -> np.ndarray:
    g = prob.graph
    E = g.n_edges
    check_exact_size(prob.lm, E, [p.n for p in prob.pairs])
    total = E * len(prob.pairs)
    done = 0
    out = np.zeros((len(prob.pairs), E))
    # edges grouped by the layer of their receiver: runs start from the clean run there
    groups: list[tuple[int, np.ndarray]] = []
    for layer in range(g.n_layers):
        first, U = g.attn_block(layer)
        stop = g.mlp_block(layer)[0] + (g.mlp_block(layer)[1] if g.has_mlp else 0)
        groups.append((layer, np.arange(first, stop)))
    first, U = g.logits_block()
    groups.append((g.n_layers, np.arange(first, first + U)))
    with torch.no_grad():
        for i, p in enumerate(prob.pairs):
            abl = prob.ablated(p)
            chunk = prob.batch_size(p)
            for layer, edges in groups:
                U = g.upstream_attn(layer) if layer < g.n_layers else g.n_senders
                prefix = p.clean_acts[:U]
                for j in range(0, len(edges), chunk):
                    ids = edges[j:j + chunk]
                    # row 0 keeps every edge: the clean metric through the same arithmetic
                    mask = torch.ones(len(ids) + 1, E, dtype=p.clean_acts.dtype)
                    mask[torch.arange(1, len(ids) + 1), torch.as_tensor(ids)] = 0
                    x = p.clean_acts[0].expand(len(ids) + 1, -1, -1)
                    rows = p.engine.run(x, abl, mask, start=layer, prefix=prefix)
                    m = p.of_rows(rows).double()
                    out[i, ids] = (m[1:] - m[0]).numpy()
                    done += len(ids)
                    if progress:
                        progress(done, total)
    return out.mean(0)


def edge_scores(lm: LoadedModel, pairs: Sequence[PT.PromptPair], *, method: str = "eap",
                metric: str = "logit_diff", position: int = -1, ablation: str = "resample",
                steps: int = 5, progress: Optional[ProgressFn] = None,
                problem: Optional[Problem] = None) -> EdgeScores:
    """Every edge's score on a set of pairs (see the module docstring)."""
    method = PT._check_choice(method, METHODS, "method")
    steps = _check_steps(steps) if method == "eap_ig" else (1 if method == "eap" else 0)
    if method == "exact" and problem is None:  # refuse before any forward pass
        lengths = []
        for pair in list(pairs)[:PT.MAX_PAIRS]:
            try:
                n = len(PT.pair_tokens(lm, pair.clean, pair.corrupted)[0])
                lengths.append(PT._check_position(position, n) + 1)
            except AnalysisError:
                pass  # the Problem below names the pair and the problem
        if lengths:
            check_exact_size(lm, edge_graph(lm.cfg).n_edges, lengths)
    prob = problem or Problem(lm, pairs, metric, position, ablation)
    if method == "exact":
        scores, by_pos = _exact_scores(prob, progress), None
    else:
        scores, by_pos = _gradient_scores(prob, max(steps, 1), progress)
    return EdgeScores(method=method, graph=prob.graph, scores=scores, by_position=by_pos,
                      metric=prob.kind, ablation=prob.ablation, steps=steps,
                      n_pairs=len(prob.pairs), clean_metric=prob.clean_metric,
                      corrupted_metric=prob.corrupted_metric)
