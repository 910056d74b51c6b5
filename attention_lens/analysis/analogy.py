"""Vector arithmetic on embeddings: 3CosAdd and 3CosMul (Levy & Goldberg 2014).

Rows of W_E (or W_U^T) are unit-normalised. 3CosAdd ranks tokens x by
cos(x, Σ positive − Σ negative); 3CosMul by Π cos'(x, p) / (Π cos'(x, n) + ε) with
cos' = (cos + 1) / 2. Every input token is excluded from the answers, as are special
and non-printable tokens. A word that is several tokens is represented by the
renormalised mean of its tokens' unit rows, and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union, get_args

import numpy as np

from ..model.checkpoint import LoadedModel
from .declare import Choice, Int, Words, declare, forward_gflop
from .embeddings import (
    MATRICES,
    _check_k,
    _ordinary,
    embedding_matrix,
    resolve_term,
    term_vector,
    unit_rows,
)
from .errors import AnalysisError

Method = Literal["3cosadd", "3cosmul"]
METHODS: tuple[str, ...] = get_args(Method)
#: ε of 3CosMul (Levy & Goldberg use 0.001).
COSMUL_EPS = 1e-3
#: At most this many words on each side of the equation.
MAX_TERMS = 10


@dataclass(frozen=True)
class Analogy:
    """Tokens nearest to ``Σ positive − Σ negative``, every input token excluded.

    Attributes:
        method: "3cosadd" or "3cosmul".
        matrix: "W_E" or "W_U".
        positive: the positive words as typed.
        negative: the negative words as typed.
        term_tokens: [n_terms][m] display strings of each term's tokens (positive terms
            first, then negative).
        term_token_ids: [n_terms][m] their ids.
        multi_token: [n_terms] True where a word is several tokens (mean embedding used).
        notes: human-readable sentences about multi-token words (empty when none).
        excluded_ids: every input token id, never returned as an answer.
        token_ids: [k] the answers, best first.
        display: [k] their display strings.
        scores: [k] the ranking score of the method (cosine for 3CosAdd).
        cosine: [k] cosine similarity of each answer to the 3CosAdd target.
    """

    method: str
    matrix: str
    positive: list[str]
    negative: list[str]
    term_tokens: list[list[str]]
    term_token_ids: list[list[int]]
    multi_token: list[bool]
    notes: list[str]
    excluded_ids: list[int]
    token_ids: np.ndarray
    display: list[str]
    scores: np.ndarray
    cosine: np.ndarray


def _terms(words: Union[str, Sequence[str]], side: str) -> list[str]:
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, (list, tuple)):
        raise AnalysisError(f"{side} words must be a list of words")
    if len(words) > MAX_TERMS:
        raise AnalysisError(f"at most {MAX_TERMS} {side} words")
    return list(words)


def analogy(lm: LoadedModel, positive: Union[str, Sequence[str]],
            negative: Union[str, Sequence[str]] = (), top_k: int = 5,
            method: str = "3cosadd", matrix: str = "W_E") -> Analogy:
    """Solve ``a − b + c = ?`` style equations over unit-normalised embeddings."""
    if method not in METHODS:
        raise AnalysisError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_k(lm, top_k)
    pos, neg = _terms(positive, "positive"), _terms(negative, "negative")
    if not pos:
        raise AnalysisError("give at least one positive word")
    terms = [resolve_term(lm, w) for w in pos + neg]
    unit = unit_rows(embedding_matrix(lm, matrix).astype(np.float64))
    vecs = [term_vector(unit, t) for t in terms]
    p_vecs, n_vecs = vecs[: len(pos)], vecs[len(pos):]
    target = np.sum(p_vecs, 0) - (np.sum(n_vecs, 0) if n_vecs else 0.0)
    cosine = unit @ unit_rows(target)
    if method == "3cosadd":
        scores = cosine.copy()
    else:
        num = np.prod([(unit @ v + 1) / 2 for v in p_vecs], axis=0)
        den = np.prod([(unit @ v + 1) / 2 for v in n_vecs], axis=0) if n_vecs else 1.0
        scores = num / (den + COSMUL_EPS)
    excluded = sorted({i for t in terms for i in t.token_ids})
    allowed = np.zeros(scores.shape, dtype=bool)
    allowed[_ordinary(lm)] = True
    allowed[excluded] = False
    scores = np.where(allowed, scores, -np.inf)
    k = min(top_k, int(allowed.sum()))
    top = np.argsort(-scores, kind="stable")[:k]
    notes = [f"{t.text!r} is {len(t.token_ids)} tokens ({' '.join(t.display)}): the mean of "
             "their embeddings was used" for t in terms if t.multi_token]
    return Analogy(
        method=method, matrix=matrix, positive=[str(w) for w in pos],
        negative=[str(w) for w in neg], term_tokens=[list(t.display) for t in terms],
        term_token_ids=[list(t.token_ids) for t in terms],
        multi_token=[t.multi_token for t in terms], notes=notes, excluded_ids=excluded,
        token_ids=top.astype(np.int64), display=[lm.tokenizer.display(int(i)) for i in top],
        scores=scores[top], cosine=cosine[top],
    )


# ------------------------------------------------------------ declared (POST /api/...)
def analogy_view(lm: LoadedModel, *, positive: Sequence[str], negative: Sequence[str] = (),
                 top_k: int = 5, method: str = "3cosadd", matrix: str = "W_E") -> dict:
    """What ``POST /api/analogy`` answers: the answers (id, display, token text, score,
    cosine), the input token ids left out, and the whole :class:`Analogy`."""
    res = analogy(lm, list(positive), list(negative or ()), top_k=top_k, method=method,
                  matrix=matrix)
    results = [{"id": int(i), "display": d, "token": lm.tokenizer.token_text(int(i)),
                "score": sc, "cosine": co}
               for i, d, sc, co in zip(res.token_ids, res.display, res.scores, res.cosine)]
    return {"results": results, "input_ids": res.excluded_ids, "result": res}


def analogy_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """The work in forward passes of ``n_tokens`` tokens: one product of the unit rows with
    the target and with each term (a few matrix-vector products over the vocabulary)."""
    n_terms = len(values.get("positive") or ()) + len(values.get("negative") or ())
    flop = 2 * (n_terms + 2) * cfg.d_vocab * cfg.d_model
    return flop / 1e9 / forward_gflop(cfg, n_tokens)


ANALOGY = declare(
    "analogy", analogy_view, scope="weights",
    params=[Words("positive", required=True, most=MAX_TERMS),
            Words("negative", most=MAX_TERMS),
            Int("top_k", 5, 1, lambda cfg: min(1000, cfg.d_vocab)),
            Choice("method", "3cosadd", METHODS), Choice("matrix", "W_E", MATRICES)],
    cost=analogy_cost, to_json=lambda view: view, label="analogy")
