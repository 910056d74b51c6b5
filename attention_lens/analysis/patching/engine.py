"""The patching engine: continues a cached base run from a batch of patches, recomputing
only the rows and layers they change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ...model.checkpoint import LoadedModel
from ...model.transformer import Norm, rotate
from .runs import _Run
from .terms import Metric

@dataclass
class _Single:
    """Patched rows that differ from the base run at one position each: ``pos`` [B],
    ``val`` [B, d] (every other row equals the base run at this point of the network)."""

    pos: torch.Tensor
    val: torch.Tensor


@dataclass
class _Dense:
    """Patched rows ``p0``..``p0 + S - 1``: ``val`` [B, S, d]."""

    p0: int
    val: torch.Tensor


_State = Union[_Single, _Dense]


def _first_row(st: _State) -> int:
    """The first row a state changes."""
    return int(st.pos.min()) if isinstance(st, _Single) else st.p0


def _first_difference(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> int:
    """First index along ``dim`` where ``a`` and ``b`` differ (their length if nowhere)."""
    diff = (a != b).flatten(dim + 1).any(-1) if a.ndim > dim + 1 else a != b
    where = torch.nonzero(diff.reshape(-1))
    return int(where[0]) if len(where) else int(a.shape[dim])


class _Engine:
    """Continues the base run from a batch of patches, recomputing only what they change."""

    def __init__(self, lm: LoadedModel, base: _Run, metric: Metric, n: int) -> None:
        self.lm, self.cfg, self.model = lm, lm.cfg, lm.model
        self.base, self.metric, self.n = base, metric, n
        c = self.cfg
        self.h, self.e, self.d = c.n_heads, c.d_head, c.d_model
        self.W_U, self.b_U = self.model.W_U.detach(), self.model.b_U.detach()

    # ------------------------------------------------------------------ pieces
    def _rot(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions for q or k rows [B, S, h, e] at ``positions`` [S] or [B, 1]."""
        if self.cfg.positional_embedding_type != "rotary":
            return x
        if positions.ndim == 1:
            return rotate(x, positions, self.cfg)
        return rotate(x.transpose(0, 1), positions[:, 0], self.cfg).transpose(0, 1)

    # The blocks' arithmetic is the model's own (model/transformer.py: Norm, MLP and the
    # pieces of Attention, in their fused forms without hooks); the engine only chooses
    # which rows to run through it.
    def _proj(self, j: int, x: torch.Tensor, which: str) -> torch.Tensor:
        """q, k or v of normalised rows x [..., p, d] -> [..., p, h, e] (before rotary)."""
        return self.model.blocks[j].attn.project(x, which.lower())

    def _norm(self, module_name: str, j: int, x: torch.Tensor) -> torch.Tensor:
        """The block's norm (``ln1`` or ``ln2``) of rows x."""
        norm = getattr(self.model.blocks[j], module_name)
        return norm.fused(x) if isinstance(norm, Norm) else norm(x)

    def _out(self, j: int, z: torch.Tensor, resid: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Attention output rows from z rows [..., h, e] (bias included), plus ``resid``
        rows of the same shape when given."""
        return self.model.blocks[j].attn.output(z, resid)

    def attend(self, j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor) -> torch.Tensor:
        """Layer j's causal attention of queries q [B, nq, h, e] at positions q_pos [nq] over
        keys and values k, v [B, T, h, e] -> z [B, nq, h, e]."""
        return self.model.blocks[j].attn.attend_fused(q, k, v, q_pos)

    def _base_rows(self, name: str, j: int, p0: int, batch: int) -> torch.Tensor:
        return self.base[name, j][p0:].expand(batch, -1, -1)

    def _dense(self, st: _State, name: str, j: int, p0: int) -> torch.Tensor:
        """Rows p0.. of a state as [B, S, d], filling unpatched rows from the base run."""
        if isinstance(st, _Dense):
            return st.val[:, p0 - st.p0:]
        b = st.val.shape[0]
        rows = self._base_rows(name, j, p0, b).clone()
        inside = st.pos >= p0
        idx = torch.nonzero(inside).flatten()
        rows[idx, st.pos[idx] - p0] = st.val[idx]
        return rows

    def _attention(self, j: int, st: _State, last: bool,
                   resid: Optional[torch.Tensor] = None) -> _Dense:
        """Attention output of layer j for a patched resid_pre state (rows of the queries
        that can change; only the last row when ``last``), plus ``resid`` (those rows of the
        residual stream) when given."""
        n, h, e = self.n, self.h, self.e
        qb, kb, vb = self.base["q", j], self.base["k", j], self.base["v", j]
        if isinstance(st, _Single) and last:
            return self._attention_single_last(j, st, resid)
        if isinstance(st, _Single):
            b = st.val.shape[0]
            ar = torch.arange(b, device=st.val.device)
            xn = self._norm("ln1", j, st.val)[:, None]  # [B, 1, d]
            pos = st.pos[:, None]
            qi = self._rot(self._proj(j, xn, "Q"), pos)[:, 0]
            ki = self._rot(self._proj(j, xn, "K"), pos)[:, 0]
            vi = self._proj(j, xn, "V")[:, 0]
            k = kb.expand(b, n, h, e).clone()
            v = vb.expand(b, n, h, e).clone()
            k[ar, st.pos], v[ar, st.pos] = ki, vi
            p0 = n - 1 if last else int(st.pos.min())
            q = qb[p0:].expand(b, n - p0, h, e).clone()
            inside = torch.nonzero(st.pos >= p0).flatten()
            q[inside, st.pos[inside] - p0] = qi[inside]
        else:
            b, p0 = st.val.shape[0], st.p0
            xn = self._norm("ln1", j, st.val)
            positions = torch.arange(p0, n, device=xn.device)
            k = torch.cat([kb[:p0].expand(b, p0, h, e),
                           self._rot(self._proj(j, xn, "K"), positions)], 1)
            v = torch.cat([vb[:p0].expand(b, p0, h, e), self._proj(j, xn, "V")], 1)
            if last:
                xn, positions, p0 = xn[:, -1:], positions[-1:], n - 1
            q = self._rot(self._proj(j, xn, "Q"), positions)
        q_pos = torch.arange(p0, n, device=q.device)
        z = self.attend(j, q, k, v, q_pos)
        return _Dense(p0, self._out(j, z, resid))

    def _attention_single_last(self, j: int, st: _Single,
                               resid: Optional[torch.Tensor] = None) -> _Dense:
        """Last layer, one changed row per variant: only the metric's query row is needed, so
        update the base run's score row at the changed key (and the query itself when the
        changed row is the metric's) instead of recomputing every key."""
        n, e = self.n, self.e
        qb, kb, vb = self.base["q", j], self.base["k", j], self.base["v", j]  # [n, h, e]
        b = st.val.shape[0]
        ar = torch.arange(b, device=st.val.device)
        xn = self._norm("ln1", j, st.val)[:, None]  # [B, 1, d]
        pos = st.pos[:, None]
        qi = self._rot(self._proj(j, xn, "Q"), pos)[:, 0]  # [B, h, e]
        ki = self._rot(self._proj(j, xn, "K"), pos)[:, 0]
        vi = self._proj(j, xn, "V")[:, 0]
        root = math.sqrt(e)
        q = qb[n - 1].expand_as(qi).clone()
        at_query = torch.nonzero(st.pos == n - 1).flatten()
        q[at_query] = qi[at_query]
        # every key of the base run (per head: [B, e] @ [e, n]) ...
        scores = (q.transpose(0, 1) @ kb.permute(1, 2, 0)).transpose(0, 1) / root  # [B, h, n]
        scores[ar, :, st.pos] = (q * ki).sum(-1) / root  # ... but the changed one
        pattern = scores.softmax(-1)
        z = (pattern.transpose(0, 1) @ vb.transpose(0, 1)).transpose(0, 1)  # [B, h, e]
        z = z + pattern[ar, :, st.pos][..., None] * (vi - vb[st.pos])
        return _Dense(n - 1, self._out(j, z, None if resid is None else resid[:, 0])[:, None])

    def _mlp(self, j: int, x: torch.Tensor, resid: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """MLP output of rows x (its LayerNorm included), plus ``resid`` when given."""
        return self.model.blocks[j].mlp.fused(self._norm("ln2", j, x), resid)

    def _rows_like(self, st: _State, name: str, j: int, like: _State) -> torch.Tensor:
        """Base rows ``name`` of layer j at the rows ``like`` holds."""
        if isinstance(like, _Single):
            return self.base[name, j][like.pos]
        return self._base_rows(name, j, like.p0, like.val.shape[0])

    def layer(self, j: int, st: _State) -> _State:
        """Run layer j on a patched resid_pre state; returns the resid_post state."""
        last = j == self.cfg.n_layers - 1
        x = self._dense(st, "resid_pre", j, self.n - 1 if last else _first_row(st))
        attn = self._attention(j, st, last, x)
        if self.cfg.attn_only:
            post = attn.val
        elif self.cfg.parallel_attn_mlp:
            post = self._mlp(j, x, attn.val)
        else:
            post = self._mlp(j, attn.val, attn.val)
        return _Dense(attn.p0, post)

    def from_attn(self, j: int, st: _State) -> torch.Tensor:
        """Metric after replacing layer j's attention output rows by ``st``."""
        if j == self.cfg.n_layers - 1 and isinstance(st, _Dense):
            st = _Dense(self.n - 1, st.val[:, -1:])
        pre = self._rows_like(st, "resid_pre", j, st)
        val = st.val
        if self.cfg.attn_only:
            post = pre + val
        elif self.cfg.parallel_attn_mlp:
            post = pre + val + self._rows_like(st, "mlp_out", j, st)
        else:
            mid = pre + val
            post = self._mlp(j, mid, mid)
        new = _Single(st.pos, post) if isinstance(st, _Single) else _Dense(st.p0, post)
        return self.from_post(j, new)

    def from_post(self, j: int, st: _State) -> torch.Tensor:
        """Metric after replacing layer j's resid_post rows by ``st``."""
        for layer in range(j + 1, self.cfg.n_layers):
            st = self.layer(layer, st)
        return self.finish(st)

    def finish(self, st: _State) -> torch.Tensor:
        """Metric of the final residual stream at the metric position [B]."""
        if isinstance(st, _Dense):
            row = st.val[:, -1]
        else:
            here = (st.pos == self.n - 1)[:, None]
            row = torch.where(here, st.val, self.base.final_row.expand_as(st.val))
        return self.metric.of_rows(self.normalized(row), self.W_U, self.b_U)

    def normalized(self, row: torch.Tensor, frozen_scale: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Final residual rows [B, d] through the final norm (if the model has one)."""
        if self.cfg.normalization_type:
            ln = self.model.ln_final
            if frozen_scale is None:
                row = ln(row)
            else:
                if self.cfg.normalization_type == "LN":
                    row = row - row.mean(-1, keepdim=True)
                row = row / frozen_scale * ln.w + (ln.b if self.cfg.normalization_type == "LN"
                                                   else 0)
        return row

