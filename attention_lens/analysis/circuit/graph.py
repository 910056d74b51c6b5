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
            inp = self._mix(acts[:U], abl[:U], m)
            if mask is None:
                inp = inp[:, None]  # [B, 1, n, d]: one input shared by every receiver
            inp = inp + const
            if probes is not None:
                p = torch.zeros(B, 3 * H, n, self.d, dtype=x.dtype, device=dev,
                                requires_grad=True)
                probes.append(p)
                inp = inp + p
            xn = self._norm(blk.ln1, inp)  # [B, 3H or 1, n, d]
            parts = xn.unflatten(1, (3, H)) if xn.shape[1] != 1 else \
                xn.expand(B, 3 * H, n, self.d).unflatten(1, (3, H))  # [B, 3, H, n, d]
            xq = parts[:, 0, :, -1:] if last else parts[:, 0]
            q = torch.einsum("bhnd,hde->bhne", xq, w["W_Q"]) + w["b_Q"][:, None]
            k = torch.einsum("bhnd,hde->bhne", parts[:, 1], w["W_K"]) + w["b_K"][:, None]
            v = torch.einsum("bhnd,hde->bhne", parts[:, 2], w["W_V"]) + w["b_V"][:, None]
            q_pos = torch.arange(n - 1 if last else 0, n, device=dev)
            if self.rotary:
                q = rotate(q.transpose(1, 2), q_pos, cfg).transpose(1, 2)
                k = rotate(k.transpose(1, 2), torch.arange(n, device=dev), cfg).transpose(1, 2)
            allowed = torch.arange(n, device=dev)[None, :] <= q_pos[:, None]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               scale=1 / math.sqrt(self.e))  # [B, H, nq, e]
            result = torch.einsum("bhne,hed->bhnd", z, w["W_O"])  # [B, H, nq, d]
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

    def sender_acts(self, ids: list[int]) -> torch.Tensor:
        """Every sender's activation on one prompt, [S, n, d] (the model's own forward)."""
        x = self.input_act(ids)[None]
        collect: list[torch.Tensor] = [x]
        with torch.no_grad():
            self.run(x, torch.zeros(1, self.n, self.d, dtype=x.dtype, device=x.device),
                     full_rows=True, collect=collect)
        return torch.stack([c[0] for c in collect])

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of normalised final rows [B, d]."""
        return rows @ self.W_U + self.b_U


ProgressFn = Callable[[int, int], None]
