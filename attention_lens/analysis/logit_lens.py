"""Logit lens (nostalgebraist 2020): the residual stream read through the unembedding, per stage.

``logits_s = LN_final(x_s) W_U + b_U``, with the final LayerNorm recomputed on ``x_s``'s own
statistics (never the final layer's cached scale). Without LayerNorm it is ``x_s W_U + b_U``.
The last stage is the final residual stream, so its logits are the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_k
from .declare import Choice, Int, Positions, Token, declare, forward_gflop
from .errors import AnalysisError
from .forward import ForwardPass
from .predictions import TokenLike, display_array, token_id

Granularity = Literal["sublayer", "layer"]
GRANULARITIES: tuple[str, ...] = ("sublayer", "layer")
PARALLEL_NOTE = ("Parallel attention and MLP (GPT-NeoX style): each block's MLP reads the "
                 "stream before attention, so an 'after attn (parallel)' stage (resid_pre + "
                 "attention output) is not an input of the MLP; the block's output adds both "
                 "to resid_pre.")


@dataclass(frozen=True)
class LogitLens:
    """Top-k predictions at every stage and position, and a target token's trajectory.

    Attributes:
        stage_labels: [S] readable stage names ("embeddings", "after L0 attn", ...).
        stage_hooks: [S] the hook point read at each stage (``blocks.0.hook_resid_pre``, ...).
        display: [pos] display strings of the prompt tokens.
        top_ids: [S, pos, k] most likely token ids at each stage and position.
        top_display: [S, pos, k] their display strings.
        top_probs: [S, pos, k] their probabilities.
        entropy: [S, pos] entropy of each stage's next-token distribution (nats).
        next_ids: [pos] the token that actually came next (-1 at the last position).
        next_probs: [S, pos] probability of that token at each stage (NaN at the last position).
        next_ranks: [S, pos] its 1-based rank (-1 at the last position).
        target_id: the chosen target token id, or None.
        target_display: its display string ("" when there is no target).
        target_probs: [S, pos] probability of the target at each stage (None without a target).
        target_ranks: [S, pos] its 1-based rank (None without a target).
        target_logits: [S, pos] its logit (None without a target).
        note: how to read the stages for this architecture ("" when nothing to add).
        positions: the positions computed when only some were (the others are empty:
            NaN, −1, ""); None when every position was.
    """

    stage_labels: tuple[str, ...]
    stage_hooks: tuple[str, ...]
    display: tuple[str, ...]
    top_ids: np.ndarray
    top_display: np.ndarray
    top_probs: np.ndarray
    entropy: np.ndarray
    next_ids: np.ndarray
    next_probs: np.ndarray
    next_ranks: np.ndarray
    target_id: Optional[int] = None
    target_display: str = ""
    target_probs: Optional[np.ndarray] = None
    target_ranks: Optional[np.ndarray] = None
    target_logits: Optional[np.ndarray] = None
    note: str = ""
    positions: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:  # noqa: D105
        s, p = len(self.stage_labels), len(self.display)
        assert self.top_ids.shape[:2] == (s, p) and self.top_probs.shape == self.top_ids.shape
        assert self.entropy.shape == self.next_probs.shape == self.next_ranks.shape == (s, p)
        if self.target_id is not None:
            assert self.target_probs.shape == self.target_ranks.shape == (s, p)

    @property
    def n_stages(self) -> int:
        """Number of stages S."""
        return len(self.stage_labels)


def lens_stages(lm: LoadedModel, granularity: Granularity = "sublayer") -> list[tuple[str, str]]:
    """``(label, hook name)`` of every stage, embeddings first, final residual stream last."""
    if granularity not in GRANULARITIES:
        raise AnalysisError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n = lm.cfg.n_layers
    stages = [("embeddings", "blocks.0.hook_resid_pre")]
    for layer in range(n):
        if granularity == "layer":
            stages.append((f"after L{layer}", f"blocks.{layer}.hook_resid_post"))
            continue
        # parallel blocks (GPT-NeoX): the MLP reads resid_pre, so resid_mid is a stage the
        # model never computes with; it is still resid_pre + attention output
        parallel = lm.cfg.parallel_attn_mlp and not lm.cfg.attn_only
        stages.append((f"after L{layer} attn" + (" (parallel)" if parallel else ""),
                       f"blocks.{layer}.hook_resid_mid"))
        if not lm.cfg.attn_only:
            stages.append((f"after L{layer} MLP", f"blocks.{layer}.hook_resid_post"))
    label, hook = stages[-1]
    stages[-1] = (f"{label} (final)", hook)
    return stages


def stage_logits(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``LN_final(resid) W_U + b_U`` with LayerNorm recomputed on ``resid`` itself."""
    with torch.no_grad():
        return _unembed(lm, _normalised(lm, resid)).float().cpu()


def _normalised(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """``LN_final(resid)`` with fresh statistics of each row (``resid`` itself without LN)."""
    model = lm.model
    x = resid.to(model.device, model.W_U.dtype)
    return model.ln_final(x) if lm.cfg.normalization_type else x


def _unembed(lm: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """``x W_U + b_U`` in one fused product."""
    model = lm.model
    return torch.addmm(model.b_U, x, model.W_U)


#: Logits computed at once: rows × d_vocab stays under this many numbers (32 MiB of float32),
#: so a 256-token prompt through a 50k-token vocabulary never holds every stage's logits.
CHUNK_ELEMENTS = 2 ** 23


def chunk_rows(d_vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows (stage, position pairs) per chunk for a vocabulary of ``d_vocab`` tokens."""
    return max(1, elements // max(1, d_vocab))


def logit_lens(lm: LoadedModel, fp: ForwardPass, *, k: int = 5,
               target: Optional[TokenLike] = None, granularity: Granularity = "sublayer",
               progress: Optional[Callable[[float], None]] = None,
               rows_per_chunk: Optional[int] = None,
               positions: Optional[Sequence[int]] = None) -> LogitLens:
    """Top-k tokens at every stage and position, plus the probability and rank of ``target``.

    Only what is shown is kept: the logits of every (stage, position) are computed in chunks
    of ``rows_per_chunk`` rows (default :func:`chunk_rows`) into two reused buffers, each
    chunk reduced to its top-k, its normaliser, its entropy and the probability and rank of
    the actual next token and of the target before the next chunk. ``progress(fraction)`` is
    called after each chunk (it may raise to stop the computation).

    ``positions``: compute only these positions (the columns a view shows first); the others
    are left empty (NaN probabilities, rank and id −1, display "") and listed as not
    computed in :attr:`LogitLens.positions`.
    """
    k = check_k(lm, k)
    tid = None if target is None else token_id(lm, target)
    stages = lens_stages(lm, granularity)
    s, p = len(stages), fp.n_tokens
    cols = checked_positions(positions, p)
    v = lm.cfg.d_vocab
    # rows = (stage, position) pairs in stage-major order, only the chosen positions
    rows_pos = np.tile(cols, s)
    rows_flat = (np.repeat(np.arange(s), len(cols)) * p + rows_pos).astype(np.int64)
    n = len(rows_flat)
    per = max(1, min(n, rows_per_chunk or chunk_rows(v)))
    # the token that came next at each row's position; the last position has none, so it
    # borrows token 0 and is blanked afterwards
    nxt = np.zeros(p, dtype=np.int64)
    nxt[:-1] = fp.token_ids[1:]
    top_ids = np.full((s * p, k), -1, dtype=np.int64)
    top_probs = np.full((s * p, k), np.nan)
    entropy, next_probs = np.full(s * p, np.nan), np.full(s * p, np.nan)
    next_ranks = np.full(s * p, -1, dtype=np.int64)
    t_probs, t_logits = np.full(s * p, np.nan), np.full(s * p, np.nan)
    t_ranks = np.full(s * p, -1, dtype=np.int64)
    model = lm.model
    with torch.no_grad():
        # every chosen row normalised at once ([n, d_model]: small beside one chunk of logits)
        resid = torch.cat([fp.cache[hook] for _, hook in stages])  # [s * p, d_model]
        normed = _normalised(lm, resid[torch.as_tensor(rows_flat)])
        del resid
        logit_buf = torch.empty((per, v), dtype=torch.float32)
        exp_buf = torch.empty((per, v), dtype=torch.float32)
        for start in range(0, n, per):
            idx = rows_flat[start:start + per]
            r = len(idx)
            x = normed[start:start + r]
            logits = logit_buf[:r]
            if x.device.type == "cpu" and model.W_U.dtype == torch.float32:
                torch.addmm(model.b_U, x, model.W_U, out=logits)
            else:
                logits.copy_(_unembed(lm, x).float().cpu())
            top = torch.topk(logits, k, dim=-1)
            ln = logits.numpy()
            # ranks: how many logits beat the chosen token's (numpy's comparison and count
            # are several times faster than torch's on CPU)
            chosen = ln[np.arange(r), nxt[rows_pos[start:start + r]]]
            next_ranks[idx] = (ln > chosen[:, None]).sum(-1) + 1
            # log-sum-exp shifted by each row's maximum (the top-1 logit); the entropy is
            # H = lse - sum_v p_v l_v
            peak = top.values[:, :1]
            shifted = torch.sub(logits, peak, out=exp_buf[:r]).exp_().numpy()
            total = shifted.sum(-1, dtype=np.float64)
            lse = peak[:, 0].double().numpy() + np.log(total)
            entropy[idx] = lse - np.vecdot(shifted, ln).astype(np.float64) / total
            top_ids[idx] = top.indices.numpy()
            top_probs[idx] = np.exp(top.values.double().numpy() - lse[:, None])
            next_probs[idx] = np.exp(chosen.astype(np.float64) - lse)
            if tid is not None:
                col = ln[:, tid]
                t_logits[idx] = col
                t_probs[idx] = np.exp(col.astype(np.float64) - lse)
                t_ranks[idx] = (ln > col[:, None]).sum(-1) + 1
            if progress is not None:
                progress((start + r) / n)
        del logit_buf, exp_buf
    next_probs_np, next_ranks_np = next_probs.reshape(s, p), next_ranks.reshape(s, p)
    next_probs_np[:, -1], next_ranks_np[:, -1] = np.nan, -1
    next_ids = nxt.copy()
    next_ids[-1] = -1
    top_ids_np = top_ids.reshape(s, p, k)
    done = None if len(cols) == p else tuple(int(c) for c in cols)
    return LogitLens(
        stage_labels=tuple(label for label, _ in stages),
        stage_hooks=tuple(hook for _, hook in stages),
        display=fp.display,
        top_ids=top_ids_np,
        top_display=_display(lm, top_ids_np),
        top_probs=top_probs.reshape(s, p, k),
        entropy=entropy.reshape(s, p),
        next_ids=next_ids,
        next_probs=next_probs_np,
        next_ranks=next_ranks_np,
        target_id=tid,
        target_display="" if tid is None else lm.tokenizer.display(tid),
        target_probs=None if tid is None else t_probs.reshape(s, p),
        target_ranks=None if tid is None else t_ranks.reshape(s, p),
        target_logits=None if tid is None else t_logits.reshape(s, p),
        note=PARALLEL_NOTE if any("(parallel)" in label for label, _ in stages) else "",
        positions=done,
    )


def checked_positions(positions: Optional[Sequence[int]], p: int) -> np.ndarray:
    """The sorted distinct positions to compute (every position when None)."""
    if positions is None:
        return np.arange(p)
    cols = []
    for q in positions:
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not -p <= q < p:
            raise AnalysisError(f"positions must be whole numbers from {-p} to {p - 1} (the "
                                f"prompt has {p} tokens), got {q!r}")
        cols.append(int(q) % p)
    if not cols:
        raise AnalysisError("positions must name at least one position")
    return np.unique(np.asarray(cols, dtype=np.int64))


def _display(lm: LoadedModel, ids: np.ndarray) -> np.ndarray:
    """Display strings of an id array ("" where the id is −1: not computed)."""
    out = np.full(ids.shape, "", dtype=object)
    mask = ids >= 0
    if mask.any():
        out[mask] = display_array(lm, ids[mask])
    return out


#: Largest top-k a logit lens keeps per cell (the page's hover and the API alike).
MAX_K = 50


def stage_count(cfg: Any, granularity: str = "sublayer") -> int:
    """Number of stages of :func:`lens_stages` from the model's config alone."""
    return 1 + cfg.n_layers * (1 if granularity == "layer" or cfg.attn_only else 2)


def lens_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """The work of a logit lens in forward passes of the prompt: two multiply-adds per
    logit of every stage and computed position, against one pass's work."""
    cols = values.get("positions")
    cols = n_tokens if cols is None else len({int(q) % max(1, n_tokens) for q in cols})
    logits = stage_count(cfg, values.get("granularity", "sublayer")) * cols * cfg.d_vocab
    return 2e-9 * logits * cfg.d_model / forward_gflop(cfg, n_tokens)


LOGIT_LENS = declare(
    "logit-lens", logit_lens,
    params=[Int("top_k", 5, 1, lambda cfg: min(MAX_K, cfg.d_vocab), url="k", arg="k",
                label="top k (hover)"),
            Token("target", label="target token", placeholder="one token, e.g. the"),
            Choice("granularity", "sublayer", GRANULARITIES, url="stages", label="stages",
                   labels={"sublayer": "after attention and MLP", "layer": "per layer"}),
            Positions("positions")],
    cost=lens_cost)
