"""QK attribution: why a head attends from a query to a key, as a sum of component pairs.

The residual stream a head reads at a position is a sum of components c_i (token embedding,
positional embedding, each earlier head's output ``z W_O``, each earlier layer's ``b_O`` and
MLP output). With the LayerNorm scale σ frozen at its value on the prompt,
``LN(x) = (x − mean x)/σ · w + b`` is linear in the components (the centring is linear), so
the query is ``q = Σ_i LN'(c_i(q)) W_Q + (b W_Q + b_Q)`` and the key likewise. The
pre-softmax score ``s = q · k / √d_head`` is bilinear:

    s[q, k] = Σ_i Σ_j Q_i · K_j / √d_head,

one term per (query-side component, key-side component), the biases being components of their
own. The terms add back to ``hook_attn_scores[q, k]`` exactly (rotary models rotate each
Q_i and K_j, which is linear too). A contrast key k' explains ``s[q, k] − s[q, k']``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Sequence

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from ..model.transformer import rotate
from .attention import check_head, check_layer, head_results
from .declare import Bool, Exact, Head, Layer, Position, declare, fields_of
from .errors import AnalysisError
from .forward import ForwardPass
from .predictions import check_position

#: Component kinds: what a residual-stream component is.
KINDS: tuple[str, ...] = ("embed", "pos_embed", "head", "head_src", "b_O", "mlp", "ln_bias",
                          "qk_bias")
DTYPE = torch.float64


# ------------------------------------------------------------------------- components
@dataclass(frozen=True)
class Components:
    """The residual stream entering a layer, split into components at every position.

    Attributes:
        layer: the layer that reads this residual stream (``blocks.{layer}.hook_resid_pre``).
        labels: [C] component names ("embed", "pos_embed", "L0H2", "L0 b_O", "L0 MLP").
        kinds: [C] component kind (one of :data:`KINDS`).
        layers: [C] layer that wrote each component (-1 for the embeddings).
        heads: [C] head of each head component (-1 otherwise).
        vectors: [pos, C, d_model] float64 components; they sum to ``resid_pre`` at each
            position.
    """

    layer: int
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: np.ndarray
    heads: np.ndarray
    vectors: torch.Tensor

    def __post_init__(self) -> None:  # noqa: D105
        c = len(self.labels)
        assert len(self.kinds) == c and self.layers.shape == self.heads.shape == (c,)
        assert self.vectors.shape[1] == c


def residual_components(lm: LoadedModel, fp: ForwardPass, layer: int,
                        n_pos: Optional[int] = None) -> Components:
    """Components of ``resid_pre`` of ``layer`` at the first ``n_pos`` positions (default all)."""
    cfg, model = lm.cfg, lm.model
    n = fp.n_tokens if n_pos is None else n_pos
    labels: list[str] = []
    kinds: list[str] = []
    layers: list[int] = []
    heads: list[int] = []
    blocks: list[torch.Tensor] = []  # each [n, c, d]

    def add(label: str, kind: str, lay: int, head: int, vec: torch.Tensor) -> None:
        labels.append(label)
        kinds.append(kind)
        layers.append(lay)
        heads.append(head)
        blocks.append(vec.to("cpu", DTYPE).expand(n, -1)[:, None, :])

    with torch.no_grad():
        add("embed", "embed", -1, -1, fp.cache["hook_embed"][:n])
        if "hook_pos_embed" in fp.cache:
            add("pos_embed", "pos_embed", -1, -1, fp.cache["hook_pos_embed"][:n])
        for lay in range(layer):
            res = head_results(lm, fp, lay)[:n].to(DTYPE)  # [n, h, d]
            for h in range(cfg.n_heads):
                add(f"L{lay}H{h}", "head", lay, h, res[:, h])
            add(f"L{lay} b_O", "b_O", lay, -1,
                model.blocks[lay].attn.b_O.detach()[None, :])
            if not cfg.attn_only:
                add(f"L{lay} MLP", "mlp", lay, -1, fp.cache[f"blocks.{lay}.hook_mlp_out"][:n])
        vectors = torch.cat(blocks, dim=1)
    return Components(layer=layer, labels=tuple(labels), kinds=tuple(kinds),
                      layers=np.asarray(layers, dtype=np.int64),
                      heads=np.asarray(heads, dtype=np.int64), vectors=vectors)


def normalized_components(lm: LoadedModel, fp: ForwardPass, layer: int, comps: torch.Tensor,
                          which: str = "ln1") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Apply ``blocks.{layer}.{which}`` with its scale frozen to components [pos, C, d].

    Returns the transformed components and the LayerNorm bias (None without one); their sum
    over C plus the bias equals the normalised residual stream at each position.
    """
    norm = lm.cfg.normalization_type
    if not norm:
        return comps, None
    ln = getattr(lm.model.blocks[layer], which)
    n = comps.shape[0]
    scale = fp.cache[f"blocks.{layer}.{which}.hook_scale"][:n].to(DTYPE).reshape(n, 1, 1)
    if norm == "LN":
        comps = comps - comps.mean(-1, keepdim=True)
    out = comps / scale * ln.w.detach().to("cpu", DTYPE)
    bias = ln.b.detach().to("cpu", DTYPE) if norm == "LN" else None
    return out, bias


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class QKAttribution:
    """A head's pre-softmax score at (query, key) split into query × key component terms.

    Attributes:
        layer: the head's layer.
        head: the head.
        query: query position.
        key: key position (the one explained).
        contrast_key: key k' whose score is subtracted (None without a contrast).
        display: [pos] display strings of the prompt tokens.
        q_labels: [Cq] query-side component names (the last is "b_Q").
        k_labels: [Ck] key-side component names (the last is "b_K").
        q_kinds: [Cq] kinds of the query-side components (see :data:`KINDS`).
        k_kinds: [Ck] kinds of the key-side components.
        q_sources: [Cq] source position of a head split by source ("head_src"), else -1.
        k_sources: [Ck] likewise for the key side.
        terms: [Cq, Ck] ``Q_i · K_j / √d_head`` (minus the same at k' with a contrast);
            they sum to ``score``.
        score: the model's score ``hook_attn_scores[q, k]`` (minus ``[q, k']``).
        pattern: the attention weight A[q, k] (and A[q, k'] in ``contrast_pattern``).
        contrast_pattern: A[q, k'] or nan.
        dims: [d_head] ``q_e k_e / √d_head`` per dimension (k minus k' with a contrast);
            they sum to ``score``.
        normalization: "none", "LN" or "RMS".
    """

    layer: int
    head: int
    query: int
    key: int
    contrast_key: Optional[int]
    display: tuple[str, ...]
    q_labels: tuple[str, ...]
    k_labels: tuple[str, ...]
    q_kinds: tuple[str, ...]
    k_kinds: tuple[str, ...]
    q_sources: np.ndarray
    k_sources: np.ndarray
    terms: np.ndarray
    score: float
    pattern: float
    contrast_pattern: float
    dims: np.ndarray
    normalization: str

    def __post_init__(self) -> None:  # noqa: D105
        cq, ck = len(self.q_labels), len(self.k_labels)
        assert self.terms.shape == (cq, ck) and len(self.q_kinds) == cq and len(self.k_kinds) == ck
        assert self.q_sources.shape == (cq,) and self.k_sources.shape == (ck,)

    @property
    def total(self) -> float:
        """Sum of all terms; equals ``score``."""
        return float(self.terms.sum())

    def top_terms(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` largest terms by magnitude as (query component, key component, value)."""
        flat = np.argsort(-np.abs(self.terms), axis=None, kind="stable")[:n]
        i, j = np.unravel_index(flat, self.terms.shape)
        return [(int(a), int(b), float(self.terms[a, b])) for a, b in zip(i, j)]

    def describe(self, i: int, j: int) -> str:
        """A term in words: "embed of ' Potter' at query × L0H2 output at key"."""
        left = _component_words(self.q_labels[i], self.q_kinds[i], self.q_sources[i],
                                self.display, self.query)
        right = _component_words(self.k_labels[j], self.k_kinds[j], self.k_sources[j],
                                 self.display, self.key)
        return f"{left} at query × {right} at key"


def _component_words(label: str, kind: str, source: int, display: Sequence[str],
                     pos: int) -> str:
    if kind == "embed":
        return f"token {display[pos]!r}"
    if kind == "pos_embed":
        return f"position {pos}"
    if kind == "head":
        return f"output of {label}"
    if kind == "head_src":
        return f"output of {label.split('←')[0]} from {display[source]!r} ({source})"
    return label


@dataclass(frozen=True)
class QKRow:
    """QK attribution of every key of one query row (same components for every key).

    Attributes:
        layer, head, query: the head and the query position.
        display: [pos] display strings of the prompt tokens.
        q_labels, k_labels, q_kinds, k_kinds: as in :class:`QKAttribution`.
        terms: [query + 1, Cq, Ck] terms for every key 0..query.
        scores: [query + 1] the model's scores ``hook_attn_scores[query, :query + 1]``.
        pattern: [query + 1] the attention weights of the row.
    """

    layer: int
    head: int
    query: int
    display: tuple[str, ...]
    q_labels: tuple[str, ...]
    k_labels: tuple[str, ...]
    q_kinds: tuple[str, ...]
    k_kinds: tuple[str, ...]
    terms: np.ndarray
    scores: np.ndarray
    pattern: np.ndarray

    def __post_init__(self) -> None:  # noqa: D105
        assert self.terms.shape == (self.query + 1, len(self.q_labels), len(self.k_labels))
        assert self.scores.shape == self.pattern.shape == (self.query + 1,)


# -------------------------------------------------------------------------- the maths
@dataclass(frozen=True)
class _Side:
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    sources: np.ndarray
    vecs: torch.Tensor  # [n_pos, C, d_head]: this side's projected components


def _split_by_source(lm: LoadedModel, fp: ForwardPass, comps: Components, positions: list[int]
                     ) -> tuple[list[str], list[str], list[int], torch.Tensor]:
    """Replace each head component at ``positions`` by its parts from each source position.

    Head h at p writes ``Σ_j A[p, j] (x̃_j W_V + b_V) W_O``; part j is one term of that sum.
    Only valid for one position at a time (the parts differ per position); returns the labels,
    kinds, sources and the vectors [len(positions), C', d] where C' is the same for every
    position given (sources up to max(positions); parts at sources > p are zero).
    """
    model = lm.model
    top = max(positions)
    labels: list[str] = []
    kinds: list[str] = []
    sources: list[int] = []
    parts: list[torch.Tensor] = []  # each [len(positions), d]
    idx = torch.as_tensor(positions)
    for c, (label, kind) in enumerate(zip(comps.labels, comps.kinds)):
        if kind != "head":
            labels.append(label)
            kinds.append(kind)
            sources.append(-1)
            parts.append(comps.vectors[idx, c])
            continue
        lay, h = int(comps.layers[c]), int(comps.heads[c])
        attn = model.blocks[lay].attn
        resid = fp.cache[f"blocks.{lay}.hook_resid_pre"][: top + 1].to(DTYPE)[:, None, :]
        x, b = normalized_components(lm, fp, lay, resid)
        x = x[:, 0] + (b if b is not None else 0)  # [top+1, d]
        v = x @ attn.W_V[h].detach().to(DTYPE) + attn.b_V[h].detach().to(DTYPE)  # [j, e]
        out = v @ attn.W_O[h].detach().to(DTYPE)  # [j, d]
        a = fp.cache[f"blocks.{lay}.attn.hook_pattern"][h].to(DTYPE)[idx, : top + 1]  # [P, j]
        for j in range(top + 1):
            labels.append(f"{label}←{j}")
            kinds.append("head_src")
            sources.append(j)
            parts.append(a[:, j, None] * out[j])
    return labels, kinds, sources, torch.stack(parts, dim=1)


def _side(lm: LoadedModel, fp: ForwardPass, layer: int, head: int, positions: list[int],
          which: str, split: bool) -> _Side:
    """Query-side (``which="q"``) or key-side projected components at ``positions``."""
    attn = lm.model.blocks[layer].attn
    w = (attn.W_Q if which == "q" else attn.W_K)[head].detach().to("cpu", DTYPE)  # [d, e]
    b = (attn.b_Q if which == "q" else attn.b_K)[head].detach().to("cpu", DTYPE)  # [e]
    if split:
        comps = residual_components(lm, fp, layer, n_pos=max(positions) + 1)
        labels, kinds, sources, vecs = _split_by_source(lm, fp, comps, positions)
        proj = _normalize_at(lm, fp, layer, vecs, positions) @ w  # [P, C, e]
    else:
        labels, kinds, proj = _projected_components(lm, fp, layer, positions, w)
        sources = [-1] * len(labels)
    ln_bias = _ln_bias(lm, layer)
    extra = [] if ln_bias is None else [("LN bias", "ln_bias", ln_bias @ w)]
    extra.append(("b_Q" if which == "q" else "b_K", "qk_bias", b))
    for label, kind, vec in extra:
        proj = torch.cat([proj, vec.expand(proj.shape[0], 1, -1)], dim=1)
        labels.append(label)
        kinds.append(kind)
        sources.append(-1)
    if lm.cfg.positional_embedding_type == "rotary":
        pos = torch.as_tensor(positions)
        # rotate() takes [b, p, h, e]: components play the batch, one head
        proj = rotate(proj.permute(1, 0, 2)[:, :, None, :], pos, lm.cfg)[:, :, 0].permute(1, 0, 2)
    return _Side(labels=tuple(labels), kinds=tuple(kinds),
                 sources=np.asarray(sources, dtype=np.int64), vecs=proj)


def _projected_components(lm: LoadedModel, fp: ForwardPass, layer: int, positions: list[int],
                          w: torch.Tensor) -> tuple[list[str], list[str], torch.Tensor]:
    """``LN'(c_i) W`` for every component at ``positions`` [P, C, e], from the factors.

    The frozen norm's centring and weight fold into W (``(c − mean c) W = c (W − mean_rows W)``)
    and a head's output ``z W_O`` projects as ``z (W_O W)``, so no [P, C, d_model] stack is made.
    """
    cfg, model = lm.cfg, lm.model
    idx = torch.as_tensor(positions)
    norm = cfg.normalization_type
    if norm:
        w = lm.model.blocks[layer].ln1.w.detach().to("cpu", DTYPE)[:, None] * w
        if norm == "LN":
            w = w - w.mean(0, keepdim=True)
    labels: list[str] = []
    kinds: list[str] = []
    parts: list[torch.Tensor] = []  # each [P, c, e]

    def add(label: str, kind: str, vec: torch.Tensor) -> None:
        labels.append(label)
        kinds.append(kind)
        parts.append(vec.expand(len(positions), -1)[:, None, :])

    add("embed", "embed", fp.cache["hook_embed"][idx].to(DTYPE) @ w)
    if "hook_pos_embed" in fp.cache:
        add("pos_embed", "pos_embed", fp.cache["hook_pos_embed"][idx].to(DTYPE) @ w)
    for lay in range(layer):
        attn = model.blocks[lay].attn
        z = fp.cache[f"blocks.{lay}.attn.hook_z"][idx].to(DTYPE)  # [P, h, e]
        w_o = attn.W_O.detach().to("cpu", DTYPE)  # [h, e, d]
        if len(positions) < w.shape[1]:  # few positions: z W_O first is cheaper
            heads = torch.einsum("phe,hed->phd", z, w_o) @ w
        else:
            heads = torch.einsum("phe,hef->phf", z, torch.einsum("hed,df->hef", w_o, w))
        labels.extend(f"L{lay}H{h}" for h in range(cfg.n_heads))
        kinds.extend(["head"] * cfg.n_heads)
        parts.append(heads)
        add(f"L{lay} b_O", "b_O", attn.b_O.detach().to("cpu", DTYPE)[None, :] @ w)
        if not cfg.attn_only:
            add(f"L{lay} MLP", "mlp", fp.cache[f"blocks.{lay}.hook_mlp_out"][idx].to(DTYPE) @ w)
    proj = torch.cat(parts, dim=1)
    if norm:
        scale = fp.cache[f"blocks.{layer}.ln1.hook_scale"].reshape(-1)[idx].to(DTYPE)
        proj = proj / scale[:, None, None]
    return labels, kinds, proj


def _normalize_at(lm: LoadedModel, fp: ForwardPass, layer: int, vecs: torch.Tensor,
                  positions: list[int]) -> torch.Tensor:
    norm = lm.cfg.normalization_type
    if not norm:
        return vecs
    ln = lm.model.blocks[layer].ln1
    scale = fp.cache[f"blocks.{layer}.ln1.hook_scale"].to(DTYPE).reshape(-1)[
        torch.as_tensor(positions)].reshape(-1, 1, 1)
    if norm == "LN":
        vecs = vecs - vecs.mean(-1, keepdim=True)
    return vecs / scale * ln.w.detach().to("cpu", DTYPE)


def _ln_bias(lm: LoadedModel, layer: int) -> Optional[torch.Tensor]:
    if lm.cfg.normalization_type != "LN":
        return None
    return lm.model.blocks[layer].ln1.b.detach().to("cpu", DTYPE)


def check_cell(fp: ForwardPass, query: int, key: int) -> tuple[int, int]:
    """(query, key) as non-negative positions, with the key at or before the query."""
    q = check_position(fp, query)
    if isinstance(key, bool) or not isinstance(key, Integral):
        raise AnalysisError(f"key must be a whole number, got {key!r}")
    k = check_position(fp, key)
    if k > q:
        raise AnalysisError(f"key {k} comes after query {q}: a causal head only attends to "
                            f"keys at or before its query (0 to {q})")
    return q, k


def qk_attribution(lm: LoadedModel, fp: ForwardPass, *, layer: int, head: int, query: int,
                   key: int, contrast_key: Optional[int] = None,
                   split_sources: bool = False) -> QKAttribution:
    """Split head (layer, head)'s score at (query, key) into query × key component terms.

    ``contrast_key`` explains ``s[q, k] − s[q, k']`` instead; ``split_sources`` splits each
    earlier head's output by the position it read from.
    """
    layer, head = check_layer(lm, layer), check_head(lm, head)
    q, k = check_cell(fp, query, key)
    k2 = None
    if contrast_key is not None:
        _, k2 = check_cell(fp, q, contrast_key)
    keys = [k] if k2 is None else [k, k2]
    with torch.no_grad():
        qs = _side(lm, fp, layer, head, [q], "q", split_sources)
        ks = _side(lm, fp, layer, head, keys, "k", split_sources)
        root = math.sqrt(lm.cfg.d_head)
        qv = qs.vecs[0]  # [Cq, e]
        kv = ks.vecs[0] if k2 is None else ks.vecs[0] - ks.vecs[1]  # [Ck, e]
        terms = (qv @ kv.T) / root
        dims = qv.sum(0) * kv.sum(0) / root
    scores = fp.cache[f"blocks.{layer}.attn.hook_attn_scores"][head]
    pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head]
    score = float(scores[q, k]) - (0.0 if k2 is None else float(scores[q, k2]))
    return QKAttribution(
        layer=layer, head=head, query=q, key=k, contrast_key=k2, display=fp.display,
        q_labels=qs.labels, k_labels=ks.labels, q_kinds=qs.kinds, k_kinds=ks.kinds,
        q_sources=qs.sources, k_sources=ks.sources, terms=terms.numpy(), score=score,
        pattern=float(pattern[q, k]),
        contrast_pattern=float("nan") if k2 is None else float(pattern[q, k2]),
        dims=dims.numpy(), normalization=lm.cfg.normalization_type or "none",
    )


def qk_attribution_row(lm: LoadedModel, fp: ForwardPass, *, layer: int, head: int,
                       query: int) -> QKRow:
    """QK attribution of every key 0..query of one query row (components not split)."""
    layer, head = check_layer(lm, layer), check_head(lm, head)
    q = check_position(fp, query)
    keys = list(range(q + 1))
    with torch.no_grad():
        qs = _side(lm, fp, layer, head, [q], "q", False)
        ks = _side(lm, fp, layer, head, keys, "k", False)
        terms = torch.einsum("ie,kje->kij", qs.vecs[0], ks.vecs) / math.sqrt(lm.cfg.d_head)
    scores = fp.cache[f"blocks.{layer}.attn.hook_attn_scores"][head][q, : q + 1]
    pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head][q, : q + 1]
    return QKRow(layer=layer, head=head, query=q, display=fp.display, q_labels=qs.labels,
                 k_labels=ks.labels, q_kinds=qs.kinds, k_kinds=ks.kinds, terms=terms.numpy(),
                 scores=scores.numpy().astype(np.float64),
                 pattern=pattern.numpy().astype(np.float64))


def default_cell(fp: ForwardPass, layer: int, head: int) -> tuple[int, int]:
    """The (query, key) a head attends most strongly, leaving out the diagonal and the first
    token (where heads park attention): the cell its QK attribution explains by default."""
    a = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head].numpy().astype(np.float64)
    n = a.shape[0]
    if n < 3:
        return n - 1, int(a[n - 1].argmax())
    b = np.tril(a, -1)
    b[:, 0] = 0.0
    q, k = np.unravel_index(int(b.argmax()), b.shape)
    return int(q), int(k)


def strongest_head(scores: np.ndarray) -> tuple[int, int]:
    """(layer, head) of the largest score in a [n_layers, n_heads] table."""
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(layer), int(head)


# ------------------------------------------------------------ declared (POST /api/...)
def explain_score(lm: LoadedModel, fp: ForwardPass, *, layer: int, head: int, query: int = -1,
                  key: Optional[int] = None, contrast_key: Optional[int] = None,
                  split_sources: bool = False, row: bool = False,
                  truncate: bool = False) -> "QKAttribution | QKRow":
    """The QK attribution of one cell (``query``, ``key``), or of the whole ``row`` of the
    query; a prompt longer than the model reads is refused unless ``truncate`` (its first
    tokens)."""
    if fp.truncated and not truncate:
        raise AnalysisError(f"the prompt has {fp.n_prompt_tokens} tokens but {lm.name} reads "
                            f"at most {fp.n_tokens}: shorten it, or send \"truncate\": true to "
                            f"analyse the first {fp.n_tokens}")
    if row:
        return qk_attribution_row(lm, fp, layer=layer, head=head, query=query)
    if key is None:
        raise AnalysisError("missing field 'key' (the key position; or send \"row\": true)")
    return qk_attribution(lm, fp, layer=layer, head=head, query=query, key=key,
                          contrast_key=contrast_key, split_sources=split_sources)


def _qk_json(res: "QKAttribution | QKRow") -> dict:
    if isinstance(res, QKRow):
        return {"result": res}
    top = [{"query_component": res.q_labels[i], "key_component": res.k_labels[j],
            "value": Exact(v), "text": res.describe(i, j)} for i, j, v in res.top_terms(10)]
    return {"result": {**fields_of(res), "total": Exact(res.total), "top_terms": top}}


QK_ATTRIBUTION = declare(
    "qk-attribution", explain_score,
    params=[Layer("layer"), Head("head", required=True), Position("query", -1),
            Position("key", None), Position("contrast_key", None), Bool("split_sources"),
            Bool("row"), Bool("truncate")],
    to_json=_qk_json, label="QK attribution")
