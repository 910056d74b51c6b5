"""Build the exact attribution graph of a target logit: tokens → heads → logit, patterns frozen.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ...model.checkpoint import LoadedModel
from ..attention import head_results
from ..errors import AnalysisError
from ..forward import ForwardPass
from ..predictions import TokenLike, check_position, token_id
from .budget import check_size

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
