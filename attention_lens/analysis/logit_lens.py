"""Logit lens (nostalgebraist 2020): the residual stream read through the unembedding, per stage.

``logits_s = LN_final(x_s) W_U + b_U``, with the final LayerNorm recomputed on ``x_s``'s own
statistics (never the final layer's cached scale). Without LayerNorm it is ``x_s W_U + b_U``.
The last stage is the final residual stream, so its logits are the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_k
from .errors import AnalysisError
from .forward import ForwardPass
from .predictions import TokenLike, display_array, entropy_nats, ranks_of, token_id

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
    model = lm.model
    with torch.no_grad():
        x = resid.to(model.device, model.W_U.dtype)
        if lm.cfg.normalization_type:
            x = model.ln_final(x)  # fresh mean and scale of x, not the cached final ones
        return model.unembed(x).float().cpu()


def logit_lens(lm: LoadedModel, fp: ForwardPass, *, k: int = 5,
               target: Optional[TokenLike] = None,
               granularity: Granularity = "sublayer") -> LogitLens:
    """Top-k tokens at every stage and position, plus the probability and rank of ``target``."""
    k = check_k(lm, k)
    tid = None if target is None else token_id(lm, target)
    stages = lens_stages(lm, granularity)
    p = fp.n_tokens
    has_next = p > 1
    nxt = torch.as_tensor(fp.token_ids[1:], dtype=torch.long)
    top_ids, top_probs, entropy, next_probs, next_ranks = [], [], [], [], []
    t_probs, t_ranks, t_logits = [], [], []
    for _, hook in stages:
        logits = stage_logits(lm, fp.cache[hook]).double()  # [p, v]
        log_probs = logits.log_softmax(-1)
        top = torch.topk(logits, k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(log_probs.gather(-1, top.indices).exp())
        entropy.append(entropy_nats(log_probs))
        np_row, nr_row = torch.full((p,), float("nan"), dtype=torch.float64), torch.full((p,), -1)
        if has_next:
            np_row[:-1] = log_probs[:-1].gather(-1, nxt[:, None]).squeeze(-1).exp()
            nr_row[:-1] = ranks_of(logits[:-1], nxt)
        next_probs.append(np_row)
        next_ranks.append(nr_row)
        if tid is not None:
            ids = torch.full((p,), tid, dtype=torch.long)
            t_probs.append(log_probs[:, tid].exp())
            t_ranks.append(ranks_of(logits, ids))
            t_logits.append(logits[:, tid])
    top_ids_np = torch.stack(top_ids).numpy().astype(np.int64)
    next_ids = np.full(p, -1, dtype=np.int64)
    next_ids[:-1] = fp.token_ids[1:]
    return LogitLens(
        stage_labels=tuple(label for label, _ in stages),
        stage_hooks=tuple(hook for _, hook in stages),
        display=fp.display,
        top_ids=top_ids_np,
        top_display=display_array(lm, top_ids_np),
        top_probs=torch.stack(top_probs).numpy(),
        entropy=torch.stack(entropy).numpy(),
        next_ids=next_ids,
        next_probs=torch.stack(next_probs).numpy(),
        next_ranks=torch.stack(next_ranks).numpy().astype(np.int64),
        target_id=tid,
        target_display="" if tid is None else lm.tokenizer.display(tid),
        target_probs=None if tid is None else torch.stack(t_probs).numpy(),
        target_ranks=None if tid is None else torch.stack(t_ranks).numpy().astype(np.int64),
        target_logits=None if tid is None else torch.stack(t_logits).numpy(),
        note=PARALLEL_NOTE if any("(parallel)" in label for label, _ in stages) else "",
    )
