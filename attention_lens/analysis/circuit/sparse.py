"""Masked runs that cost in proportion to the circuit.

In a masked run (see :class:`.graph.EdgeEngine`) receiver r's input is

    Σ_u ā_u + c  +  Σ_{u -> r kept} (a_u − ā_u),

the *ablated input* (every edge into r ablated; ``c`` the biases ``b_O`` before it) plus one
term per kept edge. A component none of whose inputs has a kept edge therefore reads exactly
its ablated input, and its output is the one it has in the run with every edge ablated (the
*empty run*): it is read from that run, computed once per pair and ablation, never again. A
component whose output reaches the logits through no kept edge cannot change the metric and
is not computed at all. Only the remaining components are computed, and each receiver's
input sums only the senders it keeps edges from. With every edge kept it is the model's own
forward pass; the empty circuit costs nothing beyond the logits' row.

:class:`SparseRuns` holds one pair's empty run under one ablation; :meth:`SparseRuns.run`
gives the normalised final row of a circuit, equal (to float rounding) to
:meth:`.graph.EdgeEngine.run` with the same mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .graph import EdgeEngine

#: How many times more time a sparse run takes per floating-point operation than a batch of
#: full masked runs, where the full run's last layer and first heads take their fast paths
#: (models without rotary positions; measured on attn-only-2l, 64 tokens: 2.3). With rotary
#: positions every layer takes the general path and a sparse run is faster (SmolLM2-135M,
#: 14 tokens, every edge kept: 0.32 s against 0.46 s of CPU a run on one thread; 1.6-3.2 s
#: for the full run on two busy threads). Keyed by whether the model has rotary positions.
SPARSE_SLOWER = {False: 2.5, True: 0.7}
#: A sparse run's fixed cost per layer it computes something in (many small operations),
#: counted as this much floating-point work when choosing between a sparse and a full run.
LAYER_OVERHEAD_FLOP = 2e6


def masked_run_flop(cfg: Any, n: int) -> float:
    """Estimated floating-point work of one full masked run over the edge graph on ``n``
    positions: every receiver's input formed from its senders, normalised and projected,
    each head's attention and each MLP."""
    H, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
    has_mlp = not cfg.attn_only
    parallel = bool(cfg.parallel_attn_mlp) and has_mlp
    work = 0.0
    for layer in range(cfg.n_layers):
        U = 1 + layer * (H + int(has_mlp))  # the senders before the layer (EdgeGraph)
        work += 3 * H * n * (U * d + d * e) + 2 * H * n * n * e + H * n * e * d
        if has_mlp:
            work += n * ((U + (0 if parallel else H)) * d + (3 if cfg.gated_mlp else 2)
                         * d * (cfg.d_mlp or 0))
    return 2.0 * work


@dataclass(frozen=True)
class Plan:
    """What one circuit computes: per layer, the heads and whether the MLP; the kept edges of
    each receiver block (``attn[l]`` [3H, U] bool, ``mlp[l]`` [U_m] bool, ``logits`` [S])."""

    heads: list[np.ndarray]
    mlp: list[bool]
    attn: list[np.ndarray]
    mlp_in: list[np.ndarray]
    logits: np.ndarray

    @property
    def n_heads(self) -> int:
        """Heads computed."""
        return int(sum(len(h) for h in self.heads))

    @property
    def n_mlps(self) -> int:
        """MLPs computed."""
        return int(sum(self.mlp))


def plan(engine: Any, keep: np.ndarray) -> Plan:
    """The components a circuit ``keep`` [E] bool computes: those with a kept edge into one
    of their inputs whose output reaches the logits along kept edges."""
    g, H = engine.graph, engine.H
    L = g.n_layers
    keep = np.asarray(keep, dtype=bool)
    attn, mlp_in = [], []
    for layer in range(L):
        first, U = g.attn_block(layer)
        attn.append(keep[first:first + 3 * H * U].reshape(3 * H, U))
        if g.has_mlp:
            first, U = g.mlp_block(layer)
            mlp_in.append(keep[first:first + U])
    first, U = g.logits_block()
    logits = keep[first:first + U]
    # backwards from the logits: a sender is useful when a kept edge leads from it into the
    # logits or into a useful component
    feeds = logits.copy()
    heads: list[np.ndarray] = [np.zeros(0, dtype=int)] * L
    mlp = [False] * L
    for layer in range(L - 1, -1, -1):
        if g.has_mlp:
            s = g.mlp_sender(layer)
            if feeds[s] and mlp_in[layer].any():
                mlp[layer] = True
                feeds[:len(mlp_in[layer])] |= mlp_in[layer]
        s0 = g.head_sender(layer, 0)
        m = attn[layer].reshape(3, H, -1)
        has_in = m.any(axis=(0, 2))
        on = np.nonzero(feeds[s0:s0 + H] & has_in)[0]
        heads[layer] = on
        if len(on):
            feeds[:m.shape[2]] |= m[:, on].any(axis=(0, 1))
    return Plan(heads=heads, mlp=mlp, attn=attn, mlp_in=mlp_in, logits=logits)


@dataclass(frozen=True)
class Shape:
    """What the cost estimates read of an :class:`.graph.EdgeEngine`, without a model: the
    config, the edge graph and the positions."""

    cfg: Any
    graph: Any
    n: int

    @property
    def H(self) -> int:  # noqa: N802 - as EdgeEngine
        return int(self.cfg.n_heads)

    @property
    def rotary(self) -> bool:
        return self.cfg.positional_embedding_type == "rotary"

    @property
    def plain(self) -> bool:
        return not self.cfg.normalization_type


def run_cost(engine: Any, p: Plan) -> tuple[float, bool]:
    """Estimated cost of running plan ``p`` (in floating-point work of a full masked run)
    and whether a sparse run is the cheaper way."""
    full = full_run_flop(engine)
    sparse = plan_flop(engine, p) * SPARSE_SLOWER[bool(engine.rotary)]
    return min(full, sparse), sparse < full


def full_run_flop(engine: Any) -> float:
    """Estimated floating-point work of one full masked run of ``engine`` (one run of a
    batch, from the first layer) as :meth:`.graph.EdgeEngine.run` computes it: its last layer
    scored sender by sender at one row and heads that read only the input projected once for
    the whole batch (models without rotary positions)."""
    cfg, g, H, n = engine.cfg, engine.graph, engine.H, engine.n
    d, e, L = cfg.d_model, cfg.d_head, g.n_layers
    mlp_w = (3 if cfg.gated_mlp else 2) * d * (cfg.d_mlp or 0)
    work = 0.0
    for layer in range(L):
        U, last = g.upstream_attn(layer), layer == L - 1
        if last and not engine.rotary:
            work += 2 * U * n * d * H + (0 if engine.plain else n * U * U * d)
        elif U == 1 and not engine.rotary:  # projected once for the whole batch
            work += 2 * H * n * n * e + H * n * e * d
        else:
            work += 3 * H * n * (U * d + d * e) + 2 * H * n * n * e + H * n * e * d
        if g.has_mlp:
            rows = 1 if last else n
            work += rows * (g.upstream_mlp(layer) * d + mlp_w)
    return 2.0 * work


#: Whether torch's thread count is set per calling thread (its OpenMP backend, with MKL's
#: thread-local setting): then a sparse run may take one thread without touching others.
THREAD_LOCAL = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread in this thread for the block (where that is thread-local). A
    sparse run is hundreds of small operations; a pool of threads costs more to wake and
    join for each than it saves, far more on a busy machine (SmolLM2, every edge kept, 2
    busy cores: 0.32 s of CPU a run on one thread, 1.6-3.2 s on two). Results do not depend
    on the process's thread count either. (torch also keeps the count as the default of
    threads that first compute while the block runs; background jobs run in processes of
    their own.)"""
    before = torch.get_num_threads()
    if not THREAD_LOCAL or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plan_flop(engine: Any, p: Plan) -> float:
    """Estimated floating-point work of a sparse run of plan ``p`` (as
    :func:`masked_run_flop` counts it, plus :data:`LAYER_OVERHEAD_FLOP` per busy layer)."""
    cfg, H, n = engine.cfg, engine.H, engine.n
    d, e = cfg.d_model, cfg.d_head
    mlp_w = (3 if cfg.gated_mlp else 2) * d * (cfg.d_mlp or 0)
    work = 0.0
    for layer in range(len(p.heads)):
        on = p.heads[layer]
        rows = n if layer < len(p.heads) - 1 else 1
        if len(on):
            sub = p.attn[layer].reshape(3, H, -1)[:, on]
            recv = int(sub.any(-1).sum())
            senders = int(sub.any((0, 1)).sum())
            if layer:
                work += recv * n * (senders * d + d * e)
            work += len(on) * (2 * rows * n * e + rows * e * d)
            work += LAYER_OVERHEAD_FLOP / 2
        if p.mlp[layer]:
            work += rows * (int(p.mlp_in[layer].sum()) * d + mlp_w) + LAYER_OVERHEAD_FLOP / 2
    return 2.0 * work + int(p.logits.sum()) * d


class SparseRuns:
    """Masked runs of one pair under one ablation: the clean input ``x`` [n, d] (the input
    node's activation) and the ablated sender values ``abl`` [S, n, d]."""

    def __init__(self, engine: EdgeEngine, x: torch.Tensor, abl: torch.Tensor) -> None:
        self.engine = eng = engine
        g, H, n = eng.graph, eng.H, eng.n
        self.abl = abl
        model = eng.model
        with torch.no_grad():
            dt = abl.dtype
            #: per layer the ablated input of its heads and of its MLP, [n, d]
            self.base_attn: list[torch.Tensor] = []
            self.base_mlp: list[torch.Tensor] = []
            #: per layer q, k, v of the ablated input, [3H, n, e] (before rotary positions)
            self.qkv0: list[torch.Tensor] = []
            self.W_qkv, self.b_qkv = [], []
            out0 = torch.zeros_like(abl)  # every sender's output in the empty run
            out0[0] = x
            const = torch.zeros(eng.d, dtype=dt, device=abl.device)
            for layer in range(g.n_layers):
                w, blk = eng.W[layer], model.blocks[layer]
                U = g.upstream_attn(layer)
                base = abl[:U].sum(0) + const
                self.base_attn.append(base)
                W = torch.stack([w["W_Q"], w["W_K"], w["W_V"]]).flatten(0, 1)  # [3H, d, e]
                b = torch.stack([w["b_Q"], w["b_K"], w["b_V"]]).flatten(0, 1)  # [3H, e]
                self.W_qkv.append(W)
                self.b_qkv.append(b)
                xn = eng._norm(blk.ln1, base)
                qkv = torch.einsum("nd,rde->rne", xn, W) + b[:, None]
                self.qkv0.append(qkv)
                if layer == 0:  # the first heads read only the input: kept or ablated
                    xn = eng._norm(blk.ln1, base + x - abl[0])
                    self.qkv_input = torch.einsum("nd,rde->rne", xn, W) + b[:, None]
                z = eng._attend(layer, qkv[None, :H], qkv[None, H:2 * H], qkv[None, 2 * H:],
                                False)[0]
                s0 = g.head_sender(layer, 0)
                out0[s0:s0 + H] = torch.einsum("hne,hed->hnd", z, w["W_O"])
                const = const + w["b_O"]
                if g.has_mlp:
                    U = g.upstream_mlp(layer)
                    base = abl[:U].sum(0) + (const if not g.parallel else const - w["b_O"])
                    self.base_mlp.append(base)
                    out0[g.mlp_sender(layer)] = blk.mlp(eng._norm(blk.ln2, base))
            self.base_logits = abl[:, n - 1].sum(0) + const  # [d]
            #: the empty run's output minus the ablated value of every sender: the term a
            #: kept edge from a sender not computed adds
            self.delta0 = out0 - abl
        self._work = self.delta0.clone()

    def run(self, keep: np.ndarray, p: Optional[Plan] = None) -> torch.Tensor:
        """The normalised final row [d] of the run keeping the edges ``keep`` [E] bool
        (``p``: its :func:`plan`, when already made)."""
        eng = self.engine
        g, H, n, d = eng.graph, eng.H, eng.n, eng.d
        L = g.n_layers
        p = p if p is not None else plan(eng, keep)
        D = self._work  # every sender's (this run's output − ablated value); restored below
        touched: list[int] = []
        with torch.no_grad():
            for layer in range(L):
                last = layer == L - 1
                on = p.heads[layer]
                w, blk = eng.W[layer], eng.model.blocks[layer]
                if len(on):
                    m = p.attn[layer]  # [3H, U]
                    recv = np.nonzero(m.reshape(3, H, -1)[:, on].any(-1).ravel())[0]
                    # receivers of the computed heads that keep an edge: (component, head)
                    comp, head = recv // len(on), on[recv % len(on)]
                    rows = comp * H + head
                    qkv = self.qkv0[layer].clone()
                    idx = torch.from_numpy(rows)
                    if layer == 0:  # every kept edge here is the input's
                        qkv[idx] = self.qkv_input[idx]
                    else:
                        sub = m[rows]
                        senders = torch.from_numpy(np.nonzero(sub.any(0))[0])
                        coef = torch.from_numpy(sub[:, senders.numpy()].astype(np.float32))
                        inp = (coef.to(D.dtype) @ D[senders].flatten(1)).view(len(rows), n, d)
                        xn = eng._norm(blk.ln1, inp + self.base_attn[layer])
                        qkv[idx] = torch.baddbmm(self.b_qkv[layer][idx][:, None], xn,
                                                 self.W_qkv[layer][idx])
                    hs = torch.from_numpy(on)
                    q, k, v = qkv[hs], qkv[H + hs], qkv[2 * H + hs]
                    if last:
                        q = q[:, -1:]
                    z = eng._attend(layer, q[None], k[None], v[None], last)[0]
                    out = torch.einsum("hne,hed->hnd", z, w["W_O"][hs])
                    senders_out = torch.from_numpy(g.head_sender(layer, 0) + on)
                    if last:
                        D[senders_out, n - 1] = out[:, 0] - self.abl[senders_out, n - 1]
                    else:
                        D[senders_out] = out - self.abl[senders_out]
                    touched.append(senders_out)
                if g.has_mlp and p.mlp[layer]:
                    senders = torch.from_numpy(np.nonzero(p.mlp_in[layer])[0])
                    s = g.mlp_sender(layer)
                    if last:
                        inp = D[senders, n - 1].sum(0) + self.base_mlp[layer][n - 1]
                        out = blk.mlp(eng._norm(blk.ln2, inp[None]))[0]
                        D[s, n - 1] = out - self.abl[s, n - 1]
                    else:
                        inp = D[senders].sum(0) + self.base_mlp[layer]
                        D[s] = blk.mlp(eng._norm(blk.ln2, inp)) - self.abl[s]
                    touched.append(torch.tensor([s]))
            senders = torch.from_numpy(np.nonzero(p.logits)[0])
            row = self.base_logits + D[senders, n - 1].sum(0)
            if touched:
                t = torch.cat(touched)
                D[t] = self.delta0[t]
            if eng.cfg.normalization_type:
                row = eng.model.ln_final(row)
        return row
