"""Attention patterns, their entropy, and the activations around them (residual stream, head outputs)."""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Sequence

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_head, check_layer
from .declare import Bool, Head, Int, Layer, Rows, SomeHeads, declare
from .errors import AnalysisError
from .forward import ForwardPass


# ----------------------------------------------------------------------- input checks
def pattern_entropy(pattern: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of attention patterns [..., q, k] (0·log 0 = 0)."""
    a = np.asarray(pattern, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    return -terms.sum(-1)


def head_results(lm: LoadedModel, fp: ForwardPass, layer: int) -> torch.Tensor:
    """Each head's exact output ``z @ W_O`` at every position [pos, n_heads, d_model] (no bias)."""
    z = fp.cache[f"blocks.{layer}.attn.hook_z"]  # [p, h, e]
    w_o = lm.model.blocks[layer].attn.W_O.detach().to(z)  # [h, e, d]
    return torch.einsum("phe,hed->phd", z, w_o)


def _patterns(lm: LoadedModel, fp: ForwardPass) -> np.ndarray:
    """All patterns stacked [L, H, q, k]."""
    return np.stack([fp.cache[f"blocks.{layer}.attn.hook_pattern"].numpy()
                     for layer in range(lm.cfg.n_layers)])


# -------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AttentionPattern:
    """One head's attention pattern on the prompt.

    Attributes:
        layer: layer index.
        head: head index.
        pattern: [q, k] attention weights; rows sum to 1, entries above the diagonal are 0.
        display: [pos] display strings of the prompt tokens (queries and keys).
        entropy: [q] entropy of each query's row, in nats (row i is at most ln(i + 1)).
        mean_entropy: mean of ``entropy`` over query positions, in nats.
        top_queries: [n] query positions of the strongest cells (query 0 excluded: it can
            only attend to itself).
        top_keys: [n] key positions of those cells.
        top_weights: [n] their weights, strongest first.
    """

    layer: int
    head: int
    pattern: np.ndarray
    display: tuple[str, ...]
    entropy: np.ndarray
    mean_entropy: float
    top_queries: np.ndarray
    top_keys: np.ndarray
    top_weights: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        p = len(self.display)
        assert self.pattern.shape == (p, p) and self.entropy.shape == (p,)
        assert self.top_queries.shape == self.top_keys.shape == self.top_weights.shape


@dataclass(frozen=True)
class AttentionPatterns:
    """Every head's attention pattern and entropy.

    Attributes:
        patterns: [n_layers, n_heads, q, k] attention weights.
        display: [pos] display strings of the prompt tokens.
        entropy: [n_layers, n_heads] mean over query positions of each row's entropy (nats).
        entropy_per_query: [n_layers, n_heads, q] entropy of each row (nats).
        max_entropy: [q] ln(i + 1): the entropy of a uniform row at query i.
    """

    patterns: np.ndarray
    display: tuple[str, ...]
    entropy: np.ndarray
    entropy_per_query: np.ndarray
    max_entropy: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        n_layers, n_heads, q, k = self.patterns.shape
        assert q == k == len(self.display)
        assert self.entropy.shape == (n_layers, n_heads)
        assert self.entropy_per_query.shape == (n_layers, n_heads, q)


@dataclass(frozen=True)
class ResidualStream:
    """The residual stream before each block and after the last one.

    Attributes:
        labels: [n_layers + 1] stage names (``blocks.{l}.hook_resid_pre`` ..., final
            ``blocks.{L-1}.hook_resid_post``).
        display: [pos] display strings of the prompt tokens.
        resid: [n_layers + 1, pos, d_model] residual-stream vectors.
        norms: [n_layers + 1, pos] their L2 norms.
    """

    labels: tuple[str, ...]
    display: tuple[str, ...]
    resid: np.ndarray
    norms: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        s, p, _ = self.resid.shape
        assert self.norms.shape == (s, p) and len(self.labels) == s and len(self.display) == p


@dataclass(frozen=True)
class HeadOutputs:
    """The size of what each head writes into the residual stream at each position.

    Attributes:
        display: [pos] display strings of the prompt tokens.
        norms: [n_layers, n_heads, pos] L2 norm of ``z[pos, head] @ W_O[head]`` (exact, no
            bias; ``b_O`` is shared by the layer and reported separately).
        b_O_norms: [n_layers] L2 norm of each layer's output bias.
    """

    display: tuple[str, ...]
    norms: np.ndarray
    b_O_norms: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        assert self.norms.shape[2] == len(self.display)


# ------------------------------------------------------------------------ analyses
def attention_pattern(lm: LoadedModel, fp: ForwardPass, *, layer: int, head: int,
                      n_top: int = 10) -> AttentionPattern:
    """One head's pattern [q, k], its per-query entropy and its strongest (query, key) cells."""
    layer, head = check_layer(lm, layer), check_head(lm, head)
    if isinstance(n_top, bool) or not isinstance(n_top, Integral) or n_top < 1:
        raise AnalysisError(f"n_top must be a positive whole number, got {n_top!r}")
    pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head].numpy()
    entropy = pattern_entropy(pattern)
    p = pattern.shape[0]
    q_idx, k_idx = np.tril_indices(p)
    keep = q_idx > 0
    q_idx, k_idx = q_idx[keep], k_idx[keep]
    weights = pattern[q_idx, k_idx]
    order = np.argsort(-weights, kind="stable")[:n_top]
    return AttentionPattern(
        layer=layer, head=head, pattern=pattern, display=fp.display, entropy=entropy,
        mean_entropy=float(entropy.mean()),
        top_queries=q_idx[order].astype(np.int64), top_keys=k_idx[order].astype(np.int64),
        top_weights=weights[order],
    )


def attention_patterns(lm: LoadedModel, fp: ForwardPass) -> AttentionPatterns:
    """Every head's pattern [L, H, q, k] with per-head entropy (mean over queries, nats)."""
    patterns = _patterns(lm, fp)
    per_query = pattern_entropy(patterns)
    return AttentionPatterns(
        patterns=patterns, display=fp.display, entropy=per_query.mean(-1),
        entropy_per_query=per_query, max_entropy=np.log(np.arange(1, fp.n_tokens + 1)),
    )


def residual_stream(lm: LoadedModel, fp: ForwardPass) -> ResidualStream:
    """The residual stream before each block (``resid_pre``) and after the last (``resid_post``)."""  # noqa: E501
    n = lm.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)]
    names.append(f"blocks.{n - 1}.hook_resid_post")
    resid = torch.stack([fp.cache[name] for name in names]).numpy()
    return ResidualStream(labels=tuple(names), display=fp.display, resid=resid,
                          norms=np.linalg.norm(resid, axis=-1))


def head_outputs(lm: LoadedModel, fp: ForwardPass) -> HeadOutputs:
    """Norm of each head's output ``z @ W_O`` at each position [L, H, pos]."""
    with torch.no_grad():
        norms = [head_results(lm, fp, layer).norm(dim=-1).T for layer in range(lm.cfg.n_layers)]
        b_o = lm.model.b_O.detach().float().cpu()
    return HeadOutputs(display=fp.display, norms=torch.stack(norms).numpy(),
                       b_O_norms=b_o.norm(dim=-1).numpy())


# ------------------------------------------------------------ declared (POST /api/...)
@dataclass(frozen=True)
class AttentionView:
    """What ``POST /api/attention`` answers: the fields naming the part asked for (``layer``
    and ``head``, or ``heads``; ``queries``) and the result (arrays cut to that part)."""

    asked: dict
    result: dict


def _fields(obj: object) -> dict:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def attention_view(lm: LoadedModel, fp: ForwardPass, *, layer: Optional[int] = None,
                   head: Optional[int] = None,
                   heads: Optional[Sequence[tuple[int, int]]] = None,
                   queries: Optional[Sequence[int]] = None) -> AttentionView:
    """One head's pattern (``layer`` and ``head``), or every head's patterns and entropies:
    of one ``layer``, of some ``heads`` (in the order given), or of all; only the query rows
    ``queries`` (non-negative positions, in the order given) when given."""
    rows = None if queries is None else list(queries)
    asked = {} if rows is None else {"queries": rows}
    if head is not None:
        one = attention_pattern(lm, fp, layer=layer, head=head)
        data = _fields(one)
        if rows is not None:  # query rows of the pattern and of its per-query entropy
            data["pattern"], data["entropy"] = one.pattern[rows], one.entropy[rows]
        return AttentionView({"layer": layer, "head": head, **asked}, data)
    data = _fields(attention_patterns(lm, fp))
    per_head = ("patterns", "entropy", "entropy_per_query")
    if heads is not None:
        sel = tuple(np.array(heads).T)
        data.update({k: data[k][sel] for k in per_head})
    elif layer is not None:
        data.update({k: data[k][layer] for k in per_head})
    if rows is not None:  # query rows (the key axis stays whole)
        data["patterns"] = data["patterns"][..., rows, :]
        data["entropy_per_query"] = data["entropy_per_query"][..., rows]
        data["max_entropy"] = data["max_entropy"][rows]
    which = {"layer": layer} if heads is None else {"heads": [list(h) for h in heads]}
    return AttentionView({**which, **asked}, data)


@dataclass(frozen=True)
class Activations:
    """What ``POST /api/activations`` answers: the residual stream's norms (and vectors of
    some stages) and each head's output norms."""

    residual_stream: dict
    head_outputs: HeadOutputs


def activations(lm: LoadedModel, fp: ForwardPass, *, vectors: bool = False,
                layer: Optional[int] = None) -> Activations:
    """The residual stream's norms at each stage, with its vectors (every stage's, or stage
    ``layer``'s) when ``vectors``; each head's output norms."""
    resid = residual_stream(lm, fp)
    data: dict = {"labels": list(resid.labels), "norms": resid.norms}
    if vectors:
        stages = range(len(resid.labels)) if layer is None else [layer]
        data["resid"] = {resid.labels[s]: resid.resid[s] for s in stages}
    return Activations(data, head_outputs(lm, fp))


ATTENTION = declare(
    "attention", attention_view,
    params=[Layer("layer"), Head("head"), SomeHeads("heads"), Rows("queries")],
    to_json=lambda view: {**view.asked, "result": view.result}, label="attention patterns")

ACTIVATIONS = declare(
    "activations", activations,
    params=[Bool("vectors", False),
            Int("layer", None, 0, lambda cfg: cfg.n_layers,
                what=" (a residual-stream stage: 0 to n_layers)")],
    to_json=lambda res: {"residual_stream": res.residual_stream,
                         "head_outputs": res.head_outputs},
    label="activations")
