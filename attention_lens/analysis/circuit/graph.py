"""The edge-level computational graph of a transformer, and a forward pass over its edges.

Nodes that write into the residual stream (*senders*): the input (token plus positional
embedding), each head's output (``z W_O``, without the layer's shared ``b_O``) and each
MLP's output (``b_out`` included). Nodes that read it (*receivers*): each head's query, key
and value input, each MLP's input and the logits. Every sender writes into every later
receiver, and a receiver's input is the sum of its senders' outputs (plus the constant
biases ``b_O`` of the layers before it): an *edge* is one term of that sum. Giving each
head's q, k and v its own input (TransformerLens' ``use_split_qkv_input``) lets one edge be
changed without touching any other: a LayerNorm is applied to each receiver's own input.

:class:`EdgeEngine` runs the model with a mask over the edges: edge e = (s -> r) carries the
sender's activation of this run where the mask is 1 and an ablated value (zero, a mean, or
the corrupted prompt's activation) where it is 0. With the mask all ones it is the model's
own forward pass; with a probe added to every receiver's input it gives ∂m/∂(input of r)
for every receiver in one backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ...model.checkpoint import LoadedModel
from ...model.transformer import rotate

COMPONENTS = ("q", "k", "v")


@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and the edges between them (receiver-major order).

    Attributes:
        n_layers: layers of the model.
        n_heads: heads per layer.
        has_mlp: whether each layer has an MLP.
        parallel: whether attention and MLP read the same residual (GPT-J style).
        senders: [S] labels: ``"input"``, ``"L0H2"``, ``"MLP0"``.
        receivers: [R] labels: ``"L1H5.q"``, ``"MLP1"``, ``"logits"``.
        sender_layer: [S] layer of each sender (-1 for the input).
        receiver_layer: [R] layer of each receiver (``n_layers`` for the logits).
        src: [E] sender index of each edge.
        dst: [E] receiver index of each edge.
    """

    n_layers: int
    n_heads: int
    has_mlp: bool
    parallel: bool
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    sender_layer: np.ndarray
    receiver_layer: np.ndarray
    src: np.ndarray
    dst: np.ndarray

    @property
    def n_edges(self) -> int:
        """Number of edges."""
        return int(len(self.src))

    def edge_label(self, e: int) -> str:
        """``"L0H2 -> L1H5.k"``."""
        return f"{self.senders[self.src[e]]} -> {self.receivers[self.dst[e]]}"

    def edge_labels(self) -> list[str]:
        """Every edge's label, in edge order."""
        return [self.edge_label(e) for e in range(self.n_edges)]

    # ------------------------------------------------------------------ indexing
    @property
    def per_layer(self) -> int:
        """Senders per layer (heads, plus the MLP)."""
        return self.n_heads + int(self.has_mlp)

    def head_sender(self, layer: int, head: int) -> int:
        """Sender index of head ``(layer, head)``."""
        return 1 + layer * self.per_layer + head

    def mlp_sender(self, layer: int) -> int:
        """Sender index of MLP ``layer``."""
        return 1 + layer * self.per_layer + self.n_heads

    def upstream_attn(self, layer: int) -> int:
        """Senders read by layer ``layer``'s heads (they are senders 0 .. U-1)."""
        return 1 + layer * self.per_layer

    def upstream_mlp(self, layer: int) -> int:
        """Senders read by MLP ``layer``."""
        return self.upstream_attn(layer) + (0 if self.parallel else self.n_heads)

    @property
    def n_senders(self) -> int:
        """Number of senders."""
        return len(self.senders)

    def attn_block(self, layer: int) -> tuple[int, int]:
        """First edge and number of senders of the edges into layer ``layer``'s q/k/v
        receivers: edge ``first + r * U + s`` is sender s into receiver ``c * H + h``."""
        return int(self._attn_first[layer]), self.upstream_attn(layer)

    def mlp_block(self, layer: int) -> tuple[int, int]:
        """First edge and number of senders of the edges into MLP ``layer``."""
        return int(self._mlp_first[layer]), self.upstream_mlp(layer)

    def logits_block(self) -> tuple[int, int]:
        """First edge and number of senders of the edges into the logits."""
        return self.n_edges - self.n_senders, self.n_senders

    @property
    def _attn_first(self) -> np.ndarray:
        return self._firsts()[0]

    @property
    def _mlp_first(self) -> np.ndarray:
        return self._firsts()[1]

    def _firsts(self) -> tuple[np.ndarray, np.ndarray]:
        attn, mlp, at = [], [], 0
        for layer in range(self.n_layers):
            attn.append(at)
            at += 3 * self.n_heads * self.upstream_attn(layer)
            mlp.append(at)
            if self.has_mlp:
                at += self.upstream_mlp(layer)
        return np.array(attn), np.array(mlp)

    def receiver_node(self) -> np.ndarray:
        """[R] the sender index of the component each receiver belongs to (its head or MLP),
        -1 for the logits."""
        out = np.full(len(self.receivers), -1)
        for r, name in enumerate(self.receivers):
            if name == "logits":
                continue
            layer = int(self.receiver_layer[r])
            if name.startswith("MLP"):
                out[r] = self.mlp_sender(layer)
            else:
                out[r] = self.head_sender(layer, int(name.split("H")[1].split(".")[0]))
        return out


def edge_graph(cfg) -> EdgeGraph:
    """The edge graph of a model of config ``cfg``."""
    L, H = cfg.n_layers, cfg.n_heads
    has_mlp, parallel = not cfg.attn_only, bool(cfg.parallel_attn_mlp) and not cfg.attn_only
    senders, s_layer = ["input"], [-1]
    for layer in range(L):
        senders += [f"L{layer}H{h}" for h in range(H)]
        s_layer += [layer] * H
        if has_mlp:
            senders.append(f"MLP{layer}")
            s_layer.append(layer)
    per = H + int(has_mlp)
    receivers, r_layer, src, dst = [], [], [], []
    for layer in range(L):
        up = 1 + layer * per
        for c in COMPONENTS:
            for h in range(H):
                r = len(receivers)
                receivers.append(f"L{layer}H{h}.{c}")
                r_layer.append(layer)
                src += range(up)
                dst += [r] * up
        if has_mlp:
            up_m = up + (0 if parallel else H)
            r = len(receivers)
            receivers.append(f"MLP{layer}")
            r_layer.append(layer)
            src += range(up_m)
            dst += [r] * up_m
    r = len(receivers)
    receivers.append("logits")
    r_layer.append(L)
    src += range(len(senders))
    dst += [r] * len(senders)
    return EdgeGraph(n_layers=L, n_heads=H, has_mlp=has_mlp, parallel=parallel,
                     senders=tuple(senders), receivers=tuple(receivers),
                     sender_layer=np.array(s_layer), receiver_layer=np.array(r_layer),
                     src=np.array(src), dst=np.array(dst))


def _stacked(acts: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Sender activations [B, n, d] stacked: [k, n, d] and True when every one is the same in
    each run of the batch (an expanded view), else [B, k, n, d] and False."""
    if all(x.shape[0] == 1 or x.stride(0) == 0 for x in acts):
        return torch.stack([x[0] for x in acts]), True
    return torch.stack(acts, 1), False


class EdgeEngine:
    """Forward passes over the edge graph of one model, on ``n`` positions (0 .. n-1: the
    metric reads the logits at position n-1, so later positions never matter).

    A run takes the input node's activation ``x`` [B, n, d], the ablated sender activations
    ``abl`` [S, n, d] and a mask [B, E] (None: every edge kept, the model's own forward pass),
    and returns the final residual row at position n-1 after the final norm, [B, d].
    """

    def __init__(self, lm: LoadedModel, n: int) -> None:
        self.lm, self.cfg, self.model, self.n = lm, lm.cfg, lm.model, n
        self.graph = edge_graph(lm.cfg)
        c = self.cfg
        self.H, self.e, self.d = c.n_heads, c.d_head, c.d_model
        self.rotary = c.positional_embedding_type == "rotary"
        #: no LayerNorm: every receiver's projection is linear in its senders
        self.plain = not c.normalization_type
        blocks = self.model.blocks
        self.W = [{k: getattr(b.attn, k).detach() for k in
                   ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")} for b in blocks]
        self.W_U, self.b_U = self.model.W_U.detach(), self.model.b_U.detach()

    # ------------------------------------------------------------------ inputs
    def input_act(self, ids: list[int]) -> torch.Tensor:
        """The input node's activation (token + positional embedding) [n, d]."""
        m = self.model
        tok = torch.tensor(ids[:self.n], dtype=torch.long, device=m.device)
        x = m.W_E.detach()[tok]
        if self.cfg.positional_embedding_type == "standard":
            x = x + m.W_pos.detach()[:self.n]
        return x

    def _norm(self, module: Optional[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
        if module is None or isinstance(module, torch.nn.Identity):
            return x
        if getattr(module, "kind", None) == "LN":
            return F.layer_norm(x, (self.d,), module.w.detach(), module.b.detach(), module.eps)
        return module(x)

    @staticmethod
    def _mix(acts: list[torch.Tensor], abl: torch.Tensor, m: Optional[torch.Tensor],
             row: Optional[int] = None) -> torch.Tensor:
        """Receiver inputs from senders: ``acts`` U tensors [B, n_s, d] (this run), ``abl``
        [U, n, d] (ablated), ``m`` [B, U, R] (None: all kept) -> [B, R, n, d] (or [B, n, d]
        when ``m`` is None); ``row``: only that position, [B, R, d] ([B, 1, d])."""
        if row is not None:
            a = torch.stack([x[:, -1] if x.shape[1] != abl.shape[1] else x[:, row]
                             for x in acts], 1)  # [B, U, d]
            if m is None:
                return a.sum(1)[:, None]
            ab = abl[:, row]
            return torch.einsum("bud,bur->brd", a - ab, m) + ab.sum(0)
        a = torch.stack(acts, 1)  # [B, U, n, d]
        if m is None:
            return a.sum(1)
        return torch.einsum("bund,bur->brnd", a - abl, m) + abl.sum(0)

    @staticmethod
    def _binary(m: torch.Tensor) -> bool:
        return bool(((m == 0) | (m == 1)).all())

    def _project(self, layer: int, xn: torch.Tensor) -> list[torch.Tensor]:
        """q, k, v [B, H, n, e] of normalised inputs xn [B, 3, H, n, d] (or [B, 3, 1, n, d])."""
        w = self.W[layer]
        if xn.shape[1] == 1 and xn.shape[2] == 1:  # one input shared by every receiver
            x = xn[:, 0, 0]  # [B, n, d]
            return [(x @ w["W_" + c].permute(1, 0, 2).flatten(1)).unflatten(-1, (self.H, self.e))
                    .transpose(1, 2) + w["b_" + c][:, None] for c in "QKV"]
        return [torch.einsum("bhnd,hde->bhne", xn[:, i if xn.shape[1] == 3 else 0].expand(
                    -1, self.H, -1, -1), w["W_" + c]) + w["b_" + c][:, None]
                for i, c in enumerate("QKV")]

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                last: bool) -> torch.Tensor:
        """Head results z [B, H, nq, e] from q [B, H, nq, e], k, v [B, H, n, e]."""
        n, dev = self.n, q.device
        q_pos = torch.arange(n - 1 if last else 0, n, device=dev)
        if self.rotary:
            q = rotate(q.transpose(1, 2), q_pos, self.cfg).transpose(1, 2)
            k = rotate(k.transpose(1, 2), torch.arange(n, device=dev), self.cfg).transpose(1, 2)
        allowed = torch.arange(n, device=dev)[None, :] <= q_pos[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              scale=1 / math.sqrt(self.e))  # [B, H, nq, e]

    def _attention(self, layer: int, acts: list[torch.Tensor], abl: torch.Tensor,
                   m: Optional[torch.Tensor], const: torch.Tensor, last: bool,
                   probes: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """Any layer: every receiver's input formed in full, normalised and projected."""
        B, H, n = acts[0].shape[0], self.H, self.n
        inp = self._mix(acts, abl, m)
        if m is None:
            inp = inp[:, None]  # [B, 1, n, d]: one input shared by every receiver
        inp = inp + const
        if probes is not None and m is None and self.plain:
            # without LayerNorm a receiver's input reaches the network only through its own
            # projection (in W + b): probe q, k and v (d_head wide) and take the input's
            # gradient as g W^T afterwards (see input_grads)
            q, k, v = self._project(layer, inp[:, None])
            if last:
                q = q[:, :, -1:]
            qkv = [torch.zeros_like(t, requires_grad=True) for t in (q, k, v)]
            probes.append(("qkv", layer, *qkv))  # type: ignore[arg-type]
            q, k, v = (t + p for t, p in zip((q, k, v), qkv))
            return self._attend(layer, q, k, v, last)
        if probes is not None:
            p = torch.zeros(B, 3 * H, n, self.d, dtype=inp.dtype, device=inp.device,
                            requires_grad=True)
            probes.append(p)
            inp = inp + p
        xn = self._norm(self.model.blocks[layer].ln1, inp)  # [B, 3H or 1, n, d]
        parts = xn.unflatten(1, (3, H)) if xn.shape[1] != 1 else xn[:, None]
        q, k, v = self._project(layer, parts)
        if last:
            q = q[:, :, -1:]
        return self._attend(layer, q, k, v, last)

    def _input_attention(self, layer: int, x: torch.Tensor, abl: torch.Tensor,
                         m: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """Heads that read only the input node, with a 0/1 mask m [B, 3H]: each receiver's
        input is the input's activation or its ablated value, so both are projected once
        and chosen per receiver."""
        B, H = m.shape[0], self.H
        same = x.stride(0) == 0 or B == 1
        xs = x[:1] if same else x
        ln = self.model.blocks[layer].ln1
        kept = self._project(layer, self._norm(ln, xs + const)[:, None, None])
        gone = self._project(layer, self._norm(ln, abl[None] + const)[:, None, None])
        mm = m.view(B, 3, H)[..., None, None]  # [B, 3, H, 1, 1]
        q, k, v = [g + mm[:, i] * (t - g) for i, (t, g) in enumerate(zip(kept, gone))]
        return self._attend(layer, q, k, v, False)

    def _last_attention(self, layer: int, acts: list[torch.Tensor], abl: torch.Tensor,
                        m: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """The last layer, masked, at the metric's query row only, without forming any
        receiver's input: scores and the weighted sum of values are taken sender by sender
        in the residual basis (q·k_j = (W_K q)·LN(in_j), Σ_j A_j v_j = (Σ_j A_j LN(in_j)) W_V),
        a LayerNorm's mean and scale from each sender's mean and the senders' Gram matrix at
        each position. Returns head outputs [B, H, 1, d]."""
        w, blk = self.W[layer], self.model.blocks[layer]
        H, n, d = self.H, self.n, self.d
        B = m.shape[0]
        D = torch.stack(acts, 1) - abl  # [B, U, n, d]
        if D.shape[0] != B:
            D = D.expand(B, -1, -1, -1)
        base = abl.sum(0) + const  # [n, d]
        mq, mk, mv = m[..., :H], m[..., H:2 * H], m[..., 2 * H:]  # [B, U, H]
        norm = blk.ln1 if not isinstance(blk.ln1, torch.nn.Identity) else None
        kind = getattr(norm, "kind", None)
        # the query row
        in_q = base[-1] + torch.einsum("bud,buh->bhd", D[:, :, -1], mq)  # [B, H, d]
        q = torch.einsum("bhd,hde->bhe", self._norm(norm, in_q), w["W_Q"]) + w["b_Q"]
        u_k = torch.einsum("bhe,hde->bhd", q, w["W_K"])  # q · (x W_K) = x · (W_K q)
        stats = None
        if kind is not None:
            stats = self._row_stats(D, base, mk, mv, kind, norm.eps)
        wt = norm.w.detach() if kind is not None else None
        uk = u_k * wt if wt is not None else u_k
        # x_j · u for every sender and position, then mixed by the mask
        dot = torch.einsum("bsjd,bhd->bsjh", D, uk)  # [B, U, n, H]
        raw = torch.einsum("bsjh,bsh->bhj", dot, mk) + torch.einsum("jd,bhd->bhj", base, uk)
        if stats is not None:
            mu_k, sig_k = stats[0], stats[1]  # [B, H, n]
            raw = (raw - mu_k * uk.sum(-1, keepdim=True)) / sig_k
            if kind == "LN":
                raw = raw + torch.einsum("d,bhd->bh", norm.b.detach(), u_k)[..., None]
        scores = (raw + (q * w["b_K"]).sum(-1, keepdim=True)) / math.sqrt(self.e)
        pattern = scores.softmax(-1)  # [B, H, n]: the last row sees every position
        a = pattern if stats is None else pattern / stats[3]
        mixed = torch.einsum("bhj,bsjd->bshd", a, D)  # [B, U, H, d]
        vin = torch.einsum("bshd,bsh->bhd", mixed, mv) + torch.einsum("bhj,jd->bhd", a, base)
        if stats is not None:
            vin = vin - (a * stats[2]).sum(-1, keepdim=True)
            vin = vin * wt
            if kind == "LN":
                vin = vin + norm.b.detach()  # Σ_j A_j b = b
        z = torch.einsum("bhd,hde->bhe", vin, w["W_V"]) + w["b_V"]
        return torch.einsum("bhe,hed->bhd", z, w["W_O"])[:, :, None]

    def _last_attention_plain(self, layer: int, acts: list[torch.Tensor], abl: torch.Tensor,
                              m: torch.Tensor, const: torch.Tensor,
                              zs: dict[int, torch.Tensor]) -> torch.Tensor:
        """:meth:`_last_attention` without LayerNorm, sender group by group: senders the same
        in every run of the batch (the input, a clean prefix) once; heads kept as z (``zs``)
        through W_O without forming their outputs. Returns head outputs [B, H, 1, d]."""
        w, g = self.W[layer], self.graph
        H, n = self.H, self.n
        B, U = m.shape[0], m.shape[1]
        groups: list[tuple[int, int, Optional[int]]] = []  # (first, stop, layer of zs)
        i = 0
        while i < U:
            lay = int(g.sender_layer[i])
            if lay in zs and i == g.head_sender(lay, 0):
                groups.append((i, i + H, lay))
                i += H
            else:
                j = i + 1
                while j < U and not (int(g.sender_layer[j]) in zs
                                     and j == g.head_sender(int(g.sender_layer[j]), 0)):
                    j += 1
                groups.append((i, j, None))
                i = j
        mq, mk, mv = m[..., :H], m[..., H:2 * H], m[..., 2 * H:]
        base = abl.sum(0) + const  # [n, d]
        # the query row
        last_rows = []
        for a0, a1, lay in groups:
            if lay is None:
                last_rows.append(torch.stack([x[:, -1] for x in acts[a0:a1]], 1)
                                 .expand(B, -1, -1) - abl[a0:a1, -1])
            else:
                last_rows.append(torch.einsum("bse,sed->bsd", zs[lay][:, :, -1],
                                              self.W[lay]["W_O"]) - abl[a0:a1, -1])
        d_last = torch.cat(last_rows, 1)  # [B, U, d]
        in_q = base[-1] + torch.einsum("bud,buh->bhd", d_last, mq)
        q = torch.einsum("bhd,hde->bhe", in_q, w["W_Q"]) + w["b_Q"]
        u = torch.einsum("bhe,hde->bhd", q, w["W_K"])  # q · (x W_K) = x · (W_K q)
        raw = torch.einsum("jd,bhd->bhj", base, u)
        for a0, a1, lay in groups:
            ab = abl[a0:a1]
            if lay is None:
                A, shared = _stacked(acts[a0:a1])
                if shared:
                    dot = torch.einsum("sjd,bhd->bsjh", A - ab, u)
                else:
                    dot = torch.einsum("bsjd,bhd->bsjh", A - ab, u)
            else:
                wou = torch.einsum("sed,bhd->bshe", self.W[lay]["W_O"], u)
                dot = (torch.einsum("bsje,bshe->bsjh", zs[lay], wou)
                       - torch.einsum("sjd,bhd->bsjh", ab, u))
            raw = raw + torch.einsum("bsjh,bsh->bhj", dot, mk[:, a0:a1])
        scores = (raw + (q * w["b_K"]).sum(-1, keepdim=True)) / math.sqrt(self.e)
        a = scores.softmax(-1)  # [B, H, n]: the last row sees every position
        vin = torch.einsum("bhj,jd->bhd", a, base)
        for a0, a1, lay in groups:
            ab, mm = abl[a0:a1], mv[:, a0:a1]  # mm [B, k, H]
            if lay is None:
                A, shared = _stacked(acts[a0:a1])
                if shared:
                    mixed = torch.einsum("bhj,sjd->bhsd", a, A - ab)
                else:
                    mixed = torch.einsum("bhj,bsjd->bhsd", a, A - ab)
                vin = vin + torch.einsum("bhsd,bsh->bhd", mixed, mm)
            else:
                az = torch.einsum("bhj,bsje->bhse", a, zs[lay]) * mm.transpose(1, 2)[..., None]
                vin = vin + az.flatten(2) @ self.W[lay]["W_O"].flatten(0, 1)
                vin = vin - torch.einsum("bhsd,bsh->bhd",
                                         torch.einsum("bhj,sjd->bhsd", a, ab), mm)
        z = torch.einsum("bhd,hde->bhe", vin, w["W_V"]) + w["b_V"]
        return torch.einsum("bhe,hed->bhd", z, w["W_O"])[:, :, None]

    def _row_stats(self, D: torch.Tensor, base: torch.Tensor, mk: torch.Tensor,
                   mv: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, ...]:
        """Mean and scale of each key and value receiver's input at every position,
        [B, H, n] each: (mu_k, sigma_k, mu_v, sigma_v)."""
        d = self.d
        gram = torch.einsum("bsjd,btjd->bjst", D, D)  # [B, n, U, U]
        cross = torch.einsum("bsjd,jd->bsj", D, base)  # [B, U, n]
        base_sq = (base * base).sum(-1)  # [n]
        out = []
        for mm in (mk, mv):
            sq = (base_sq[None, None] + 2 * torch.einsum("bsj,bsh->bhj", cross, mm)
                  + torch.einsum("bjst,bsh,bth->bhj", gram, mm, mm))
            if kind == "LN":
                mean = (torch.einsum("bsj,bsh->bhj", D.mean(-1), mm)
                        + base.mean(-1)[None, None])
                var = sq / d - mean * mean
            else:
                mean = torch.zeros_like(sq)
                var = sq / d
            out += [mean, (var + eps).sqrt()]
        return tuple(out)

    def run(self, x: torch.Tensor, abl: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
            probes: Optional[list[torch.Tensor]] = None, start: int = 0,
            prefix: Optional[torch.Tensor] = None, full_rows: bool = False,
            collect: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """The normalised final residual row [B, d] of a masked run (see the class docstring).

        ``probes``: a list that receives one zero tensor per receiver block (requires grad)
        added to the receivers' inputs, in order: per layer [B, 3H, n, d] for q/k/v, then
        [B, n, d] for the MLP; last [B, d] for the logits. ``start`` with ``prefix`` [U, n, d]:
        begin at layer ``start`` from these (unmasked) sender activations of the senders
        before it. ``full_rows``: compute the last layer at every position (to read every
        sender's activation); ``collect`` receives the sender activations [B, n, d].
        """
        g, cfg, n, H = self.graph, self.cfg, self.n, self.H
        B = x.shape[0]
        L = cfg.n_layers
        dev = x.device
        acts: list[torch.Tensor] = [x]
        zs: dict[int, torch.Tensor] = {}
        const = torch.zeros(self.d, dtype=x.dtype, device=dev)
        if start:
            acts = [prefix[i].expand(B, -1, -1) for i in range(prefix.shape[0])]
            for layer in range(start):
                const = const + self.W[layer]["b_O"]
        for layer in range(start, L):
            last = layer == L - 1 and not full_rows
            w, blk = self.W[layer], self.model.blocks[layer]
            first, U = g.attn_block(layer)
            m = None if mask is None else mask[:, first:first + 3 * H * U].view(
                B, 3 * H, U).transpose(1, 2)
            fast = m is not None and probes is None and not self.rotary
            z = None
            if fast and last and self.plain:
                result = self._last_attention_plain(layer, acts[:U], abl[:U], m, const, zs)
            elif fast and last:
                result = self._last_attention(layer, acts[:U], abl[:U], m, const)
            elif fast and U == 1 and self._binary(m):
                z = self._input_attention(layer, acts[0], abl[0], m[:, 0], const)
            else:
                z = self._attention(layer, acts[:U], abl[:U], m, const, last, probes)
            if z is not None:
                # heads read only by the last layer (and, at one row, the logits) stay as z:
                # the last layer's plain path reads them through W_O without forming z W_O
                lazy = (fast and self.plain and not g.has_mlp and layer == L - 2
                        and collect is None)
                if lazy:
                    zs[layer] = z
                    z = z[:, :, -1:]
                result = torch.einsum("bhne,hed->bhnd", z, w["W_O"])
            acts += list(result.unbind(1))
            if collect is not None:
                collect += list(result.unbind(1))
            const = const + w["b_O"]
            if g.has_mlp:
                first, U = g.mlp_block(layer)
                m = None if mask is None else mask[:, first:first + U][:, :, None]
                if last:
                    inp = self._mix(acts[:U], abl[:U], m, row=n - 1)[:, :1]  # [B, 1, d]
                else:
                    inp = self._mix(acts[:U], abl[:U], m)
                    inp = inp if mask is None else inp[:, 0]
                # the layer's own b_O reaches its MLP only when the MLP reads resid_mid
                inp = inp + (const if not g.parallel else const - w["b_O"])
                if probes is not None:
                    p = torch.zeros_like(inp, requires_grad=True)
                    probes.append(p)
                    inp = inp + p
                out = blk.mlp(self._norm(blk.ln2, inp))
                acts.append(out)
                if collect is not None:
                    collect.append(out)
        first, U = g.logits_block()
        m = None if mask is None else mask[:, first:first + U][:, :, None]
        row = self._mix(acts, abl, m, row=n - 1)[:, 0] + const  # [B, d]
        if probes is not None:
            p = torch.zeros_like(row, requires_grad=True)
            probes.append(p)
            row = row + p
        if cfg.normalization_type:
            row = self.model.ln_final(row)
        return row

    def input_grads(self, probes: list, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients with respect to every receiver block's input, from the gradients of
        the ``probes`` a run added (q/k/v probes become ``g W^T``, summed over the batch)."""
        out, it = [], iter(grads)
        for p in probes:
            if not isinstance(p, tuple):
                out.append(next(it).sum(0))
                continue
            layer, n = p[1], self.n
            w = self.W[layer]
            full = None
            for i, c in enumerate("QKV"):
                g = next(it).sum(0)  # [H, rows, e] (the last layer's query: one row)
                if full is None:
                    full = g.new_zeros(3, self.H, n, self.d)
                torch.matmul(g, w["W_" + c].transpose(1, 2), out=full[i, :, n - g.shape[1]:])
            out.append(full.flatten(0, 1))  # [3H, n, d]
        return out

    def sender_acts(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sender's activation on one prompt, [S, n, d], and the logits at position
        n-1 [d_vocab] (the model's own forward)."""
        x = self.input_act(ids)[None]
        collect: list[torch.Tensor] = [x]
        with torch.no_grad():
            row = self.run(x, torch.zeros(1, self.n, self.d, dtype=x.dtype, device=x.device),
                           full_rows=True, collect=collect)
        return torch.stack([c[0] for c in collect]), self.logits(row)[0]

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of normalised final rows [B, d]."""
        return rows @ self.W_U + self.b_U


ProgressFn = Callable[[int, int], None]
