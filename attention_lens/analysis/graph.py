"""The exact attribution graph of a target logit: tokens → heads → logit, patterns frozen.

With the attention patterns A and the LayerNorm scales σ held at their values on the prompt
(centring is linear), the residual stream is a linear function of its sources: the tokens
(embedding + position), the bias terms and, in models that have them, each MLP's output
(an opaque source: what the MLP computes from its input is not followed). A head's output at
query q is

    out(l, h, q) = Σ_k A[q, k] · J_{l,k}(resid_pre_l(k)) W_V W_O,

with ``J_{l,k}(x) = (x − mean x)/σ_{l,k} · w`` the frozen LayerNorm (identity without one);
its constant parts ``(b_V + b_LN W_V) W_O`` and ``b_O`` form the layer's bias node at q.
The target ``T = resid_final(P) · d`` (``d = W_U[:, u]``, minus ``W_U[:, u']`` for a logit
difference; through the frozen final LayerNorm, whose bias is a node of its own) is then a
sum of path contributions. With ``g(v)`` the gradient of T with respect to node v's output
(frozen patterns and scales), an edge u → v carries ``(part of v's output due to u) · g(v)``,
the sum of the contributions of every path through it. Edges into the target sum to
``logit − b_U`` exactly; what flows into a node equals what flows out of it.

Pruning follows circuit-tracer (Ameisen et al. 2025): influence = Σ_n w Â^n on the
row-normalised absolute adjacency, keep the nodes that make up ``node_threshold`` of the total
influence (tokens and the target always), then the edges that make up ``edge_threshold`` of
the edge influence, then drop nodes left without outgoing (or, for heads, incoming) edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .attention import head_results
from .errors import AnalysisError
from .forward import ForwardPass
from .predictions import TokenLike, check_position, token_id

#: Node kinds, in the order their ids are given.
NODE_KINDS: tuple[str, ...] = ("token", "head", "bias", "mlp", "ln_bias", "target")
DTYPE = torch.float64
Progress = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class AttributionGraph:
    """Nodes and edges of the exact attribution graph of one target.

    Attributes:
        display: [n] display strings of the prompt tokens up to the target position.
        token_ids: [n] the prompt's token ids up to the target position.
        position: P, the position whose next-token logit is the target.
        target_id: token u.
        target_display: display string of u.
        contrast_id: token u' for a logit difference, or None.
        contrast_display: display string of u' ("" without one).
        logit: the model's logit of u at P (minus that of u').
        bias: ``b_U[u]`` (minus ``b_U[u']``); edges into the target sum to ``logit − bias``.
        probability: the model's probability of u at P.
        n_layers: layers of the model (the target sits at layer ``n_layers``).
        n_heads: heads per layer.
        normalization: "none", "LN" or "RMS".
        kind: [N] node kind (see :data:`NODE_KINDS`).
        layer: [N] layer of each node (-1 for tokens, ``n_layers`` for the final LN bias and
            the target).
        head: [N] head of head nodes, -1 otherwise.
        pos: [N] position of each node.
        value: [N] what flows through each node: its contribution to the target (for the
            target, ``logit − bias``).
        src: [E] source node of each edge.
        dst: [E] destination node of each edge.
        weight: [E] the part of the target carried by each edge.
    """

    display: tuple[str, ...]
    token_ids: np.ndarray
    position: int
    target_id: int
    target_display: str
    contrast_id: Optional[int]
    contrast_display: str
    logit: float
    bias: float
    probability: float
    n_layers: int
    n_heads: int
    normalization: str
    kind: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    pos: np.ndarray
    value: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        n = self.kind.shape[0]
        assert self.layer.shape == self.head.shape == self.pos.shape == self.value.shape == (n,)
        assert self.src.shape == self.dst.shape == self.weight.shape

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.kind.shape[0])

    @property
    def target(self) -> int:
        """Id of the target node (the last)."""
        return self.n_nodes - 1

    def label(self, i: int) -> str:
        """Short name of node i ("L1H5@7", "tok 3 '·Potter'", "L0 bias@7", "logit '·Potter'")."""
        kind, layer, pos = self.kind[i], int(self.layer[i]), int(self.pos[i])
        if kind == "token":
            return f"tok {pos} {self.display[pos]!r}"
        if kind == "head":
            return f"L{layer}H{int(self.head[i])}@{pos}"
        if kind == "bias":
            return f"L{layer} bias@{pos}"
        if kind == "mlp":
            return f"L{layer} MLP@{pos}"
        if kind == "ln_bias":
            return "final LN bias"
        tgt = f"logit {self.target_display!r}"
        return tgt if self.contrast_id is None else f"{tgt} − {self.contrast_display!r}"

    def inflow(self) -> np.ndarray:
        """[N] sum of the weights of the edges into each node."""
        return np.bincount(self.dst, weights=self.weight, minlength=self.n_nodes)

    def outflow(self) -> np.ndarray:
        """[N] sum of the weights of the edges out of each node."""
        return np.bincount(self.src, weights=self.weight, minlength=self.n_nodes)


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


# ------------------------------------------------------------------------ the graph
def attribution_graph(lm: LoadedModel, fp: ForwardPass, *, target: Optional[TokenLike] = None,
                      contrast: Optional[TokenLike] = None, position: int = -1,
                      progress: Progress = None) -> AttributionGraph:
    """The exact attribution graph of ``target``'s logit (minus ``contrast``'s) at ``position``.

    Without ``target`` the model's top prediction at ``position`` is explained. ``progress``
    is called with (layers done, layers) while the edges are computed.
    """
    P = check_position(fp, position)  # noqa: N806
    check_size(lm.cfg, P + 1)
    u = int(fp.logits[P].argmax()) if target is None else token_id(lm, target)
    u2 = None if contrast is None else token_id(lm, contrast)
    if u2 is not None and u2 == u:
        raise AnalysisError("the contrast token is the target itself: choose another token")
    cfg, model = lm.cfg, lm.model
    L, H, n = cfg.n_layers, cfg.n_heads, P + 1  # noqa: N806
    norm = cfg.normalization_type or "none"

    with torch.no_grad():
        d_dir = model.W_U[:, u].detach().to("cpu", DTYPE).clone()
        bias = float(model.b_U[u])
        logit = float(fp.logits[P, u])
        if u2 is not None:
            d_dir -= model.W_U[:, u2].detach().to("cpu", DTYPE)
            bias -= float(model.b_U[u2])
            logit -= float(fp.logits[P, u2])
        prob = float(fp.logits[P].double().softmax(-1)[u])

        # ---- node outputs (float64): tokens, then per layer heads / bias / MLP
        tok = fp.cache["hook_embed"][:n].to(DTYPE)
        if "hook_pos_embed" in fp.cache:
            tok = tok + fp.cache["hook_pos_embed"][:n].to(DTYPE)
        heads_out, bias_out, mlp_out, scales, patterns = [], [], [], [], []
        for layer in range(L):
            attn = model.blocks[layer].attn
            w_v = attn.W_V.detach().to("cpu", DTYPE)  # [h, d, e]
            w_o = attn.W_O.detach().to("cpu", DTYPE)  # [h, e, d]
            const_v = attn.b_V.detach().to("cpu", DTYPE)  # [h, e]
            if norm == "LN":
                const_v = const_v + torch.einsum(
                    "d,hde->he", model.blocks[layer].ln1.b.detach().to("cpu", DTYPE), w_v)
            const = torch.einsum("he,hed->hd", const_v, w_o)  # [h, d]
            heads_out.append(head_results(lm, fp, layer)[:n].to(DTYPE) - const)  # [n, h, d]
            bias_out.append(attn.b_O.detach().to("cpu", DTYPE) + const.sum(0))
            if not cfg.attn_only:
                mlp_out.append(fp.cache[f"blocks.{layer}.hook_mlp_out"][:n].to(DTYPE))
            if norm != "none":
                scales.append(fp.cache[f"blocks.{layer}.ln1.hook_scale"].reshape(-1)[:n]
                              .to(DTYPE))
            else:
                scales.append(torch.ones(n, dtype=DTYPE))
            patterns.append(fp.cache[f"blocks.{layer}.attn.hook_pattern"][:, :n, :n].to(DTYPE))

        def jt(layer_norm, y: torch.Tensor) -> torch.Tensor:
            """Transpose of the frozen norm's linear part, without 1/σ (applied per position)."""
            if norm == "none":
                return y
            y = y * layer_norm.w.detach().to("cpu", DTYPE)
            return y - y.mean(-1, keepdim=True) if norm == "LN" else y

        # ---- gradients of T with respect to the residual stream before each layer
        g_final = jt(model.ln_final, d_dir) if norm != "none" else d_dir
        ln_final_bias = 0.0
        if norm != "none":
            g_final = g_final / fp.cache["ln_final.hook_scale"].reshape(-1)[P].to(DTYPE)
            if norm == "LN":
                ln_final_bias = float(model.ln_final.b.detach().to("cpu", DTYPE) @ d_dir)
        grad = [torch.zeros(n, cfg.d_model, dtype=DTYPE) for _ in range(L + 1)]
        grad[L][P] = g_final
        w_read = [None] * L  # per layer: [h, n, d], J^T W_V W_O g at each query (no 1/σ)
        for layer in range(L - 1, -1, -1):
            attn = model.blocks[layer].attn
            w_v = attn.W_V.detach().to("cpu", DTYPE)
            w_o = attn.W_O.detach().to("cpu", DTYPE)
            r = torch.einsum("qd,hed->hqe", grad[layer + 1], w_o)
            w_read[layer] = jt(model.blocks[layer].ln1,
                               torch.einsum("hqe,hde->hqd", r, w_v)) if norm != "none" else \
                torch.einsum("hqe,hde->hqd", r, w_v)
            back = torch.einsum("hqk,hqd->kd", patterns[layer], w_read[layer])
            grad[layer] = grad[layer + 1] + back / scales[layer][:, None]

        # ---- node ids: tokens, then layer by layer heads, bias, MLP; final LN bias; target
        kinds, layers, heads, poss, values = [], [], [], [], []

        def add(kind: str, layer: int, head: np.ndarray, pos: np.ndarray,
                value: np.ndarray) -> np.ndarray:
            start = sum(len(x) for x in kinds)
            m = len(pos)
            kinds.append(np.full(m, kind, dtype=object))
            layers.append(np.full(m, layer, dtype=np.int64))
            heads.append(np.asarray(head, dtype=np.int64).reshape(m))
            poss.append(np.asarray(pos, dtype=np.int64).reshape(m))
            values.append(np.asarray(value, dtype=np.float64).reshape(m))
            return np.arange(start, start + m)

        all_pos = np.arange(n)
        tok_ids = add("token", -1, np.full(n, -1), all_pos, (tok * grad[0]).sum(-1).numpy())
        head_ids, bias_ids, mlp_ids, queries = [], [], [], []
        for layer in range(L):
            qs = np.array([P]) if layer == L - 1 else all_pos  # positions that reach T
            queries.append(qs)
            g = grad[layer + 1][qs]  # [nq, d]
            hv = torch.einsum("qhd,qd->hq", heads_out[layer][qs], g).numpy()  # [h, nq]
            ids = add("head", layer, np.repeat(np.arange(H), len(qs)), np.tile(qs, H), hv)
            head_ids.append(ids.reshape(H, len(qs)))
            bias_ids.append(add("bias", layer, np.full(len(qs), -1), qs,
                                (g @ bias_out[layer]).numpy()))
            if not cfg.attn_only:
                mlp_ids.append(add("mlp", layer, np.full(len(qs), -1), qs,
                                   (mlp_out[layer][qs] * g).sum(-1).numpy()))
        ln_id = None
        if norm == "LN":
            ln_id = int(add("ln_bias", L, [-1], [P], [ln_final_bias])[0])
        target_node = int(add("target", L, [-1], [P], [logit - bias])[0])

        # ---- edges into each layer's heads, from everything written before it, then into
        # the target; laid out by the destination's layer (pruning sweeps them in that order)
        mlp = 0 if cfg.attn_only else 1
        per_pos = H + 1 + mlp  # sources a layer writes at a position
        pairs = [int((all_pos[:, None] <= queries[layer][None, :]).sum()) for layer in range(L)]
        n_edges = sum(p * (1 + layer * per_pos) * H for layer, p in enumerate(pairs))
        n_edges += 1 + L * per_pos + (ln_id is not None)
        src = np.empty(n_edges, dtype=np.int32)
        dst = np.empty(n_edges, dtype=np.int32)
        weight = np.empty(n_edges, dtype=np.float64)
        off = 0
        # sources at every key position: vectors [n (or 1: the same at every k), c, d], ids [n, c]
        written = [(tok[:, None, :], tok_ids[:, None])]
        for layer in range(L):
            qs = queries[layer]
            kk, qq = np.nonzero(all_pos[:, None] <= qs[None, :])  # causal (key, query) pairs
            a = (patterns[layer][:, qs, :] / scales[layer]).permute(2, 0, 1)  # [k, h, nq]
            a_pairs = a[torch.as_tensor(kk), :, torch.as_tensor(qq)]  # [pairs, h]
            w_q = w_read[layer][:, qs]  # [h, nq, d]
            hid = head_ids[layer][:, qq].T  # [pairs, h]
            for vecs, ids in written:
                dots = torch.einsum("kcd,hqd->kchq", vecs, w_q)
                if dots.shape[0] == 1:  # a bias: the same vector at every key
                    sel = dots[0][:, :, torch.as_tensor(qq)].permute(2, 0, 1)
                else:
                    sel = dots[torch.as_tensor(kk), :, :, torch.as_tensor(qq)]
                sel = sel * a_pairs[:, None, :]  # [pairs, c, h]
                m, c = sel.numel(), sel.shape[1]
                weight[off:off + m] = sel.reshape(-1).numpy()
                src[off:off + m].reshape(len(kk), c, H)[:] = ids[kk][:, :, None]
                dst[off:off + m].reshape(len(kk), c, H)[:] = hid[:, None, :]
                off += m
            if layer < L - 1:  # its nodes sit at every position and feed later layers
                written += [(heads_out[layer], head_ids[layer].T),
                            (bias_out[layer][None, None, :], bias_ids[layer][:, None])]
                if mlp:
                    written.append((mlp_out[layer][:, None, :], mlp_ids[layer][:, None]))
            if progress is not None:
                progress(layer + 1, L + 1)

        at_p = [tok_ids[P:P + 1]]
        vec_p = [tok[P:P + 1]]
        for layer in range(L):
            qi = int(np.searchsorted(queries[layer], P))
            at_p += [head_ids[layer][:, qi], bias_ids[layer][qi:qi + 1]]
            vec_p += [heads_out[layer][P], bias_out[layer][None]]
            if mlp:
                at_p.append(mlp_ids[layer][qi:qi + 1])
                vec_p.append(mlp_out[layer][P:P + 1])
        if ln_id is not None:
            at_p.append(np.array([ln_id]))
        into_target = np.concatenate(at_p)
        src[off:] = into_target
        dst[off:] = target_node
        weight[off:off + len(into_target) - (ln_id is not None)] = (
            torch.cat(vec_p) @ g_final).numpy()
        if ln_id is not None:
            weight[-1] = ln_final_bias
        assert off + len(into_target) == n_edges
        if progress is not None:
            progress(L + 1, L + 1)

    return AttributionGraph(
        display=fp.display[:n], token_ids=fp.token_ids[:n].copy(), position=P, target_id=u,
        target_display=lm.tokenizer.display(u), contrast_id=u2,
        contrast_display="" if u2 is None else lm.tokenizer.display(u2), logit=logit,
        bias=bias, probability=prob, n_layers=L, n_heads=H, normalization=norm,
        kind=np.concatenate(kinds).astype(str), layer=np.concatenate(layers),
        head=np.concatenate(heads), pos=np.concatenate(poss), value=np.concatenate(values),
        src=src, dst=dst, weight=weight,
    )


# ------------------------------------------------------------------------- pruning
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


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8,
                edge_threshold: float = 0.98) -> PrunedGraph:
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


# -------------------------------------------------------------------------- export
#: Fields of circuit-tracer's graph JSON (``frontend/graph_models.py`` of circuit-tracer 0.5.0).
GRAPH_JSON_SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's feature number of (layer, index): Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(graph: AttributionGraph, pruned: PrunedGraph, *, slug: str, prompt: str,
               model_name: str, tokens: tuple[str, ...]) -> dict:
    """The pruned graph as a circuit-tracer graph file (metadata, qParams, nodes, links).

    Heads are feature nodes (feature index = head); the opaque sources (each layer's
    attention biases, each MLP's output, the final LayerNorm bias) are error-type nodes, as
    circuit-tracer draws what its replacement model does not explain; tokens are embedding
    nodes and the target is the logit node. ``activation`` is what flows through a node (its
    exact contribution to the target); ``influence`` is the cumulative influence.
    ``tokens`` are the raw token strings (up to the target position).
    """
    L, P = graph.n_layers, graph.position  # noqa: N806
    nodes: dict[int, dict] = {}
    for i in np.flatnonzero(pruned.node_mask):
        kind, layer, pos = graph.kind[i], int(graph.layer[i]), int(graph.pos[i])
        base = dict(ctx_idx=pos, token_prob=0.0, is_target_logit=False, run_idx=0,
                    reverse_ctx_idx=0, influence=float(pruned.cumulative[i]),
                    activation=float(graph.value[i]))
        where = f"at {graph.display[pos]!r} ({pos})"
        if kind == "head":
            head = int(graph.head[i])
            node = dict(node_id=f"{layer}_{head}_{pos}", feature=_cantor(layer, head),
                        layer=str(layer), feature_type="cross layer transcoder",
                        jsNodeId=f"{layer}_{head}-0",
                        clerp=f"attention head L{layer}H{head} {where}")
        elif kind == "token":
            vocab = int(graph.token_ids[pos])
            node = dict(node_id=f"E_{vocab}_{pos}", feature=pos, layer="E",
                        feature_type="embedding", jsNodeId=f"E_{vocab}-{pos}",
                        clerp=f"Emb: {graph.display[pos]!r} + position {pos}")
        elif kind == "target":
            u = graph.target_id
            name = graph.target_display if graph.contrast_id is None else \
                f'{graph.target_display}" − "{graph.contrast_display}'
            node = dict(node_id=f"{L + 1}_{u}_{pos}", feature=u, layer=str(L + 1),
                        feature_type="logit", jsNodeId=f"L_{u}-{pos}",
                        clerp=f'Output "{name}" (p={graph.probability:.3f})')
            node.update(token_prob=graph.probability, is_target_logit=True)
        else:  # opaque sources: attention biases, MLP outputs, final LN bias
            suffix, feature, clerp = {
                "mlp": ("_mlp", -1, f"MLP L{layer} output (opaque) {where}"),
                "bias": ("_bias", -2, f"L{layer} attention biases (b_O + b_V W_O) {where}"),
                "ln_bias": ("_lnf", -3, "final LayerNorm bias"),
            }[kind]
            node = dict(node_id=f"0_{layer}_{pos}{suffix}", feature=feature, layer=str(layer),
                        feature_type="mlp reconstruction error",
                        jsNodeId=f"{layer}_{pos}{suffix}-0", clerp=clerp)
        nodes[int(i)] = {**base, **node}
    links = [{"source": nodes[int(s)]["node_id"], "target": nodes[int(d)]["node_id"],
              "weight": float(w)}
             for s, d, w in zip(graph.src[pruned.edge_mask], graph.dst[pruned.edge_mask],
                                graph.weight[pruned.edge_mask])]
    return {
        "metadata": {
            "slug": slug, "scan": model_name, "transcoder_list": [],
            "prompt_tokens": list(tokens[: P + 1]), "prompt": prompt,
            "node_threshold": pruned.node_threshold,
            "schema_version": GRAPH_JSON_SCHEMA_VERSION,
            "info": {"exact": True, "edge_threshold": pruned.edge_threshold,
                     "target": graph.label(graph.target), "logit": graph.logit,
                     "bias": graph.bias, "normalization": graph.normalization,
                     "frozen": "attention patterns and LayerNorm scales"},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": list(nodes.values()),
        "links": links,
    }


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
               node_threshold: float = 0.8, edge_threshold: float = 0.98,
               progress: Progress = None) -> GraphView:
    """Build the attribution graph, prune it and keep what survives."""
    node_threshold = check_threshold("node threshold", node_threshold)
    edge_threshold = check_threshold("edge threshold", edge_threshold)
    graph = attribution_graph(lm, fp, target=target, contrast=contrast, position=position,
                              progress=progress)
    return subgraph(graph, prune_graph(graph, node_threshold, edge_threshold))


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
