"""Logit lens (nostalgebraist 2020): the residual stream read through the unembedding, per stage.

``logits_s = LN_final(x_s) W_U + b_U``, with the final LayerNorm recomputed on ``x_s``'s own
statistics (never the final layer's cached scale). Without LayerNorm it is ``x_s W_U + b_U``.
The last stage is the final residual stream, so its logits are the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_k
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


#: Logits computed at once: rows × d_vocab stays under this many numbers (64 MiB of float32),
#: so a 256-token prompt through a 50k-token vocabulary never holds every stage's logits.
CHUNK_ELEMENTS = 2 ** 24


def chunk_rows(d_vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows (stage, position pairs) per chunk for a vocabulary of ``d_vocab`` tokens."""
    return max(1, elements // max(1, d_vocab))


def logit_lens(lm: LoadedModel, fp: ForwardPass, *, k: int = 5,
               target: Optional[TokenLike] = None, granularity: Granularity = "sublayer",
               progress: Optional[Callable[[float], None]] = None,
               rows_per_chunk: Optional[int] = None) -> LogitLens:
    """Top-k tokens at every stage and position, plus the probability and rank of ``target``.

    Only what is shown is kept: the logits of every (stage, position) are computed in chunks
    of ``rows_per_chunk`` rows (default :func:`chunk_rows`), each reduced to its top-k, its
    normaliser, its entropy and the probability and rank of the actual next token and of the
    target before the next chunk. ``progress(fraction)`` is called after each chunk (it may
    raise to stop the computation).
    """
    k = check_k(lm, k)
    tid = None if target is None else token_id(lm, target)
    stages = lens_stages(lm, granularity)
    s, p = len(stages), fp.n_tokens
    n = s * p
    rows = rows_per_chunk or chunk_rows(lm.cfg.d_vocab)
    # the token that came next at each row's position (row = stage * p + position); the last
    # position has none, so it borrows token 0 and is blanked afterwards
    nxt = np.zeros(p, dtype=np.int64)
    nxt[:-1] = fp.token_ids[1:]
    next_of_row = torch.as_tensor(np.tile(nxt, s))
    top_ids = torch.empty((n, k), dtype=torch.long)
    top_probs, entropy = torch.empty((n, k)), torch.empty(n)
    next_probs, next_ranks = torch.empty(n), torch.empty(n, dtype=torch.long)
    t_probs, t_ranks, t_logits = torch.empty(n), torch.empty(n, dtype=torch.long), torch.empty(n)
    with torch.no_grad():
        resid = torch.cat([fp.cache[hook] for _, hook in stages])  # [s * p, d_model]
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            logits = _unembed(lm, _normalised(lm, resid[start:stop])).float().cpu()  # [r, v]
            top = torch.topk(logits, k, dim=-1)
            # log-sum-exp shifted by each row's maximum (the top-1 logit), which is also
            # what the entropy H = lse - sum_v p_v l_v needs
            peak = top.values[:, :1]
            shifted = (logits - peak).exp_()
            total = shifted.sum(-1)
            lse = peak[:, 0] + total.log()
            entropy[start:stop] = lse - torch.linalg.vecdot(shifted, logits) / total
            del shifted
            top_ids[start:stop] = top.indices
            top_probs[start:stop] = (top.values - lse[:, None]).exp()
            chosen = logits.gather(-1, next_of_row[start:stop, None])
            next_probs[start:stop] = (chosen[:, 0] - lse).exp()
            next_ranks[start:stop] = (logits > chosen).sum(-1, dtype=torch.int32) + 1
            if tid is not None:
                col = logits[:, tid:tid + 1]
                t_logits[start:stop] = col[:, 0]
                t_probs[start:stop] = (col[:, 0] - lse).exp()
                t_ranks[start:stop] = (logits > col).sum(-1, dtype=torch.int32) + 1
            del logits
            if progress is not None:
                progress(stop / n)
    next_probs_np = next_probs.double().numpy().reshape(s, p)
    next_ranks_np = next_ranks.numpy().astype(np.int64).reshape(s, p)
    next_probs_np[:, -1], next_ranks_np[:, -1] = np.nan, -1
    next_ids = nxt.copy()
    next_ids[-1] = -1
    top_ids_np = top_ids.numpy().astype(np.int64).reshape(s, p, k)

    def grid(t: torch.Tensor) -> np.ndarray:
        return t.double().numpy().reshape(s, p)

    return LogitLens(
        stage_labels=tuple(label for label, _ in stages),
        stage_hooks=tuple(hook for _, hook in stages),
        display=fp.display,
        top_ids=top_ids_np,
        top_display=display_array(lm, top_ids_np),
        top_probs=top_probs.double().numpy().reshape(s, p, k),
        entropy=grid(entropy),
        next_ids=next_ids,
        next_probs=next_probs_np,
        next_ranks=next_ranks_np,
        target_id=tid,
        target_display="" if tid is None else lm.tokenizer.display(tid),
        target_probs=None if tid is None else grid(t_probs),
        target_ranks=None if tid is None else t_ranks.numpy().astype(np.int64).reshape(s, p),
        target_logits=None if tid is None else grid(t_logits),
        note=PARALLEL_NOTE if any("(parallel)" in label for label, _ in stages) else "",
    )


def lens_key(lm: LoadedModel, *, k: int = 5, target: Optional[TokenLike] = None,
             granularity: Granularity = "sublayer") -> tuple:
    """The cache key of a logit lens of one forward pass (its arguments checked, the target
    resolved to its id), so every caller with the same view shares one result."""
    if granularity not in GRANULARITIES:
        raise AnalysisError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return ("logit_lens", check_k(lm, k), None if target is None else token_id(lm, target),
            granularity)
