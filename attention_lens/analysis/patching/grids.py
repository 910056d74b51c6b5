"""Activation-patching grids (exact, beside the attribution-patching estimate), on one
pair or averaged over a set of pairs."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...model.checkpoint import LoadedModel
from ..errors import AnalysisError
from ..predictions import TokenLike
from .engine import _Dense, _first_difference, _Single
from .pairs import MAX_PAIRS, Prompt, PromptPair
from .prepare import _Setup
from .results import PairSetPatching, PatchingGrid
from .terms import GRANULARITIES, GRID_AXES, ProgressFn, _check_choice

#: Patched rows per batch (bounds memory: rows × d_model floats per activation).
ROW_BUDGET = 8192


def _chunks(order: list[int], starts: list[int], n: int, one_row: bool = False
            ) -> list[list[int]]:
    """Split variants (sorted by start row) into batches of at most ROW_BUDGET rows
    (``one_row``: each variant recomputes a single row)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        p0 = starts[cur[0]] if cur else starts[i]
        rows = 1 if one_row else max(1, n - p0)
        # rows between p0 and a variant's own start are recomputed for nothing: keep them few
        spread = not one_row and starts[i] - p0 > max(1, (n - p0) // 16)
        if cur and ((len(cur) + 1) * rows > ROW_BUDGET or spread):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _exact_grid(s: _Setup, granularity: str, progress: Optional[ProgressFn]) -> tuple[
        np.ndarray, int]:
    """The exact grid (metric after each patch) and how many patched runs were computed."""
    cfg, base, src, n = s.lm.cfg, s.base, s.source, s.n
    L, H, T = cfg.n_layers, cfg.n_heads, s.n_tokens
    shape = {"head_out_by_pos": (L, T, H)}.get(
        granularity, (L, H) if GRID_AXES[granularity][1] == "head" else (L, T))
    out = torch.full(shape, s.base_metric, dtype=torch.float64)
    if granularity == "mlp_out" and cfg.attn_only:
        raise AnalysisError("this model has no MLPs (it is attention-only); choose another "
                            "granularity")
    # variants: (layer, index tuple into out, start row, kind-specific payload)
    jobs: dict[int, list[tuple[tuple[int, ...], int, object]]] = {j: [] for j in range(L)}
    for j in range(L):
        if granularity in ("resid_pre", "attn_out", "mlp_out"):
            a_s, a_b = src[granularity, j], base[granularity, j]
            for p in range(n):
                if not torch.equal(a_s[p], a_b[p]):
                    if granularity != "resid_pre" and j == L - 1 and p != n - 1:
                        continue  # a one-row change after the last attention misses the metric
                    jobs[j].append(((j, p), p, p))
        elif granularity == "head_out_by_pos":
            zs, zb = src["z", j], base["z", j]
            for p in range(n):
                if j == L - 1 and p != n - 1:
                    continue
                for hd in range(H):
                    if not torch.equal(zs[p, hd], zb[p, hd]):
                        jobs[j].append(((j, p, hd), p, (p, hd)))
        else:
            name = {"head_out": "z", "head_q": "q", "head_k": "k", "head_v": "v",
                    "head_pattern": "pattern"}[granularity]
            a_s, a_b = src[name, j], base[name, j]
            for hd in range(H):
                if name == "pattern":
                    p0 = _first_difference(a_s[hd], a_b[hd])
                else:
                    p0 = _first_difference(a_s[:, hd], a_b[:, hd])
                if p0 < n:
                    jobs[j].append(((j, hd), p0, hd))
    total = sum(len(v) for v in jobs.values())
    done = 0
    if progress:
        progress(0, total)
    with torch.no_grad():
        for j in range(L):
            variants = sorted(jobs[j], key=lambda v: v[1])
            starts = [v[1] for v in variants]
            # one changed row that meets only the last layer: a score-row update per variant
            one_row = (j == L - 1 or (j == L - 2 and granularity in (
                "attn_out", "mlp_out", "head_out_by_pos")))
            for chunk in _chunks(list(range(len(variants))), starts, n, one_row):
                batch = [variants[i] for i in chunk]
                values = _run_batch(s, granularity, j, batch)
                for (index, _, _), val in zip(batch, values.tolist()):
                    out[index] = val
                done += len(batch)
                if progress:
                    progress(done, total)
    return out.numpy(), total


def _run_batch(s: _Setup, granularity: str, j: int, batch: list) -> torch.Tensor:
    eng, base, src, n = s.engine, s.base, s.source, s.n
    dev = base.final_row.device
    if granularity == "resid_pre":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        st = _Single(pos, src["resid_pre", j][pos])
        return eng.from_post(j, eng.layer(j, st))
    if granularity == "attn_out":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        return eng.from_attn(j, _Single(pos, src["attn_out", j][pos]))
    if granularity == "mlp_out":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        if s.lm.cfg.parallel_attn_mlp:
            row = base["resid_pre", j][pos] + base["attn_out", j][pos]
        else:
            row = base["resid_mid", j][pos]
        return eng.from_post(j, _Single(pos, row + src["mlp_out", j][pos]))
    if granularity == "head_out_by_pos":
        pos = torch.tensor([b[2][0] for b in batch], device=dev)
        heads = torch.tensor([b[2][1] for b in batch], device=dev)
        z = base["z", j][pos].clone()  # [B, h, e]
        ar = torch.arange(len(batch), device=dev)
        z[ar, heads] = src["z", j][pos, heads]
        return eng.from_attn(j, _Single(pos, eng._out(j, z)))
    # whole-head patches: recompute head h's output at rows p0.. and the layer's output
    heads = [b[2] for b in batch]
    p0 = min(b[1] for b in batch)
    b_n, h_idx = len(batch), torch.tensor(heads, device=dev)
    ar = torch.arange(b_n, device=dev)
    z = base["z", j][p0:].expand(b_n, -1, -1, -1).clone()  # [B, S, h, e]
    if granularity == "head_out":
        z[ar, :, h_idx] = src["z", j][p0:, h_idx].transpose(0, 1)
    else:
        q = base["q", j][p0:, h_idx].transpose(0, 1)  # [B, S, e]
        k = base["k", j][:, h_idx].transpose(0, 1)  # [B, n, e]
        v = base["v", j][:, h_idx].transpose(0, 1)
        if granularity == "head_pattern":
            pat = src["pattern", j][h_idx, p0:]  # [B, S, n]
        else:
            if granularity == "head_q":
                q = src["q", j][p0:, h_idx].transpose(0, 1)
            elif granularity == "head_k":
                k = src["k", j][:, h_idx].transpose(0, 1)
            else:
                v = src["v", j][:, h_idx].transpose(0, 1)
            # one head per variant: the layer's attention with a single head
            z[ar, :, h_idx] = eng.attend(j, q[:, :, None], k[:, :, None], v[:, :, None],
                                         torch.arange(p0, n, device=dev))[:, :, 0]
            return eng.from_attn(j, _Dense(p0, eng._out(j, z)))
        z[ar, :, h_idx] = pat @ v
    return eng.from_attn(j, _Dense(p0, eng._out(j, z)))


# ---------------------------------------------------------------- attribution patching
_ATTR_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "head_out": "attn.hook_z",
               "head_out_by_pos": "attn.hook_z", "head_q": "attn.hook_q",
               "head_k": "attn.hook_k", "head_v": "attn.hook_v",
               "head_pattern": "attn.hook_pattern"}


def _attribution(s: _Setup, granularities: tuple[str, ...]) -> dict[str, np.ndarray]:
    """(a_source − a_base) · ∂m/∂a on the base run, per granularity (one forward, one backward)."""
    model, cfg = s.lm.model, s.lm.cfg
    names = sorted({f"blocks.{j}.{_ATTR_HOOKS[g]}" for g in granularities
                    for j in range(cfg.n_layers)})
    probes: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def probe(x: torch.Tensor, hook) -> torch.Tensor:
        e = torch.zeros_like(x, requires_grad=True)
        probes[hook.name] = e
        acts[hook.name] = x.detach()[0]
        return x + e

    tokens = torch.tensor([s.base_ids[:s.n]], dtype=torch.long, device=model.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(names, probe)])
        m = s.metric(logits[0, -1])
        grads = torch.autograd.grad(m, [probes[k] for k in names], allow_unused=True)
    grad = {k: (g[0] if g is not None else torch.zeros_like(acts[k]))
            for k, g in zip(names, grads)}
    src_cache = s.source.cache
    base_m = s.base_metric
    out: dict[str, np.ndarray] = {}
    L, H, T = cfg.n_layers, cfg.n_heads, s.n_tokens
    for g in granularities:
        rows = []
        for j in range(L):
            name = f"blocks.{j}.{_ATTR_HOOKS[g]}"
            delta = (src_cache[name] - acts[name]).double() * grad[name].double()
            if g in ("resid_pre", "attn_out", "mlp_out"):
                r = torch.zeros(T, dtype=torch.float64)
                r[:s.n] = delta.sum(-1)
            elif g == "head_out_by_pos":
                r = torch.zeros(T, H, dtype=torch.float64)
                r[:s.n] = delta.sum(-1)
            elif g == "head_pattern":
                r = delta.sum((-1, -2))
            else:
                r = delta.sum((0, 2))
            rows.append(r)
        out[g] = (torch.stack(rows) + base_m).numpy()
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def activation_patching(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *,
                        correct: Optional[TokenLike] = None,
                        wrong: Optional[TokenLike] = None, granularity: str = "resid_pre",
                        metric: str = "logit_diff", direction: str = "denoising",
                        position: int = -1, progress: Optional[ProgressFn] = None,
                        attribution: bool = True) -> PatchingGrid:
    """Patch every activation of one granularity and read the metric (exact), beside the
    attribution-patching estimate of the same grid (NaN when ``attribution`` is False)."""
    _check_choice(granularity, GRANULARITIES, "granularity")
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    return _grid(s, granularity, progress, attribution)


def _grid(s: _Setup, granularity: str, progress: Optional[ProgressFn],
          with_attribution: bool = True) -> PatchingGrid:
    values, computed = _exact_grid(s, granularity, progress)
    if with_attribution:
        attribution = _attribution(s, (granularity,))[granularity]
    else:
        attribution = np.full_like(values, np.nan)
    disp = s.lm.tokenizer.display
    return PatchingGrid(
        granularity=granularity, axes=GRID_AXES[granularity], direction=s.direction,
        metric=s.kind, values=values, attribution=attribution, base_metric=s.base_metric,
        clean_metric=s.clean_metric, corrupted_metric=s.corrupted_metric,
        correlation=_correlation(values - s.base_metric, attribution - s.base_metric),
        position=s.position, correct_id=s.metric.correct, wrong_id=s.metric.wrong,
        clean_display=tuple(disp(i) for i in s.clean_ids),
        corrupted_display=tuple(disp(i) for i in s.corrupted_ids),
        n_runs=int(values.size), n_computed=computed)


def patching_over_pairs(lm: LoadedModel, pairs: list[PromptPair], *,
                        granularity: str = "head_out", metric: str = "logit_diff",
                        direction: str = "denoising", position: int = -1,
                        progress: Optional[ProgressFn] = None) -> PairSetPatching:
    """One granularity's grid on every pair of a set, kept per pair and averaged."""
    _check_choice(granularity, GRANULARITIES, "granularity")
    if not pairs:
        raise AnalysisError("the set of pairs holds no rows")
    if len(pairs) > MAX_PAIRS:
        raise AnalysisError(f"the set holds {len(pairs):,} pairs; at most {MAX_PAIRS} are "
                            f"analysed at once")
    grids = []
    for i, pair in enumerate(pairs, start=1):
        try:
            g = activation_patching(lm, pair.clean, pair.corrupted, correct=pair.correct,
                                    wrong=pair.wrong, granularity=granularity, metric=metric,
                                    direction=direction, position=position)
        except AnalysisError as exc:
            raise AnalysisError(f"pair {i}: {exc}") from None
        if grids and g.values.shape != grids[0].values.shape:
            raise AnalysisError(
                f"pair {i} has {len(g.clean_display)} tokens but pair 1 has "
                f"{len(grids[0].clean_display)}: a grid over positions needs pairs of one "
                f"length (head granularities over all positions accept any lengths)")
        grids.append(g)
        if progress:
            progress(i, len(pairs))
    per = np.stack([g.values for g in grids])
    per_attr = np.stack([g.attribution for g in grids])
    bases = np.array([g.base_metric for g in grids])
    shape = (-1,) + (1,) * (per.ndim - 1)
    return PairSetPatching(
        granularity=granularity, axes=GRID_AXES[granularity], per_pair=per,
        per_pair_attribution=per_attr, mean=per.mean(0), mean_attribution=per_attr.mean(0),
        base_metrics=bases, clean_metrics=np.array([g.clean_metric for g in grids]),
        corrupted_metrics=np.array([g.corrupted_metric for g in grids]),
        correlation=_correlation(per - bases.reshape(shape), per_attr - bases.reshape(shape)),
        grids=tuple(grids))


def strongest_cells(grid: PatchingGrid, n: int = 5) -> list[tuple[tuple[int, ...], float]]:
    """The ``n`` cells whose patch moves the metric most towards the source run, as
    (index, effect): largest effect for denoising, most negative for noising."""
    effect = grid.effect
    sign = 1.0 if grid.direction == "denoising" else -1.0
    if grid.metric == "kl":
        sign = -sign  # KL to the clean run falls as the clean run is restored
    order = np.argsort(-(sign * effect).ravel(), kind="stable")[:n]
    return [(tuple(int(i) for i in np.unravel_index(k, effect.shape)), float(effect.ravel()[k]))
            for k in order]

