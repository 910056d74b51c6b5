"""Head detection: previous-token, duplicate-token, induction, self and copying heads.

Scores on the user's prompt compare each head's pattern A with a detection pattern P
(TransformerLens' ``head_detector``; Olsson et al. 2022):

- previous-token: P[i, i-1] = 1
- duplicate-token: P[i, j] = 1 iff t_i = t_j and j < i
- induction: P[i, j] = 1 iff t_{j-1} = t_i and 1 <= j <= i (duplicate shifted one right)

``"mul"``: Σ A⊙P / Σ A.  ``"abs"``: 1 - mean|A - P|, the mean taken over query rows of
each row's summed absolute difference (as TransformerLens computes it; an element-wise
mean would be ~1 for every head). ``exclude_bos`` leaves key 0 out of the comparison and
``exclude_diagonal`` the diagonal: for "mul" they are zeroed in A, for "abs" in |A - P|
(TransformerLens' semantics: P's entries there are not counted as errors either).

Which query rows count (``rows``): ``"target"`` (the default shown) averages over the rows
that have at least one target in P, as the field's dataset metrics do (on a prompt whose
second half repeats the first, the first half has no earlier copy, and counting it would
halve every induction score); ``"all"`` averages over every row, exactly as
TransformerLens' ``head_detector`` does. Scores on the seeded repeated-random-token probe
come from :mod:`.probe`; the OV copying score from :mod:`.eigen`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import numpy as np

from ..model.checkpoint import LoadedModel
from .checks import check_layer_head
from .declare import Bool, Choice, Int, declare
from .eigen import CircuitEigenvalues, circuit_eigenvalues
from .errors import AnalysisError
from .forward import ForwardPass
from .probe import ProbeScores, ordinary_token_ids, probe_scores

DetectionKind = Literal["previous_token", "duplicate_token", "induction"]
DETECTION_KINDS: tuple[str, ...] = get_args(DetectionKind)
Metric = Literal["mul", "abs"]
METRICS: tuple[str, ...] = get_args(Metric)
Rows = Literal["target", "all"]
ROWS: tuple[str, ...] = get_args(Rows)
#: What each choice of rows means, for pages and exports.
ROWS_DESCRIPTION = {"target": "averaged over the query rows that have a target",
                    "all": "averaged over every query row (TransformerLens' head_detector)"}
Label = Literal["induction", "duplicate", "previous-token", "self/diagonal", "copying",
                "diffuse", "other"]
LABELS: tuple[str, ...] = get_args(Label)

#: A pattern kind labels a head when its "mul" score on the prompt reaches this.
PATTERN_THRESHOLD = 0.4
#: "self/diagonal" when the mean weight on the token itself (positions >= 1) reaches this.
SELF_THRESHOLD = 0.5
#: "copying" when the full-OV copying score Re(Σλ)/Σ|λ| reaches this.
COPYING_THRESHOLD = 0.7
#: "diffuse" when the mean normalised entropy of the rows (positions >= 1) reaches this.
DIFFUSE_ENTROPY = 0.75
THRESHOLDS = {"pattern": PATTERN_THRESHOLD, "self": SELF_THRESHOLD,
              "copying": COPYING_THRESHOLD, "diffuse_entropy": DIFFUSE_ENTROPY}
_KIND_LABEL = {"induction": "induction", "duplicate_token": "duplicate",
               "previous_token": "previous-token"}
#: Precedence on ties: the more specific pattern first.
_PRECEDENCE = ("induction", "duplicate_token", "previous_token")


def detection_pattern(token_ids: np.ndarray, kind: str) -> np.ndarray:
    """The [pos, pos] 0/1 detection pattern P of ``kind`` for a token sequence."""
    t = np.asarray(token_ids)
    p = t.shape[0]
    if kind == "previous_token":
        return np.eye(p, k=-1)
    same = (t[:, None] == t[None, :])
    dup = np.tril(same, k=-1).astype(np.float64)
    if kind == "duplicate_token":
        return dup
    if kind == "induction":
        ind = np.zeros((p, p))
        ind[:, 1:] = same[:, :-1]  # P[i, j] = [t_{j-1} == t_i]
        return np.tril(ind)
    raise AnalysisError(f"unknown detection pattern {kind!r}; choose one of "
                        f"{', '.join(DETECTION_KINDS)}")


def _masked(patterns: np.ndarray, exclude_bos: bool, exclude_diagonal: bool) -> np.ndarray:
    a = np.array(patterns, dtype=np.float64, copy=True)
    if exclude_bos:
        a[..., :, 0] = 0.0
    if exclude_diagonal:
        idx = np.arange(a.shape[-1])
        a[..., idx, idx] = 0.0
    return a


def target_rows(detection: np.ndarray, exclude_bos: bool = False,
                exclude_diagonal: bool = False) -> np.ndarray:
    """[q] bool: the query rows of a detection pattern with at least one counted target."""
    d = _masked(detection, exclude_bos, exclude_diagonal)
    return d.sum(-1) > 0


def pattern_scores(patterns: np.ndarray, detection: np.ndarray, metric: str = "mul",
                   exclude_bos: bool = False, exclude_diagonal: bool = False,
                   rows: str = "all") -> np.ndarray:
    """Score patterns [..., q, k] against a detection pattern [q, k] ("mul" or "abs").

    ``rows="all"`` is TransformerLens' ``head_detector`` exactly (without its rounding to
    three decimals); ``rows="target"`` counts only the query rows that have a target, and
    is NaN where no row has one.
    """
    if metric not in METRICS:
        raise AnalysisError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if rows not in ROWS:
        raise AnalysisError(f"unknown rows {rows!r}; choose one of {', '.join(ROWS)}")
    n = patterns.shape[-2]
    keep = (target_rows(detection, exclude_bos, exclude_diagonal) if rows == "target"
            else np.ones(n, dtype=bool))
    if rows == "target" and not keep.any():
        return np.full(patterns.shape[:-2], np.nan)
    if metric == "mul":
        a = _masked(patterns, exclude_bos, exclude_diagonal)[..., keep, :]
        num = (a * detection[keep]).sum((-1, -2))
        den = a.sum((-1, -2))
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    err = _masked(np.abs(np.asarray(patterns, dtype=np.float64) - detection), exclude_bos,
                  exclude_diagonal)
    return 1.0 - err[..., keep, :].sum((-1, -2)) / int(keep.sum())


def self_scores(patterns: np.ndarray) -> np.ndarray:
    """Mean A[i, i] over positions i >= 1 (position 0 can only attend to itself)."""
    diag = np.diagonal(patterns, axis1=-2, axis2=-1)[..., 1:]
    return diag.mean(-1) if diag.shape[-1] else np.zeros(patterns.shape[:-2])


def normalised_entropy(patterns: np.ndarray) -> np.ndarray:
    """Mean over rows i >= 1 of the row's entropy divided by log(i + 1), in [0, 1]."""
    p = patterns.shape[-1]
    if p < 2:
        return np.zeros(patterns.shape[:-2])
    a = np.clip(patterns[..., 1:, :], 1e-30, None)
    h = -(patterns[..., 1:, :] * np.log(a)).sum(-1)  # [..., p-1]
    return (h / np.log(np.arange(2, p + 1))).mean(-1)


def label_heads(scores: dict[str, np.ndarray], self_attention: np.ndarray,
                entropy: np.ndarray, copying: Optional[np.ndarray] = None,
                ) -> tuple[list[list[str]], list[list[list[str]]]]:
    """One label per head and every label it passes (thresholds: module constants).

    Precedence: the strongest of induction / duplicate / previous-token passing
    ``PATTERN_THRESHOLD``, then self/diagonal, then copying, then diffuse, else "other".
    """
    L, H = self_attention.shape
    labels, tags = [], []
    for layer in range(L):
        row_labels, row_tags = [], []
        for head in range(H):
            passing = [k for k in _PRECEDENCE if scores[k][layer, head] >= PATTERN_THRESHOLD]
            head_tags = [_KIND_LABEL[k] for k in passing]
            if self_attention[layer, head] >= SELF_THRESHOLD:
                head_tags.append("self/diagonal")
            if copying is not None and copying[layer, head] >= COPYING_THRESHOLD:
                head_tags.append("copying")
            if entropy[layer, head] >= DIFFUSE_ENTROPY:
                head_tags.append("diffuse")
            if passing:
                best = max(passing, key=lambda k: scores[k][layer, head])
                label = _KIND_LABEL[best]
            else:
                label = head_tags[0] if head_tags else "other"
            row_labels.append(label)
            row_tags.append(head_tags)
        labels.append(row_labels)
        tags.append(row_tags)
    return labels, tags


def _top_indices(flat: np.ndarray, n: int) -> np.ndarray:
    """``np.argsort(-flat, kind="stable")[..., :n]`` without sorting whole rows: the n largest
    of each row, ties in index order (a long prompt has q * k entries per head)."""
    size = flat.shape[-1]
    if n >= size or size <= 4 * n:
        return np.argsort(-flat, axis=-1, kind="stable")[..., :n]
    rows = flat.reshape(-1, size)
    out = np.empty((rows.shape[0], n), dtype=np.int64)
    for r, row in enumerate(rows):
        threshold = row[np.argpartition(-row, n - 1)[n - 1]]  # the n-th largest value
        above = np.flatnonzero(row > threshold)
        tied = np.flatnonzero(row == threshold)[: n - len(above)]
        pick = np.concatenate([above, tied])
        out[r] = pick[np.argsort(-row[pick], kind="stable")]
    return out.reshape(flat.shape[:-1] + (n,))


def _examples(weighted: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n entries of [L, H, q, k] weights: positions [L, H, n, 2] (-1 pad), weights."""
    L, H, q, k = weighted.shape
    flat = weighted.reshape(L, H, q * k)
    n_take = min(n, q * k)
    idx = _top_indices(flat, n_take)
    w = np.take_along_axis(flat, idx, -1)
    pos = np.stack([idx // k, idx % k], -1)
    pos[w <= 0] = -1
    w = np.where(w > 0, w, 0.0)
    if n_take < n:
        pos = np.concatenate([pos, -np.ones((L, H, n - n_take, 2), dtype=pos.dtype)], 2)
        w = np.concatenate([w, np.zeros((L, H, n - n_take))], 2)
    return pos.astype(np.int64), w


@dataclass(frozen=True)
class HeadDetection:
    """Head scores on a prompt and on the probe, a label per head, and the evidence.

    Attributes:
        metric: "mul" or "abs" (used for :attr:`scores`; labels always use "mul").
        rows: which query rows the prompt scores average over ("target" or "all").
        exclude_bos: whether key position 0 was zeroed in A before scoring.
        exclude_diagonal: whether A[i, i] was zeroed before scoring.
        scores: kind ("previous_token", "duplicate_token", "induction") -> [n_layers,
            n_heads] score on the prompt with ``metric``.
        mul_scores: the same with the "mul" metric (what the labels use).
        self_attention: [n_layers, n_heads] mean A[i, i] over positions i >= 1.
        entropy: [n_layers, n_heads] mean normalised row entropy in [0, 1].
        probe_induction: [n_layers, n_heads] induction score on the repeated-random-token
            probe (T, batch, seed in :attr:`probe_settings`).
        probe_previous_token: [n_layers, n_heads] previous-token score on the probe.
        copying: [n_layers, n_heads] full-OV copying score Re(Σλ)/Σ|λ| of W_E W_OV W_U.
        labels: [n_layers][n_heads] one label per head (one of ``LABELS``).
        tags: [n_layers][n_heads] every label the head passes.
        example_positions: kind (detection kinds and "self") -> [n_layers, n_heads,
            n_examples, 2] (query position, key position) of the largest A⊙P entries,
            -1 where there are fewer.
        example_weights: kind -> [n_layers, n_heads, n_examples] the attention weights.
        display: display string of each prompt token.
        thresholds: the label thresholds used.
        probe_settings: {"seq_len", "batch", "seed"} of the probe.
    """

    metric: str
    rows: str
    exclude_bos: bool
    exclude_diagonal: bool
    scores: dict[str, np.ndarray]
    mul_scores: dict[str, np.ndarray]
    self_attention: np.ndarray
    entropy: np.ndarray
    probe_induction: np.ndarray
    probe_previous_token: np.ndarray
    copying: np.ndarray
    labels: list[list[str]]
    tags: list[list[list[str]]]
    example_positions: dict[str, np.ndarray]
    example_weights: dict[str, np.ndarray]
    display: list[str]
    thresholds: dict[str, float]
    probe_settings: dict[str, int]

    def examples(self, kind: str, layer: int, head: int) -> list[dict]:
        """The strongest (query token, key token, weight) behind one head's ``kind`` score."""
        if kind not in self.example_positions:
            raise AnalysisError(f"unknown kind {kind!r}; choose one of "
                                f"{', '.join(self.example_positions)}")
        pos, w = self.example_positions[kind][layer, head], self.example_weights[kind][layer, head]
        return [{"query_pos": int(q), "query": self.display[q], "key_pos": int(k),
                 "key": self.display[k], "weight": float(x)}
                for (q, k), x in zip(pos, w) if q >= 0]

    def strongest_induction_head(self) -> tuple[int, int]:
        """(layer, head) with the highest induction score on the probe."""
        flat = int(np.argmax(self.probe_induction))
        return divmod(flat, self.probe_induction.shape[1])

    def heads_labelled(self, label: str) -> list[tuple[int, int]]:
        """(layer, head) of every head whose label is ``label``."""
        return [(layer, head) for layer, row in enumerate(self.labels)
                for head, lab in enumerate(row) if lab == label]


#: The probe's random segment length T (MATH.md), shortened for a shorter context.
PROBE_SEQ_LEN = 50


def probe_bos(lm: LoadedModel) -> Optional[int]:
    """The BOS id the probe starts with (models that always see BOS first), else None."""
    extra = lm.cfg.extra
    return int(extra["bos_token_id"]) if extra.get("prepend_bos") else None


def max_probe_len(lm: LoadedModel) -> int:
    """Longest T such that ``[BOS ;] r ; r`` fits the model's context."""
    return (lm.cfg.n_ctx - (probe_bos(lm) is not None)) // 2


def probe_head_scores(lm: LoadedModel, seq_len: Optional[int] = None, batch: int = 10,
                      seed: int = 0) -> ProbeScores:
    """Induction and previous-token scores on the seeded repeated-random-token probe.

    ``seq_len`` None means T = 50, or the longest T the context holds when that is shorter.
    Models that always see BOS first get it in front of every probe row too.
    """
    if seq_len is None:
        seq_len = min(PROBE_SEQ_LEN, max_probe_len(lm))
    if not isinstance(seq_len, int) or not 2 <= seq_len <= max_probe_len(lm):
        raise AnalysisError(f"probe length must be between 2 and {max_probe_len(lm)}")
    if not isinstance(batch, int) or not 1 <= batch <= 256:
        raise AnalysisError("probe batch must be between 1 and 256")
    bos = probe_bos(lm)
    vocab = ordinary_token_ids(lm.tokenizer.strings, special=[] if bos is None else [bos])
    vocab = vocab[vocab < lm.cfg.d_vocab]
    if vocab.size == 0:
        raise AnalysisError("the vocabulary has no ordinary tokens to draw the probe from")
    return probe_scores(lm.model, vocab, seq_len=seq_len, batch=batch, seed=seed, bos=bos)


def prompt_patterns(lm: LoadedModel, fp: ForwardPass) -> np.ndarray:
    """Every head's pattern on the prompt [n_layers, n_heads, pos, pos] (float64)."""
    return np.stack([fp.cache[f"blocks.{layer}.attn.hook_pattern"].double().numpy()
                     for layer in range(lm.cfg.n_layers)])


def prompt_head_scores(lm: LoadedModel, fp: ForwardPass, kind: str, metric: str = "mul",
                       rows: str = "target", exclude_bos: bool = False,
                       exclude_diagonal: bool = False) -> np.ndarray:
    """[n_layers, n_heads] score of every head on the prompt for one detection ``kind``."""
    return pattern_scores(prompt_patterns(lm, fp), detection_pattern(fp.token_ids, kind),
                          metric, exclude_bos, exclude_diagonal, rows)


def head_detection(lm: LoadedModel, fp: ForwardPass, metric: str = "mul",
                   exclude_bos: bool = False, exclude_diagonal: bool = False,
                   n_examples: int = 5, probe: Optional[ProbeScores] = None,
                   eigen: Optional[CircuitEigenvalues] = None,
                   probe_settings: Optional[dict[str, int]] = None,
                   rows: str = "target") -> HeadDetection:
    """Score and label every head on the prompt, the probe and its OV copying.

    ``rows`` chooses the query rows the prompt scores average over (module docstring);
    labels use the "mul" scores over the same rows.

    ``probe`` (from :func:`probe_head_scores`) and ``eigen`` (from
    :func:`.eigen.circuit_eigenvalues`) are weight-only: pass cached ones to avoid
    recomputing them.
    """
    if metric not in METRICS:
        raise AnalysisError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if rows not in ROWS:
        raise AnalysisError(f"unknown rows {rows!r}; choose one of {', '.join(ROWS)}")
    if not isinstance(n_examples, int) or not 1 <= n_examples <= 100:
        raise AnalysisError("n_examples must be between 1 and 100")
    settings = {"seq_len": None, "batch": 10, "seed": 0, **(probe_settings or {})}
    if probe is None:
        probe = probe_head_scores(lm, **settings)
    settings["seq_len"] = probe.seq_len or settings["seq_len"] or PROBE_SEQ_LEN
    settings["batch"] = int(probe.tokens.shape[0]) if probe.tokens.ndim == 2 else settings["batch"]
    if eigen is None:
        eigen = circuit_eigenvalues(lm)
    patterns = prompt_patterns(lm, fp)
    scores, mul, examples_pos, examples_w = {}, {}, {}, {}
    masked = _masked(patterns, exclude_bos, exclude_diagonal)
    for kind in DETECTION_KINDS:
        det = detection_pattern(fp.token_ids, kind)
        mul[kind] = pattern_scores(patterns, det, "mul", exclude_bos, exclude_diagonal, rows)
        scores[kind] = mul[kind] if metric == "mul" else pattern_scores(
            patterns, det, "abs", exclude_bos, exclude_diagonal, rows)
        examples_pos[kind], examples_w[kind] = _examples(masked * det, n_examples)
    eye = np.eye(patterns.shape[-1])
    eye[0, 0] = 0.0
    examples_pos["self"], examples_w["self"] = _examples(patterns * eye, n_examples)
    self_att = self_scores(patterns)
    entropy = normalised_entropy(patterns)
    copying = eigen.copying["full_ov"]
    labels, tags = label_heads(mul, self_att, entropy, copying)
    return HeadDetection(
        metric=metric, rows=rows, exclude_bos=bool(exclude_bos),
        exclude_diagonal=bool(exclude_diagonal),
        scores=scores, mul_scores=mul, self_attention=self_att, entropy=entropy,
        probe_induction=np.asarray(probe.induction), probe_previous_token=np.asarray(
            probe.previous_token), copying=np.asarray(copying), labels=labels, tags=tags,
        example_positions=examples_pos, example_weights=examples_w, display=list(fp.display),
        thresholds=dict(THRESHOLDS), probe_settings=settings,
    )


def head_examples(result: HeadDetection, lm: LoadedModel, kind: str, layer: int,
                  head: int) -> list[dict]:
    """Range-checked :meth:`HeadDetection.examples`."""
    check_layer_head(lm, layer, head)
    return result.examples(kind, layer, head)


HEAD_DETECTION = declare(
    "head-detection", head_detection, paths=("induction-score",),
    params=[Choice("metric", "mul", METRICS, label="score"),
            Choice("rows", "target", ROWS, label="average over",
                   labels={"target": "rows with a target", "all": "all rows (TransformerLens)"}),
            Int("n_examples", 8, 1, 30, url="n", label="examples"),
            Bool("exclude_bos", False, page=False),
            Bool("exclude_diagonal", False, page=False)],
    needs={"probe": "probe_head_scores", "eigen": "circuit_eigenvalues"},
    to_json=lambda res: {"induction_scores": res.scores["induction"],
                         "probe_induction_scores": res.probe_induction, "result": res})
