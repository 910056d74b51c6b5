"""Next-token predictions: top-k at one position, and how well each actual token was predicted.

Also how a target token is read (an id, or a string that must be exactly one token); the
index checks are in :mod:`.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Union

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_k, check_position
from .declare import Int, Position, declare
from .errors import AnalysisError
from .forward import ForwardPass

#: A target token: its id, or a string that must be exactly one token.
TokenLike = Union[int, str]


# ----------------------------------------------------------------------- input checks
def token_id(lm: LoadedModel, target: TokenLike) -> int:
    """Id of a target token given as an id or as a string that is exactly one token."""
    if isinstance(target, bool):
        raise AnalysisError(f"target token must be a token id or text, got {target!r}")
    if isinstance(target, Integral):
        tid = int(target)
        if not 0 <= tid < lm.cfg.d_vocab:
            raise AnalysisError(f"token id {tid} is outside the vocabulary [0, {lm.cfg.d_vocab})")
        return tid
    if not isinstance(target, str):
        raise AnalysisError(f"target token must be a token id or text, got {target!r}")
    if target == "":
        raise AnalysisError("the target token is empty: type one token (e.g. ' the')")
    ids = lm.tokenizer.encode(target)
    if len(ids) != 1:
        pieces = ", ".join(repr(lm.tokenizer.token_text(i)) for i in ids)
        hint = ("" if target.startswith(" ") else
                f"; words inside a sentence usually start with a space, try {' ' + target!r}")
        raise AnalysisError(f"{target!r} is not a single token: it splits into {len(ids)} "
                            f"tokens [{pieces}]; choose one of them{hint}")
    return int(ids[0])


# -------------------------------------------------------------------------- results
@dataclass(frozen=True)
class NextToken:
    """The model's top-k next-token predictions at one position.

    Attributes:
        position: the (non-negative) position whose prediction this is.
        context: display string of the token at ``position`` (the last one read).
        token_ids: [k] predicted token ids, most likely first.
        tokens: [k] raw text of each predicted token.
        display: [k] display strings (whitespace shown as ·, ↵, →).
        probs: [k] softmax probabilities.
        logits: [k] raw logits.
        ranks: [k] 1-based ranks (1 = most likely).
        entropy: entropy of the full next-token distribution, in nats.
    """

    position: int
    context: str
    token_ids: np.ndarray
    tokens: tuple[str, ...]
    display: tuple[str, ...]
    probs: np.ndarray
    logits: np.ndarray
    ranks: np.ndarray
    entropy: float

    def __post_init__(self) -> None:  # noqa: D105
        k = len(self.token_ids)
        assert self.probs.shape == self.logits.shape == self.ranks.shape == (k,)
        assert len(self.tokens) == len(self.display) == k


@dataclass(frozen=True)
class TokenPredictions:
    """Per position: the top-k predictions and how the token that actually came next fared.

    Row ``i`` describes the prediction made after reading token ``i`` (of token ``i + 1``);
    the last row has no next token (its ``next_*`` entries are -1 / NaN).

    Attributes:
        token_ids: [pos] prompt token ids.
        tokens: [pos] raw token texts.
        display: [pos] display strings.
        top_ids: [pos, k] top-k predicted ids at each position, most likely first.
        top_display: [pos, k] display strings of ``top_ids``.
        top_probs: [pos, k] their probabilities.
        top_logits: [pos, k] their logits.
        next_ids: [pos] id of the token that actually came next (-1 at the last position).
        next_probs: [pos] its probability (NaN at the last position).
        next_ranks: [pos] its 1-based rank among all tokens (-1 at the last position).
        surprisal_nats: [pos] -ln p(next token) (NaN at the last position); surprisal and
            loss are in nats everywhere in the app.
        entropy: [pos] entropy of each next-token distribution, in nats.
        loss: mean next-token loss of the prompt in nats (NaN for a one-token prompt).
    """

    token_ids: np.ndarray
    tokens: tuple[str, ...]
    display: tuple[str, ...]
    top_ids: np.ndarray
    top_display: np.ndarray
    top_probs: np.ndarray
    top_logits: np.ndarray
    next_ids: np.ndarray
    next_probs: np.ndarray
    next_ranks: np.ndarray
    surprisal_nats: np.ndarray
    entropy: np.ndarray
    loss: float

    def __post_init__(self) -> None:  # noqa: D105
        p = len(self.token_ids)
        assert self.top_ids.shape[0] == p and self.top_probs.shape == self.top_ids.shape
        assert self.top_display.shape == self.top_ids.shape == self.top_logits.shape
        for arr in (self.next_ids, self.next_probs, self.next_ranks, self.surprisal_nats,
                    self.entropy):
            assert arr.shape == (p,)

    @property
    def k(self) -> int:
        """Number of alternatives kept per position."""
        return int(self.top_ids.shape[1])


# ------------------------------------------------------------------------- helpers
def entropy_nats(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions given as log-probabilities along the last axis."""
    terms = log_probs.exp() * log_probs  # 0 · (-inf) = nan for a masked logit: count it as 0
    return -terms.nan_to_num_(0.0).sum(-1)


def ranks_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``ids`` [...] in ``logits`` [..., v] (ties count in the token's favour)."""
    chosen = logits.gather(-1, ids.unsqueeze(-1))
    return (logits > chosen).sum(-1) + 1


def display_array(lm: LoadedModel, ids: np.ndarray) -> np.ndarray:
    """Display strings of an id array, same shape."""
    flat = [lm.tokenizer.display(int(i)) for i in ids.reshape(-1)]
    return np.array(flat, dtype=object).reshape(ids.shape)


# ------------------------------------------------------------------------ analyses
def next_token(lm: LoadedModel, fp: ForwardPass, *, k: int = 10, position: int = -1) -> NextToken:
    """Top-k next-token predictions after reading the token at ``position``."""
    k = check_k(lm, k)
    pos = check_position(fp, position)
    logits = fp.logits[pos].double()
    log_probs = logits.log_softmax(-1)
    top = torch.topk(logits, k)
    ids = top.indices.numpy().astype(np.int64)
    return NextToken(
        position=pos,
        context=fp.display[pos],
        token_ids=ids,
        tokens=tuple(lm.tokenizer.token_text(int(i)) for i in ids),
        display=tuple(lm.tokenizer.display(int(i)) for i in ids),
        probs=log_probs[top.indices].exp().numpy(),
        logits=top.values.numpy(),
        ranks=((logits[None, :] > top.values[:, None]).sum(-1) + 1).numpy().astype(np.int64),
        entropy=float(entropy_nats(log_probs)),
    )


def token_predictions(lm: LoadedModel, fp: ForwardPass, *, k: int = 5) -> TokenPredictions:
    """Top-k alternatives at every position and the probability, rank and surprisal of each actual next token."""  # noqa: E501
    k = check_k(lm, k)
    logits = fp.logits.double()  # [p, v]
    log_probs = logits.log_softmax(-1)
    p = fp.n_tokens
    top = torch.topk(logits, k, dim=-1)
    top_ids = top.indices.numpy().astype(np.int64)

    next_ids = np.full(p, -1, dtype=np.int64)
    next_probs = np.full(p, np.nan)
    next_ranks = np.full(p, -1, dtype=np.int64)
    surprisal = np.full(p, np.nan)
    if p > 1:
        nxt = torch.as_tensor(fp.token_ids[1:], dtype=torch.long)
        lp = log_probs[:-1].gather(-1, nxt[:, None]).squeeze(-1)
        next_ids[:-1] = fp.token_ids[1:]
        next_probs[:-1] = lp.exp().numpy()
        next_ranks[:-1] = ranks_of(logits[:-1], nxt).numpy()
        surprisal[:-1] = (-lp).numpy()
    return TokenPredictions(
        token_ids=np.asarray(fp.token_ids, dtype=np.int64),
        tokens=fp.tokens,
        display=fp.display,
        top_ids=top_ids,
        top_display=display_array(lm, top_ids),
        top_probs=log_probs.gather(-1, top.indices).exp().numpy(),
        top_logits=top.values.numpy(),
        next_ids=next_ids,
        next_probs=next_probs,
        next_ranks=next_ranks,
        surprisal_nats=surprisal,
        entropy=entropy_nats(log_probs).numpy(),
        loss=float(np.nanmean(surprisal)) if p > 1 else float("nan"),
    )


def _next_token_json(res: NextToken) -> dict:
    preds = [{"token": t, "id": int(i), "display": d, "probability": p, "logit": lg,
              "rank": int(r)}
             for t, i, d, p, lg, r in zip(res.tokens, res.token_ids, res.display, res.probs,
                                          res.logits, res.ranks)]
    return {"position": res.position, "predictions": preds, "entropy": res.entropy}


NEXT_TOKEN = declare(
    "next-token", next_token, paths=("predict",),
    params=[Int("top_k", 10, 1, lambda cfg: min(100, cfg.d_vocab), url="k", arg="k",
                label="top k"),
            Position("position", url="pos", label="position", placeholder="-1 = last")],
    to_json=_next_token_json)


#: Most alternatives per position of the per-position predictions (a [pos, k] grid).
MAX_GRID_K = 50

TOKEN_PREDICTIONS = declare(
    "token-predictions", token_predictions,
    params=[Int("top_k", 5, 1, lambda cfg: min(MAX_GRID_K, cfg.d_vocab), url="k", arg="k",
                label="alternatives")],
    to_json=lambda res: {"result": res}, label="token predictions")
