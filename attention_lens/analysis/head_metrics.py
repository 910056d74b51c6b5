"""Head metrics over a dataset (as HeadVis / Neuronpedia define them), with examples.

Over windows of a dataset, for every head with pattern A (rows: queries i, keys j ≤ i) on
window tokens t, averaged over the queries named (every such query of every window weighs
the same; position 0, which can only attend to itself, is never a query):

- previous-token: A[i, i-1], queries i ≥ 1;
- induction: Σ_{j : t_{j-1} = t_i, 1 ≤ j ≤ i} A[i, j] (attention to the tokens right
  after earlier copies of t_i), on queries i that have an earlier copy (t_j = t_i, j < i);
- duplicate-token: Σ_{j < i : t_j = t_i} A[i, j], on the same queries;
- first-token (attention sink): A[i, 0], queries i ≥ 1;
- self: A[i, i], queries i ≥ 1;
- entropy: -Σ_j A[i, j] ln A[i, j] in nats, queries i ≥ 1;

plus the weight-based copying score Re(Σλ)/Σ|λ| of the full OV circuit W_E W_OV W_U
(:mod:`.eigen`) when given. Each window also gets its own value of every metric (the mean
over its queries) and the query where the metric is largest: the top examples and deciles
of a head are windows ranked by that value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, get_args

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .datasets import DEFAULT_WINDOWS, Windows
from .declare import Bool, Choice, Int, ParamError, Sized, declare
from .errors import AnalysisError

PatternMetric = Literal["previous_token", "induction", "duplicate_token", "first_token", "self",
                        "entropy"]
PATTERN_METRICS: tuple[str, ...] = get_args(PatternMetric)
#: Every metric a dashboard can show (the weight-based copying score last).
ALL_METRICS: tuple[str, ...] = PATTERN_METRICS + ("copying",)
#: Which queries each pattern metric averages over.
QUERIES = {"previous_token": "every query i ≥ 1", "first_token": "every query i ≥ 1",
           "self": "every query i ≥ 1", "entropy": "every query i ≥ 1",
           "induction": "queries whose token appeared earlier in the window",
           "duplicate_token": "queries whose token appeared earlier in the window"}
DEFINITIONS = {
    "previous_token": "mean A[i, i−1]",
    "induction": "mean Σ A[i, j] over j with t[j−1] = t[i], 1 ≤ j ≤ i",
    "duplicate_token": "mean Σ A[i, j] over j < i with t[j] = t[i]",
    "first_token": "mean A[i, 0]",
    "self": "mean A[i, i]",
    "entropy": "mean −Σ_j A[i, j] ln A[i, j]",
    "copying": "Re(Σλ)/Σ|λ| of the full OV circuit W_E W_OV W_U (weights only)",
}
#: Attention elements (batch × heads × queries × keys) held at once while scoring.
BATCH_ELEMENTS = 16 * 2**20


class _Stop(Exception):
    """Ends a forward pass once the last layer's pattern is scored (no logits needed)."""


def check_metric(metric: str, allow_copying: bool = True) -> str:
    """``metric`` if it is a known metric name, else an :class:`AnalysisError`."""
    names = ALL_METRICS if allow_copying else PATTERN_METRICS
    if metric not in names:
        raise AnalysisError(f"unknown metric {str(metric)[:40]!r}; choose one of "
                            f"{', '.join(names)}")
    return metric


def query_masks(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The duplicate and induction targets of every query, and which queries count.

    ``"dup"``: [n, 3] (window, query i, key j) with j < i and t_j = t_i; ``"ind"``: [n, 3]
    with 1 ≤ j ≤ i and t_{j-1} = t_i (the duplicate targets shifted one key right);
    ``"copy"``: [b, q] queries with an earlier copy; ``"all"``: [b, q] queries i ≥ 1.
    """
    same = tokens[:, :, None] == tokens[:, None, :]
    dup = same & torch.ones_like(same[0]).tril(-1)
    dup_idx = dup.nonzero()
    ind_idx = dup_idx.clone()
    ind_idx[:, 2] += 1
    every = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    every[:, 0] = False
    return {"dup": dup_idx, "ind": ind_idx, "copy": dup.any(-1), "all": every}


def _sum_at(pattern: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[b, h, q]: Σ over the (window, query, key) triples ``idx`` of pattern[b, :, q, k]."""
    b, h, q, _ = pattern.shape
    out = torch.zeros(b * q, h, dtype=pattern.dtype, device=pattern.device)
    out.index_add_(0, idx[:, 0] * q + idx[:, 1], pattern[idx[:, 0], :, idx[:, 1], idx[:, 2]])
    return out.view(b, q, h).transpose(1, 2)


def per_query_values(pattern: torch.Tensor, masks: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Every pattern metric's value at every query, [b, h, q], from patterns [b, h, q, k]."""
    diag = pattern.diagonal(dim1=-2, dim2=-1)  # [b, h, q]
    prev = torch.zeros_like(diag)
    prev[..., 1:] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)
    return {
        "previous_token": prev,
        "induction": _sum_at(pattern, masks["ind"]),
        "duplicate_token": _sum_at(pattern, masks["dup"]),
        "first_token": pattern[..., 0],
        "self": diag,
        "entropy": torch.special.entr(pattern).sum(-1),
    }


def query_mask_of(metric: str) -> str:
    """Which query mask a pattern metric averages over ("copy" or "all")."""
    return "copy" if metric in ("induction", "duplicate_token") else "all"


@dataclass(frozen=True)
class HeadMetrics:
    """Every head's metrics over a dataset's windows, per window, with example queries.

    Attributes:
        model: the model's name.
        windows: the windows scored (tokens, how they were cut, the dataset's sha256).
        metrics: metric -> [n_layers, n_heads] mean over the dataset (see the module
            docstring; "copying" present when the copying scores were given).
        per_window: pattern metric -> [n_windows, n_layers, n_heads] mean over the window's
            queries (NaN when the window has none, e.g. no repeated token).
        best_query: pattern metric -> [n_windows, n_layers, n_heads] the query position of
            the window where the metric is largest (-1 when the window has no such query).
        n_queries: pattern metric -> number of queries averaged over the dataset.
        window_queries: "copy" / "all" -> [n_windows] queries per window of that kind.
    """

    model: str
    windows: Windows
    metrics: dict[str, np.ndarray]
    per_window: dict[str, np.ndarray]
    best_query: dict[str, np.ndarray]
    n_queries: dict[str, int]
    window_queries: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads)."""
        return tuple(self.metrics["previous_token"].shape)  # type: ignore[return-value]

    def ranking(self, metric: str, n: Optional[int] = None) -> list[tuple[int, int, float]]:
        """(layer, head, value) of the heads, largest ``metric`` first (ties: lower index)."""
        values = self.metrics[check_metric(metric)]
        order = np.argsort(-values.ravel(), kind="stable")[:n]
        n_heads = values.shape[1]
        return [(int(i // n_heads), int(i % n_heads), float(values.ravel()[i])) for i in order]

    def examples(self, metric: str, layer: int, head: int, n: int = 5) -> list[dict]:
        """The ``n`` windows where the head's ``metric`` is largest (window, query, value)."""
        return self._pick(metric, layer, head, order="top", n=n)

    def deciles(self, metric: str, layer: int, head: int) -> list[dict]:
        """Windows at the 10th, 20th, ..., 90th percentile of the head's per-window value."""
        return self._pick(metric, layer, head, order="deciles")

    def _pick(self, metric: str, layer: int, head: int, order: str, n: int = 5) -> list[dict]:
        check_metric(metric, allow_copying=False)
        L, H = self.shape
        if not (0 <= layer < L and 0 <= head < H):
            raise AnalysisError(f"head L{layer}H{head} does not exist ({L} layers × {H} heads)")
        vals = self.per_window[metric][:, layer, head]
        valid = np.flatnonzero(~np.isnan(vals))
        if valid.size == 0:
            return []
        ranked = valid[np.argsort(-vals[valid], kind="stable")]
        if order == "top":
            picks = [(None, int(w)) for w in ranked[:n]]
        else:  # nearest rank of the ascending order
            asc = ranked[::-1]
            picks = [(q, int(asc[min(asc.size - 1, int(np.ceil(q / 100 * asc.size)) - 1)]))
                     for q in range(10, 100, 10)]
        out = []
        for pct, w in picks:
            item = {"window": w, "start": int(self.windows.starts[w]),
                    "query": int(self.best_query[metric][w, layer, head]),
                    "value": float(vals[w])}
            if pct is not None:
                item["percentile"] = pct
            out.append(item)
        return out


def _batch_size(lm: LoadedModel, length: int) -> int:
    per_window = lm.cfg.n_heads * length * length
    return max(1, min(256, BATCH_ELEMENTS // per_window))


def head_metrics(lm: LoadedModel, windows: Windows, copying: Optional[np.ndarray] = None,
                 batch_size: Optional[int] = None,
                 progress: Optional[Callable[[float], None]] = None) -> HeadMetrics:
    """Score every head on every window; ``progress(fraction)`` is called after each batch.

    The forward pass stops at the last layer's attention pattern (no logits are needed), and
    each layer's patterns are reduced to per-query values as soon as they are computed.
    """
    cfg = lm.cfg
    L, H = cfg.n_layers, cfg.n_heads
    tokens = torch.as_tensor(windows.tokens, dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise AnalysisError("no windows to score")
    if tokens.shape[1] > cfg.n_ctx:
        raise AnalysisError(f"windows of {tokens.shape[1]} tokens exceed the model's context "
                            f"({cfg.n_ctx})")
    if copying is not None and np.shape(copying) != (L, H):
        raise AnalysisError(f"copying scores have shape {np.shape(copying)}, expected {(L, H)}")
    N = tokens.shape[0]
    bs = batch_size or _batch_size(lm, tokens.shape[1])
    sums = {m: np.zeros((L, H)) for m in PATTERN_METRICS}
    per_window = {m: np.full((N, L, H), np.nan) for m in PATTERN_METRICS}
    best = {m: np.full((N, L, H), -1, dtype=np.int64) for m in PATTERN_METRICS}
    window_queries = {"copy": np.zeros(N, dtype=np.int64), "all": np.zeros(N, dtype=np.int64)}
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    model = lm.model
    for start in range(0, N, bs):
        chunk = tokens[start:start + bs].to(model.device)
        masks = query_masks(chunk)
        counts = {k: masks[k].sum(-1) for k in ("copy", "all")}  # [b]
        for k in counts:
            window_queries[k][start:start + len(chunk)] = counts[k].cpu().numpy()

        def score(pattern: torch.Tensor, hook, masks=masks, counts=counts, start=start) -> None:
            layer = names.index(hook.name)
            values = per_query_values(pattern.float(), masks)
            for m, v in values.items():
                q = masks[query_mask_of(m)][:, None, :]  # [b, 1, q]
                total = (v * q).double().sum(-1)  # [b, h]
                sums[m][layer] += total.sum(0).cpu().numpy()
                n = counts[query_mask_of(m)][:, None].double()
                mean = torch.where(n > 0, total / n.clamp(min=1), torch.nan)
                per_window[m][start:start + len(v), layer] = mean.cpu().numpy()
                arg = v.masked_fill(~q, -torch.inf).argmax(-1)
                arg = torch.where(n > 0, arg, -1)
                best[m][start:start + len(v), layer] = arg.cpu().numpy()
            if layer == L - 1:
                raise _Stop

        try:
            with torch.no_grad():
                model.run_with_hooks(chunk, [(name, score) for name in names])
        except _Stop:
            pass
        if progress is not None:
            progress(min(1.0, (start + len(chunk)) / N))
    n_queries = {m: int(window_queries[query_mask_of(m)].sum()) for m in PATTERN_METRICS}
    metrics = {m: (sums[m] / n_queries[m] if n_queries[m] else np.full((L, H), np.nan))
               for m in PATTERN_METRICS}
    if copying is not None:
        metrics["copying"] = np.asarray(copying, dtype=np.float64)
    return HeadMetrics(model=lm.name, windows=windows, metrics=metrics, per_window=per_window,
                       best_query=best, n_queries=n_queries, window_queries=window_queries)


# ------------------------------------------------------------------- examples drawn
@dataclass(frozen=True)
class HeadExample:
    """One window with one head's attention from one query, for drawing over the text.

    Attributes:
        layer, head: the head.
        metric: the metric the window was chosen by.
        value: the window's value of that metric.
        window: index of the window; start: its offset in the token stream.
        query: the query position drawn.
        display: [pos] display string of each token.
        attention: [pos] A[query, j] (0 after the query).
        targets: [pos] True where j is a target of the metric for this query (e.g. the
            tokens after earlier copies for induction).
        percentile: the decile it stands for, or None for a top example.
    """

    layer: int
    head: int
    metric: str
    value: float
    window: int
    start: int
    query: int
    display: tuple[str, ...]
    attention: np.ndarray
    targets: np.ndarray
    percentile: Optional[int] = None


def layer_patterns(lm: LoadedModel, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s patterns [b, h, q, k], the forward pass stopped right after them."""
    name = f"blocks.{layer}.attn.hook_pattern"
    out: dict[str, torch.Tensor] = {}

    def keep(pattern: torch.Tensor, hook: object) -> None:
        out["pattern"] = pattern.detach()
        raise _Stop

    try:
        with torch.no_grad():
            lm.model.run_with_hooks(tokens, [(name, keep)])
    except _Stop:
        pass
    return out["pattern"]


def metric_targets(tokens: np.ndarray, metric: str, query: int) -> np.ndarray:
    """[pos] bool: the keys a metric counts for ``query`` in a window of ``tokens``."""
    t = np.asarray(tokens)
    p = t.shape[0]
    out = np.zeros(p, dtype=bool)
    if query < 0:
        return out
    if metric == "previous_token" and query >= 1:
        out[query - 1] = True
    elif metric == "first_token":
        out[0] = True
    elif metric == "self":
        out[query] = True
    elif metric == "duplicate_token":
        out[:query] = t[:query] == t[query]
    elif metric == "induction":
        out[1:query + 1] = t[:query] == t[query]
    return out


def head_examples(lm: LoadedModel, hm: HeadMetrics, metric: str, layer: int, head: int,
                  n: int = 5, deciles: bool = False) -> list[HeadExample]:
    """The head's top examples (or deciles) with its attention row from the chosen query."""
    picks = hm.deciles(metric, layer, head) if deciles else hm.examples(metric, layer, head, n)
    if not picks:
        return []
    rows = np.asarray([p["window"] for p in picks])
    tokens = torch.as_tensor(hm.windows.tokens[rows], dtype=torch.long, device=lm.model.device)
    patterns = layer_patterns(lm, tokens, layer)[:, head].float().cpu().numpy()  # [n, q, k]
    out = []
    for i, p in enumerate(picks):
        ids = hm.windows.tokens[p["window"]]
        q = p["query"]
        out.append(HeadExample(
            layer=layer, head=head, metric=metric, value=p["value"], window=p["window"],
            start=p["start"], query=q,
            display=tuple(lm.tokenizer.display(int(t)) for t in ids),
            attention=patterns[i, q].astype(np.float64) if q >= 0 else np.zeros(len(ids)),
            targets=metric_targets(ids, metric, q), percentile=p.get("percentile")))
    return out


def head_table(hm: HeadMetrics) -> list[dict]:
    """One row per head: layer, head and every metric (rounded to 4 decimals)."""
    L, H = hm.shape
    return [{"head": f"L{layer}H{h}", "layer": layer, "index": h,
             **{m: round(float(v[layer, h]), 4) for m, v in hm.metrics.items()}}
            for layer in range(L) for h in range(H)]


# ------------------------------------------------------------------------ the declaration
def dataset_head_metrics(lm: LoadedModel, windows: Windows, eigen: Any,
                         progress: Optional[Callable[[float], None]] = None) -> HeadMetrics:
    """Every head's metrics over the windows, with the copying score of the circuit
    eigenvalues ``eigen`` (:func:`head_metrics`)."""
    return head_metrics(lm, windows, copying=eigen.copying["full_ov"], progress=progress)


def _windows_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """One forward pass (with its attention patterns) of each window."""
    return float(values.get("n_windows", DEFAULT_WINDOWS))


def _show(lm: LoadedModel, hm: HeadMetrics, views: dict,
          encode: Callable[[Any], Any]) -> dict[str, Any]:
    """The endpoint's fields: the dataset's windows, the definitions, every metric, each
    metric's ranking and the examples of one head (the best of ``metric`` if none given);
    ``encode`` makes arrays and floats JSON-ready (rounded: an example's value is exact)."""
    metric, layer, head = views["metric"], views["layer"], views["head"]
    if head is None:
        layer, head, _ = hm.ranking(metric, 1)[0]
    n = views["n_examples"]
    examples = [{"window": e.window, "start": e.start, "query": e.query, "value": e.value,
                 "tokens": list(e.display), "attention": encode(e.attention)}
                for e in head_examples(lm, hm, metric, layer, head, n)] if n else []
    windows = hm.windows
    metrics = {m: v for m, v in hm.metrics.items() if views["copying"] or m != "copying"}
    return {"dataset": {"name": windows.dataset, "sha256": windows.sha256,
                        "windows": windows.n_windows, "length": windows.length,
                        "stride": windows.stride, "available": windows.n_available,
                        "description": windows.describe()},
            "definitions": {m: {"formula": DEFINITIONS[m], "queries": QUERIES.get(m, "")}
                            for m in metrics},
            "metrics": encode(metrics), "n_queries": hm.n_queries,
            "ranking": {m: [{"layer": la, "head": h, "value": encode(v)}
                            for la, h, v in hm.ranking(m, views["top"])] for m in metrics},
            "examples": {"metric": metric, "layer": layer, "head": head,
                         "windows": examples}}


def _head_needs_layer(views: dict) -> None:
    if views["head"] is not None and views["layer"] is None:
        raise ParamError("'head' needs a 'layer' too")


def _n_heads(cfg: Any) -> int:
    return cfg.n_layers * cfg.n_heads


HEAD_METRICS = declare(
    "head-metrics", dataset_head_metrics, scope="dataset", cost=_windows_cost,
    needs={"eigen": "circuit_eigenvalues"}, label="head metrics", show=_show,
    check_views=_head_needs_layer,
    views=[Choice("metric", "induction", PATTERN_METRICS),
           Sized("layer", None, 0, lambda cfg: cfg.n_layers - 1,
                 what_of=lambda cfg: f" (the model {cfg.name} has {cfg.n_layers} layer(s))"),
           Sized("head", None, 0, lambda cfg: cfg.n_heads - 1,
                 what_of=lambda cfg: f" (each layer of {cfg.name} has {cfg.n_heads} heads)"),
           Int("n_examples", 3, 0, 20),
           Sized("top", lambda cfg: min(10, _n_heads(cfg)), 1, _n_heads,
                 what_of=lambda cfg: f" ({cfg.name} has {_n_heads(cfg)} heads)"),
           Bool("copying", True)])
