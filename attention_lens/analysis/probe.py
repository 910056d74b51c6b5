"""The repeated-random-token probe for induction heads (Olsson et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..model.transformer import HookedTransformer


def ordinary_token_ids(strings: Sequence[str], special: Sequence[int] = ()) -> np.ndarray:
    """Ids of "ordinary" tokens: not special, valid text, not pure whitespace or control."""
    skip = set(special)
    keep = [
        i for i, s in enumerate(strings)
        if i not in skip and s and "\ufffd" not in s and s.strip() and s.isprintable()
        and not (s.startswith("<|") and s.endswith("|>"))
    ]
    return np.asarray(keep, dtype=np.int64)


def repeated_random_tokens(vocab_ids: np.ndarray, seq_len: int = 50, batch: int = 10,
                           seed: int = 0) -> np.ndarray:
    """Draw r [batch, seq_len] uniformly from ``vocab_ids`` (seeded) and return [r ; r]."""
    if seq_len < 2 or batch < 1:
        raise ValueError("probe needs seq_len >= 2 and batch >= 1")
    rng = np.random.default_rng(seed)
    r = rng.choice(vocab_ids, size=(batch, seq_len), replace=True)
    return np.concatenate([r, r], axis=1)


@dataclass(frozen=True)
class ProbeScores:
    """Head scores on the repeated-random-token probe.

    Attributes:
        induction: [n_layers, n_heads] mean of A[i, i-(T-1)] over the second half.
        previous_token: [n_layers, n_heads] mean of A[i, i-1] over all positions i >= 1.
        tokens: [batch, 2T] the probe sequences.
        loss_first_half: mean next-token loss on the first (unpredictable) half.
        loss_second_half: mean next-token loss on the second (copyable) half.
        seq_len: T, the length of the random segment.
        bos: the BOS token id prepended to every row (None when none was).
    """

    induction: np.ndarray
    previous_token: np.ndarray
    tokens: np.ndarray
    loss_first_half: float
    loss_second_half: float
    seq_len: int = 0
    bos: Optional[int] = None


def probe_scores(model: HookedTransformer, vocab_ids: np.ndarray, seq_len: int = 50,
                 batch: int = 10, seed: int = 0,
                 tokens: Optional[np.ndarray] = None, bos: Optional[int] = None) -> ProbeScores:
    """Induction and previous-token scores of every head on the repeated-random-token probe.

    With ``bos``, every row is ``[BOS ; r ; r]`` (models trained with BOS on every sequence);
    the scores then skip the BOS row, so they compare with the scores without it.
    """
    if tokens is None:
        tokens = repeated_random_tokens(vocab_ids, seq_len, batch, seed)
    b = 0 if bos is None else 1
    if bos is not None:
        tokens = np.concatenate([np.full((tokens.shape[0], 1), bos, dtype=tokens.dtype),
                                 tokens], axis=1)
    t = torch.as_tensor(tokens, dtype=torch.long, device=model.device)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    was_training = model.training
    model.eval()
    logits, cache = model.run_with_cache(t, names_filter=names)
    if was_training:
        model.train()
    T = seq_len
    induction = np.zeros((model.cfg.n_layers, model.cfg.n_heads))
    prev = np.zeros_like(induction)
    for layer, name in enumerate(names):
        pattern = cache[name].float()  # [b, h, q, k]
        # second half queries i in [T, 2T) (+1 after BOS); the matching earlier token sits
        # at i - (T - 1); diagonal entry j is row j + T - 1
        ind = pattern.diagonal(offset=1 - T, dim1=-2, dim2=-1)[..., 1 + b:]
        induction[layer] = ind.mean(dim=(0, 2)).cpu().numpy()
        prev[layer] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)[..., b:].mean(
            dim=(0, 2)).cpu().numpy()
    lp = logits.float().log_softmax(-1)[:, :-1]
    nll = -lp.gather(-1, t[:, 1:, None]).squeeze(-1)
    return ProbeScores(
        induction=induction, previous_token=prev, tokens=np.asarray(tokens),
        loss_first_half=float(nll[:, b: b + T - 1].mean()),
        loss_second_half=float(nll[:, T + b:].mean()),
        seq_len=T, bos=bos,
    )
