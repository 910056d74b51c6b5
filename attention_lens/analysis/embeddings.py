"""Embedding space: PCA of W_E (or W_U^T) rows, k-means clusters, nearest neighbours.

PCA is exact: scikit-learn's PCA with the full LAPACK SVD (centred; its default would pick
a randomized solver for inputs as large as 2,000 × 384) or numpy's full SVD of the raw rows
(uncentred); k-means runs on those same full-dimensional rows, never on the 2D projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union, get_args

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .errors import AnalysisError
from .probe import ordinary_token_ids

Matrix = Literal["W_E", "W_U"]
MATRICES: tuple[str, ...] = get_args(Matrix)
TokenFilter = Literal["all", "frequent", "whole_word"]
TOKEN_FILTERS: tuple[str, ...] = get_args(TokenFilter)
#: A term longer than this many tokens is refused (it is no word).
MAX_TERM_TOKENS = 8
#: Above this many rows k-means switches to scikit-learn's MiniBatchKMeans.
MINIBATCH_ABOVE = 10_000


def embedding_matrix(lm: LoadedModel, matrix: str = "W_E") -> np.ndarray:
    """Rows of ``W_E`` [d_vocab, d_model] or of ``W_U^T`` [d_vocab, d_model], float32."""
    if matrix not in MATRICES:
        raise AnalysisError(f"unknown matrix {matrix!r}; choose one of {', '.join(MATRICES)}")
    with torch.no_grad():
        w = lm.model.W_E if matrix == "W_E" else lm.model.W_U.T
        return w.detach().to("cpu", torch.float32).numpy()


def _strings(lm: LoadedModel) -> list[str]:
    s = lm.tokenizer.strings
    return s[: lm.cfg.d_vocab]


def _ordinary(lm: LoadedModel) -> np.ndarray:
    ids = ordinary_token_ids(_strings(lm))
    return ids[ids < lm.cfg.d_vocab]


def token_selection(lm: LoadedModel, token_filter: str = "frequent",
                    max_tokens: Optional[int] = 2000) -> np.ndarray:
    """Token ids kept by a filter, lowest ids first, at most ``max_tokens``.

    "all": every id; "frequent": ordinary tokens (printable, not special) with the lowest
    BPE ids (the byte alphabet and the earliest merges, i.e. the most frequent pieces);
    "whole_word": ordinary tokens that start with a space followed by letters only.
    """
    if token_filter not in TOKEN_FILTERS:
        raise AnalysisError(f"unknown token filter {token_filter!r}; choose one of "
                            f"{', '.join(TOKEN_FILTERS)}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise AnalysisError("max_tokens must be a positive integer")
    if token_filter == "all":
        ids = np.arange(lm.cfg.d_vocab)
    else:
        ids = _ordinary(lm)
        if token_filter == "whole_word":
            s = _strings(lm)
            ids = np.asarray([i for i in ids if len(s[i]) > 1 and s[i][0] == " "
                              and s[i][1:].isalpha()], dtype=np.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


@dataclass(frozen=True)
class EmbeddingPCA:
    """PCA coordinates and k-means clusters of token embeddings.

    Attributes:
        matrix: "W_E" or "W_U" (rows of W_U^T).
        token_filter: which tokens were kept ("all", "frequent", "whole_word").
        centred: whether rows were centred (scikit-learn PCA) or not (exact SVD of the raw rows).
        token_ids: [n] the tokens analysed.
        display: [n] their display strings.
        coords: [n, n_components] projection onto the principal components.
        explained_variance: [n_components] variance along each component.
        explained_variance_ratio: [n_components] fraction of the total variance.
        components: [n_components, d_model] the principal axes.
        mean: [d_model] the mean removed before projecting (zeros when not centred).
        cluster: [n] k-means cluster of each token (fit on the full d_model rows).
        centroids: [n_clusters, d_model] the k-means centres.
        cluster_sizes: [n_clusters] tokens per cluster.
        seed: random state of k-means.
    """

    matrix: str
    token_filter: str
    centred: bool
    token_ids: np.ndarray
    display: list[str]
    coords: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    cluster: np.ndarray
    centroids: np.ndarray
    cluster_sizes: np.ndarray
    seed: int


def embedding_pca(lm: LoadedModel, matrix: str = "W_E", token_filter: str = "frequent",
                  max_tokens: Optional[int] = 2000, n_components: int = 2,
                  n_clusters: int = 8, centre: bool = True, seed: int = 0) -> EmbeddingPCA:
    """PCA of the selected embedding rows with explained variance, and k-means clusters."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA

    w = embedding_matrix(lm, matrix)
    ids = token_selection(lm, token_filter, max_tokens)
    x = w[ids].astype(np.float64)
    n, d = x.shape
    if not isinstance(n_components, int) or not 1 <= n_components <= min(n, d, 10):
        raise AnalysisError(f"n_components must be between 1 and {min(n, d, 10)}")
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= min(n, 50):
        raise AnalysisError(f"n_clusters must be between 1 and {min(n, 50)}")
    if centre:
        pca = PCA(n_components=n_components, svd_solver="full").fit(x)
        mean, components = pca.mean_, pca.components_
        variance, ratio = pca.explained_variance_, pca.explained_variance_ratio_
    else:
        mean = np.zeros(d)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        components = vt[:n_components]
        # one sign per direction, as scikit-learn fixes it: the largest loading positive
        signs = np.sign(components[np.arange(n_components),
                                   np.abs(components).argmax(1)])
        components = components * signs[:, None]
    coords = (x - mean) @ components.T
    if not centre:  # the share of the raw energy Σ x² along each direction
        variance = coords.var(0)
        ratio = (coords ** 2).sum(0) / (x ** 2).sum()
    km_cls = MiniBatchKMeans if n > MINIBATCH_ABOVE else KMeans
    km = km_cls(n_clusters=n_clusters, random_state=seed, n_init=2).fit(x.astype(np.float32))
    labels = km.labels_.astype(np.int64)
    return EmbeddingPCA(
        matrix=matrix, token_filter=token_filter, centred=bool(centre), token_ids=ids,
        display=[lm.tokenizer.display(int(i)) for i in ids], coords=coords,
        explained_variance=np.asarray(variance, dtype=np.float64),
        explained_variance_ratio=np.asarray(ratio, dtype=np.float64),
        components=np.asarray(components), mean=np.asarray(mean),
        cluster=labels, centroids=np.asarray(km.cluster_centers_, dtype=np.float64),
        cluster_sizes=np.bincount(labels, minlength=n_clusters), seed=seed,
    )


@dataclass(frozen=True)
class TokenProjection:
    """Some tokens (e.g. the prompt's) placed in an existing PCA and cluster map.

    Attributes:
        token_ids: [n] the tokens.
        display: [n] display strings.
        coords: [n, n_components] their coordinates in the PCA.
        cluster: [n] nearest k-means centre.
    """

    token_ids: np.ndarray
    display: list[str]
    coords: np.ndarray
    cluster: np.ndarray


def project_tokens(lm: LoadedModel, pca: EmbeddingPCA, token_ids: Sequence[int]) -> TokenProjection:
    """Project tokens (the prompt's, say) into ``pca`` with their nearest cluster."""
    ids = np.asarray(list(token_ids), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= lm.cfg.d_vocab):
        raise AnalysisError(f"token ids must lie in [0, {lm.cfg.d_vocab})")
    x = embedding_matrix(lm, pca.matrix)[ids].astype(np.float64)
    coords = (x - pca.mean) @ pca.components.T if ids.size else \
        np.zeros((0, pca.components.shape[0]))
    d2 = ((x[:, None, :] - pca.centroids[None]) ** 2).sum(-1)
    return TokenProjection(token_ids=ids, display=[lm.tokenizer.display(int(i)) for i in ids],
                           coords=coords, cluster=d2.argmin(-1) if ids.size else ids.copy())


# ---------------------------------------------------------------- terms and cosines
@dataclass(frozen=True)
class Term:
    """A word as the model sees it: one token, or several whose mean embedding is used."""

    text: str
    token_ids: tuple[int, ...]
    display: tuple[str, ...]

    @property
    def multi_token(self) -> bool:
        """True when the word is several tokens (its mean embedding is used)."""
        return len(self.token_ids) > 1


def resolve_term(lm: LoadedModel, term: Union[str, int]) -> Term:
    """Tokens of a word: preferably one token with a leading space (how BPE stores words).

    An int is a token id. A string is tried as ``" " + word`` then as written; if neither
    is a single token, all tokens of ``" " + word`` are used (their mean, reported).
    """
    if isinstance(term, (int, np.integer)) and not isinstance(term, bool):
        if not 0 <= term < lm.cfg.d_vocab:
            raise AnalysisError(f"token id {term} is outside the vocabulary [0, {lm.cfg.d_vocab})")
        return Term(lm.tokenizer.token_text(int(term)), (int(term),),
                    (lm.tokenizer.display(int(term)),))
    if not isinstance(term, str):
        raise AnalysisError(f"a term must be text, got {type(term).__name__}")
    if not term.strip() or "\x00" in term:
        raise AnalysisError("empty term: every word in the equation needs some text")
    stripped = term.strip()
    candidates = [" " + stripped, stripped] if not term.startswith(" ") else [term, stripped]
    encoded = [lm.tokenizer.encode(c) for c in candidates]
    ids = next((e for e in encoded if len(e) == 1), encoded[0])
    if not ids:
        raise AnalysisError(f"{term!r} produced no tokens")
    if len(ids) > MAX_TERM_TOKENS:
        raise AnalysisError(f"{term!r} is {len(ids)} tokens long; use a word of at most "
                            f"{MAX_TERM_TOKENS} tokens")
    if any(i >= lm.cfg.d_vocab for i in ids):
        raise AnalysisError(f"{term!r} uses tokens outside the model's vocabulary")
    return Term(term, tuple(int(i) for i in ids), tuple(lm.tokenizer.display(i) for i in ids))


def unit_rows(w: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(w, axis=-1, keepdims=True)
    return np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)


def term_vector(unit: np.ndarray, term: Term) -> np.ndarray:
    """Unit vector of a term: its token's unit row, or the renormalised mean of several."""
    return unit_rows(unit[list(term.token_ids)].mean(0))


@dataclass(frozen=True)
class Neighbours:
    """Nearest tokens to a word by cosine similarity of embedding rows.

    Attributes:
        query: the word as typed.
        query_ids: [m] its token ids (m > 1: the mean of their unit rows was used).
        query_display: [m] their display strings.
        multi_token: True when the word is several tokens.
        matrix: "W_E" or "W_U".
        token_ids: [k] nearest tokens (the query's own tokens excluded).
        display: [k] their display strings.
        cosine: [k] cosine similarity to the query, descending.
    """

    query: str
    query_ids: list[int]
    query_display: list[str]
    multi_token: bool
    matrix: str
    token_ids: np.ndarray
    display: list[str]
    cosine: np.ndarray


def _check_k(lm: LoadedModel, k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= lm.cfg.d_vocab:
        raise AnalysisError(f"k must be between 1 and the vocabulary size {lm.cfg.d_vocab}")


def nearest_neighbours(lm: LoadedModel, token: Union[str, int], k: int = 10,
                       matrix: str = "W_E") -> Neighbours:
    """The ``k`` ordinary tokens closest to ``token`` by cosine (its own tokens excluded)."""
    _check_k(lm, k)
    term = resolve_term(lm, token)
    unit = unit_rows(embedding_matrix(lm, matrix))
    cos = unit @ term_vector(unit, term)
    mask = np.full(cos.shape, -np.inf)
    mask[_ordinary(lm)] = 0.0
    mask[list(term.token_ids)] = -np.inf
    scores = cos + mask
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argsort(-scores, kind="stable")[:k]
    return Neighbours(query=str(token), query_ids=list(term.token_ids),
                      query_display=list(term.display), multi_token=term.multi_token,
                      matrix=matrix, token_ids=top.astype(np.int64),
                      display=[lm.tokenizer.display(int(i)) for i in top], cosine=cos[top])
