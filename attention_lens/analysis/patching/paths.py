"""Path patching: one sender head's output into later heads' query, key or value input
and into the logits; the table over every sender."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...model.checkpoint import LoadedModel
from ..attention import check_head, check_layer
from ..errors import AnalysisError
from ..predictions import TokenLike
from .engine import _Dense, _first_difference
from .pairs import Prompt
from .prepare import _Setup
from .results import PathPatching, PathPatchingTable
from .terms import COMPONENTS, MLP_MODES, ProgressFn, _check_choice

def _receiver_batch(s: _Setup, j: int, resid: torch.Tensor, delta: torch.Tensor, p0: int,
                    ln_mode: str) -> torch.Tensor:
    """Metric after layer j's heads read ``resid`` [S, d] (rows p0.. of their input, which
    differs from the base run's by ``delta`` [S, d]) through their query, key or value input
    only, one head and input at a time: [n_heads, 3]."""
    eng, base, cfg, n = s.engine, s.base, s.lm.cfg, s.n
    H, e, dev = cfg.n_heads, cfg.d_head, delta.device
    x = base["resid_pre", j]
    blk = s.lm.model.blocks[j]
    if ln_mode == "recomputed" or not cfg.normalization_type:
        moved = blk.ln1(resid)
    else:
        d = delta
        if cfg.normalization_type == "LN":
            d = d - d.mean(-1, keepdim=True)
        moved = blk.ln1(x[p0:]) + d / base["ln1_scale", j][p0:] * blk.ln1.w
    positions = torch.arange(p0, n, device=dev)
    new = {c: eng._proj(j, moved[None], c.upper())[0] for c in COMPONENTS}  # [S, h, e]
    new["q"] = eng._rot(new["q"][None], positions)[0]
    new["k"] = eng._rot(new["k"][None], positions)[0]
    h_idx = torch.arange(H, device=dev).repeat(3)  # batch: (q, all heads), (k, ...), (v, ...)
    b_n = 3 * H
    ar = torch.arange(b_n, device=dev)
    q = base["q", j][p0:, h_idx].transpose(0, 1).clone()  # [B, S, e]
    k = base["k", j][:, h_idx].transpose(0, 1).clone()  # [B, n, e]
    v = base["v", j][:, h_idx].transpose(0, 1).clone()
    q[:H] = new["q"].transpose(0, 1)
    k[H:2 * H, p0:] = new["k"].transpose(0, 1)
    v[2 * H:, p0:] = new["v"].transpose(0, 1)
    z = base["z", j][p0:].expand(b_n, -1, -1, -1).clone()
    # one head per receiver: the layer's attention with a single head
    z[ar, :, h_idx] = eng.attend(j, q[:, :, None], k[:, :, None], v[:, :, None],
                                 torch.arange(p0, n, device=dev))[:, :, 0]
    vals = eng.from_attn(j, _Dense(p0, eng._out(j, z)))
    return vals.reshape(3, H).T


def _recomputed_stream(s: _Setup, layer: int, delta: torch.Tensor, p0: int
                       ) -> list[torch.Tensor]:
    """Rows p0.. of the residual stream after each layer (resid_post of ``layer`` .. the
    last) when the sender in ``layer`` adds ``delta`` [S, d], every attention output after it
    keeps its base value and every MLP from ``layer`` on is recomputed (position-wise, so
    rows before p0 keep their base values)."""
    cfg, base, eng = s.lm.cfg, s.base, s.engine
    out = []
    post = None
    for j in range(layer, cfg.n_layers):
        pre = base["resid_pre", j][p0:] if post is None else post
        attn = base["attn_out", j][p0:]
        if j == layer:
            attn = attn + delta
        if cfg.parallel_attn_mlp:
            # the MLP reads the layer's input: the sender's own layer's MLP does not see it
            mlp = base["mlp_out", j][p0:] if post is None else eng._mlp(j, pre)
            post = pre + attn + mlp
        else:
            mid = pre + attn
            post = eng._mlp(j, mid, mid)
        out.append(post)
    return out


def _path_from_sender(s: _Setup, layer: int, head: int, ln_mode: str,
                      mlps: str = "recomputed") -> tuple[np.ndarray, float]:
    cfg, base, src, eng = s.lm.cfg, s.base, s.source, s.engine
    W_O = s.lm.model.blocks[layer].attn.W_O.detach()[head]
    delta = (src["z", layer][:, head] - base["z", layer][:, head]) @ W_O  # [n, d]
    p0 = _first_difference(src["z", layer][:, head], base["z", layer][:, head])
    values = np.full((cfg.n_layers, cfg.n_heads, 3), np.nan)
    values[layer + 1:] = s.base_metric
    if p0 >= s.n:
        return values, s.base_metric
    if mlps == "frozen" or cfg.attn_only:  # attention-only: nothing to recompute
        for j in range(layer + 1, cfg.n_layers):
            values[j] = _receiver_batch(s, j, base["resid_pre", j][p0:] + delta[p0:],
                                        delta[p0:], p0, ln_mode).double().numpy()
        row = base.final_row + delta[-1]
    else:
        stream = _recomputed_stream(s, layer, delta[p0:], p0)
        for j in range(layer + 1, cfg.n_layers):
            resid = stream[j - 1 - layer]
            values[j] = _receiver_batch(s, j, resid, resid - base["resid_pre", j][p0:], p0,
                                        ln_mode).double().numpy()
        row = stream[-1][-1]
    scale = None
    if ln_mode == "frozen" and cfg.normalization_type:
        post = base.cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"][-1]
        scale = _norm_scale(post, cfg.normalization_type, cfg.eps)
    direct = float(s.metric.of_rows(eng.normalized(row[None], scale), eng.W_U, eng.b_U)[0])
    return values, direct


def _norm_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def path_patching(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *, sender: tuple[int, int],
                  correct: Optional[TokenLike] = None, wrong: Optional[TokenLike] = None,
                  metric: str = "logit_diff", direction: str = "denoising", position: int = -1,
                  ln_mode: str = "recomputed", mlps: str = "recomputed") -> PathPatching:
    """Path patching from ``sender`` = (layer, head) into later heads' q, k, v and the logits
    (``mlps``: the variant, see the module docstring)."""
    _check_choice(ln_mode, ("recomputed", "frozen"), "LayerNorm mode")
    _check_choice(mlps, MLP_MODES, "mlps (what the MLPs between sender and receiver do)")
    try:
        layer, head = sender
    except (TypeError, ValueError):
        raise AnalysisError("sender must be a (layer, head) pair") from None
    layer, head = check_layer(lm, layer), check_head(lm, head)
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    with torch.no_grad():
        values, direct = _path_from_sender(s, layer, head, ln_mode, mlps)
    return PathPatching(sender=(layer, head), direction=s.direction, metric=s.kind,
                        ln_mode=ln_mode, mlps=mlps, values=values, direct=direct,
                        base_metric=s.base_metric, clean_metric=s.clean_metric,
                        corrupted_metric=s.corrupted_metric)


#: Most heads for which the full sender × receiver table is computed.
MAX_TABLE_HEADS = 64


def path_patching_table(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *,
                        correct: Optional[TokenLike] = None,
                        wrong: Optional[TokenLike] = None, metric: str = "logit_diff",
                        direction: str = "denoising", position: int = -1,
                        ln_mode: str = "recomputed", mlps: str = "recomputed",
                        progress: Optional[ProgressFn] = None) -> PathPatchingTable:
    """Every sender × receiver × {q, k, v} path and every sender's direct effect (small models)."""
    _check_choice(ln_mode, ("recomputed", "frozen"), "LayerNorm mode")
    _check_choice(mlps, MLP_MODES, "mlps (what the MLPs between sender and receiver do)")
    cfg = lm.cfg
    if cfg.n_layers * cfg.n_heads > MAX_TABLE_HEADS:
        raise AnalysisError(f"the full path-patching table covers models with at most "
                            f"{MAX_TABLE_HEADS} heads (this one has "
                            f"{cfg.n_layers * cfg.n_heads}); choose one sender head instead")
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    L, H = cfg.n_layers, cfg.n_heads
    values = np.full((L, H, L, H, 3), np.nan)
    direct = np.zeros((L, H))
    with torch.no_grad():
        for i, (layer, head) in enumerate((a, b) for a in range(L) for b in range(H)):
            values[layer, head], direct[layer, head] = _path_from_sender(s, layer, head,
                                                                         ln_mode, mlps)
            if progress:
                progress(i + 1, L * H)
    return PathPatchingTable(values=values, direct=direct, base_metric=s.base_metric,
                             direction=s.direction, metric=s.kind, ln_mode=ln_mode,
                             mlps=mlps)

