"""Side-by-side comparison of two prompts, or of two models that share a tokenizer.

Each side is a (model, prompt) forward pass. For each side: the per-token loss, the top-k
next-token predictions at a position, one head's attention pattern, the logit lens
(probability of a target token after each layer, LayerNorm recomputed per stage) and the
direct logit attribution of the target at that position. Differences are always B − A:
per-token loss over the positions both sides have, next-token probabilities of every token
in either top-k, the head's pattern (same length only), the lens over stages both models
have, and the attribution over components both models have. The target defaults to A's top
prediction at A's position, so both sides explain the same token.

In-context learning (Olsson et al. 2022): :func:`loss_by_position` gives the mean
next-token loss at every position over dataset windows (or the repeated-random-token
probe), and :func:`icl_score` the loss at a late position minus the loss at an early one
(negative: later tokens are predicted better thanks to the context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .attribution import logit_attribution
from .errors import AnalysisError
from .forward import ForwardPass
from .logit_lens import lens_stages, stage_logits
from .predictions import TokenLike, check_k, check_position, next_token, token_id


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> Optional[str]:
    """None when ``a`` and ``b`` tokenize alike, else the reason they do not."""
    if a is b:
        return None
    ha, hb = getattr(a.tokenizer, "hf", None), getattr(b.tokenizer, "hf", None)
    if ha is not None and hb is not None:
        if ha.to_str() == hb.to_str():
            return None
        va, vb = ha.get_vocab(with_added_tokens=True), hb.get_vocab(with_added_tokens=True)
        if va == vb:
            return None
        return (f"{a.name} and {b.name} use different tokenizers ({len(va):,} and {len(vb):,} "
                "tokens): positions, losses and predictions cannot be lined up token by "
                "token. Compare two prompts on one model, or two models with the same "
                "tokenizer.")
    if a.tokenizer.strings == b.tokenizer.strings:
        return None
    return f"{a.name} and {b.name} use different tokenizers"


def token_losses(fp: ForwardPass) -> np.ndarray:
    """[pos - 1] next-token loss −ln p(t_{k+1} | t_≤k) for k = 0 .. pos − 2 (float64)."""
    lp = fp.logits.double().log_softmax(-1)
    nxt = torch.as_tensor(fp.token_ids[1:], dtype=torch.long)
    return (-lp[:-1].gather(-1, nxt[:, None]).squeeze(-1)).numpy()


@dataclass(frozen=True)
class Side:
    """One (model, prompt) of a comparison.

    Attributes:
        model: the model's name.
        text: the prompt as analysed.
        display: [pos] display strings of its tokens.
        token_ids: [pos] token ids.
        loss: [pos - 1] loss of the token at position k+1 given the tokens up to k.
        position: the position predictions, lens and attribution are read at.
        top_ids, top_display, top_probs: [k] next-token predictions at ``position``.
        pattern: [pos, pos] attention pattern of the compared head (None when the model has
            no such head).
        lens_labels: [S] logit-lens stages ("embeddings", "after L0", ...).
        lens_probs: [S] probability of the target at ``position`` at each stage.
        dla_labels: [C] attribution components; dla_values: [C] their attribution.
        logit: the target's logit at ``position`` (what the attributions explain, minus b_U).
    """

    model: str
    text: str
    display: tuple[str, ...]
    token_ids: np.ndarray
    loss: np.ndarray
    position: int
    top_ids: np.ndarray
    top_display: tuple[str, ...]
    top_probs: np.ndarray
    pattern: Optional[np.ndarray]
    lens_labels: tuple[str, ...]
    lens_probs: np.ndarray
    dla_labels: tuple[str, ...]
    dla_values: np.ndarray
    logit: float

    @property
    def n_tokens(self) -> int:
        """Tokens on this side."""
        return len(self.display)

    @property
    def mean_loss(self) -> float:
        """Mean per-token loss (NaN for a one-token prompt)."""
        return float(self.loss.mean()) if self.loss.size else float("nan")


@dataclass(frozen=True)
class Comparison:
    """Two sides and their differences (B − A).

    Attributes:
        mode: "prompts" (one model, two prompts), "models" (one prompt, two models) or
            "both".
        a, b: the two sides.
        layer, head: the head whose patterns are compared.
        target_id, target_display: the token the lens and attributions follow.
        n_common: positions both prompts have (differences cover the first ``n_common``).
        loss_diff: [n_common - 1] b.loss − a.loss at the shared positions.
        prob_ids: [m] every token in either side's top-k; prob_display: their strings.
        prob_a, prob_b, prob_diff: [m] their next-token probabilities and B − A.
        pattern_diff: [pos, pos] B − A of the head's pattern (None unless both sides have the
            head and the same number of tokens).
        lens_labels: [S'] stages both models have; lens_diff: [S'] B − A target probability.
        dla_labels: [C'] components both models have; dla_diff: [C'] B − A attribution.
        notes: what could not be compared, and why.
    """

    mode: str
    a: Side
    b: Side
    layer: int
    head: int
    target_id: int
    target_display: str
    n_common: int
    loss_diff: np.ndarray
    prob_ids: np.ndarray
    prob_display: tuple[str, ...]
    prob_a: np.ndarray
    prob_b: np.ndarray
    prob_diff: np.ndarray
    pattern_diff: Optional[np.ndarray]
    lens_labels: tuple[str, ...]
    lens_diff: np.ndarray
    dla_labels: tuple[str, ...]
    dla_diff: np.ndarray
    notes: tuple[str, ...] = field(default=())


def _side(lm: LoadedModel, fp: ForwardPass, position: int, k: int, layer: int, head: int,
          target: int) -> Side:
    pos = check_position(fp, position)
    nt = next_token(lm, fp, k=k, position=pos)
    pattern = None
    if layer < lm.cfg.n_layers and head < lm.cfg.n_heads:
        pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head].double().numpy()
    stages = lens_stages(lm, "layer")
    lens_probs = np.array([float(stage_logits(lm, fp.cache[hook][pos:pos + 1]).double()
                                 .log_softmax(-1)[0, target].exp()) for _, hook in stages])
    dla = logit_attribution(lm, fp, target=target, position=pos)
    return Side(model=lm.name, text=fp.text, display=tuple(fp.display),
                token_ids=np.asarray(fp.token_ids), loss=token_losses(fp), position=pos,
                top_ids=nt.token_ids, top_display=tuple(nt.display), top_probs=nt.probs,
                pattern=pattern, lens_labels=tuple(label for label, _ in stages),
                lens_probs=lens_probs, dla_labels=dla.labels,
                dla_values=dla.values, logit=dla.logit)


def _matched(labels_a: tuple[str, ...], va: np.ndarray, labels_b: tuple[str, ...],
             vb: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    index_b = {lab: i for i, lab in enumerate(labels_b)}
    common = [lab for lab in labels_a if lab in index_b]
    ia = [labels_a.index(lab) for lab in common]
    ib = [index_b[lab] for lab in common]
    return tuple(common), np.asarray(vb)[ib] - np.asarray(va)[ia]


def _stage(label: str) -> str:
    return label.replace(" (final)", "")


def compare(lm_a: LoadedModel, fp_a: ForwardPass, lm_b: LoadedModel, fp_b: ForwardPass, *,
            layer: int = 0, head: int = 0, position: int = -1, k: int = 10,
            target: Optional[TokenLike] = None) -> Comparison:
    """Compare (lm_a, fp_a) with (lm_b, fp_b); see the module docstring.

    ``position`` is read on each side (−1: each prompt's last token). Raises an
    :class:`AnalysisError` when the models tokenize differently or the head exists in
    neither model.
    """
    reason = same_tokenizer(lm_a, lm_b)
    if reason:
        raise AnalysisError(reason)
    for name, v in (("layer", layer), ("head", head)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise AnalysisError(f"{name} must be a whole number ≥ 0")
    k = min(check_k(lm_a, k), check_k(lm_b, k))
    notes = []
    if not any(layer < m.cfg.n_layers and head < m.cfg.n_heads for m in (lm_a, lm_b)):
        raise AnalysisError(f"head L{layer}H{head} exists in neither model ({lm_a.name}: "
                            f"{lm_a.cfg.n_layers} × {lm_a.cfg.n_heads}, {lm_b.name}: "
                            f"{lm_b.cfg.n_layers} × {lm_b.cfg.n_heads})")
    same_model = lm_a is lm_b or lm_a.name == lm_b.name
    same_text = list(fp_a.token_ids) == list(fp_b.token_ids)
    if same_model and same_text:
        notes.append("both sides are the same model and prompt: every difference is 0")
    mode = "prompts" if same_model else ("models" if same_text else "both")
    pos_a = check_position(fp_a, position)
    tid = int(fp_a.logits[pos_a].argmax()) if target is None else token_id(lm_a, target)
    a = _side(lm_a, fp_a, position, k, layer, head, tid)
    b = _side(lm_b, fp_b, position, k, layer, head, tid)
    n_common = min(a.n_tokens, b.n_tokens)
    if a.n_tokens != b.n_tokens:
        notes.append(f"the prompts have {a.n_tokens} and {b.n_tokens} tokens: loss "
                     f"differences cover the first {n_common} positions, and the attention "
                     "patterns are shown side by side without a difference")
    loss_diff = b.loss[:n_common - 1] - a.loss[:n_common - 1]
    probs_a = fp_a.logits[a.position].double().softmax(-1)
    probs_b = fp_b.logits[b.position].double().softmax(-1)
    ids = list(dict.fromkeys([*a.top_ids.tolist(), *b.top_ids.tolist()]))
    prob_a, prob_b = probs_a[ids].numpy(), probs_b[ids].numpy()
    pattern_diff = None
    if a.pattern is None or b.pattern is None:
        missing = lm_a.name if a.pattern is None else lm_b.name
        notes.append(f"{missing} has no head L{layer}H{head}: only the other side's pattern "
                     "is shown")
    elif a.n_tokens == b.n_tokens:
        pattern_diff = b.pattern - a.pattern
    lens_labels, lens_diff = _matched(tuple(map(_stage, a.lens_labels)), a.lens_probs,
                                      tuple(map(_stage, b.lens_labels)), b.lens_probs)
    dla_labels, dla_diff = _matched(a.dla_labels, a.dla_values, b.dla_labels, b.dla_values)
    if len(dla_labels) < max(len(a.dla_labels), len(b.dla_labels)):
        notes.append("the models have different components: attribution differences cover "
                     "the components both have")
    return Comparison(
        mode=mode, a=a, b=b, layer=int(layer), head=int(head), target_id=tid,
        target_display=lm_a.tokenizer.display(tid), n_common=n_common, loss_diff=loss_diff,
        prob_ids=np.asarray(ids, dtype=np.int64),
        prob_display=tuple(lm_a.tokenizer.display(i) for i in ids), prob_a=prob_a,
        prob_b=prob_b, prob_diff=prob_b - prob_a, pattern_diff=pattern_diff,
        lens_labels=lens_labels, lens_diff=lens_diff, dla_labels=dla_labels, dla_diff=dla_diff,
        notes=tuple(notes))


# -------------------------------------------------------------- in-context learning
@dataclass(frozen=True)
class LossByPosition:
    """Mean next-token loss at every position over a set of sequences.

    Attributes:
        model: the model's name.
        source: what the sequences are ("validation: 400 windows ...", "probe T=50 ...").
        loss: [pos - 1] mean loss of predicting token k+1 from tokens ≤ k, indexed by the
            predicted token's position k+1 = 1 .. pos-1 (``positions``).
        positions: [pos - 1] the predicted token's position.
        n_sequences: sequences averaged.
    """

    model: str
    source: str
    loss: np.ndarray
    positions: np.ndarray
    n_sequences: int

    def at(self, position: int) -> float:
        """Mean loss of the token at ``position`` (1 .. pos-1)."""
        if not 1 <= position <= int(self.positions[-1]):
            raise AnalysisError(f"position must be between 1 and {int(self.positions[-1])}")
        return float(self.loss[position - 1])


#: Logits of one batch of sequences stay under this many numbers (64 MiB of float32): a
#: GPT-2-sized vocabulary then runs two 128-token windows at a time, not 64 (3 GB).
LOSS_ELEMENTS = 2 ** 24


def loss_by_position(lm: LoadedModel, tokens: np.ndarray, source: str = "",
                     batch_size: Optional[int] = None,
                     progress: Optional[Callable[[float], None]] = None) -> LossByPosition:
    """Mean next-token loss at each position over ``tokens`` [n, pos] (float64 sums).

    ``batch_size``: sequences per forward pass (default: as many as keep the batch's logits
    under :data:`LOSS_ELEMENTS`, at most 64).
    """
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise AnalysisError("need at least one sequence of two or more tokens")
    batch_size = batch_size or max(1, min(64, LOSS_ELEMENTS // (t.shape[1] * lm.cfg.d_vocab)))
    total = torch.zeros(t.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, t.shape[0], batch_size):
            nll = lm.model.loss(t[start:start + batch_size], per_token=True)
            total += nll.double().sum(0).cpu()
            if progress is not None:
                progress(min(1.0, (start + batch_size) / t.shape[0]))
    return LossByPosition(model=lm.name, source=source, loss=(total / t.shape[0]).numpy(),
                          positions=np.arange(1, t.shape[1]), n_sequences=int(t.shape[0]))


def default_icl_positions(length: int) -> tuple[int, int]:
    """(early, late) token positions for the in-context-learning score of ``length``-token
    windows: Olsson et al.'s 50th and 500th tokens of 512, scaled (12 and 125 for 128)."""
    early = max(1, length // 10)
    late = max(early + 1, length - 1 - length // 50)
    return early, min(late, length - 1)


@dataclass(frozen=True)
class IclScore:
    """In-context-learning score: mean loss at ``late`` minus mean loss at ``early``."""

    model: str
    early: int
    late: int
    loss_early: float
    loss_late: float

    @property
    def score(self) -> float:
        """loss_late − loss_early (nats; more negative: more in-context learning)."""
        return self.loss_late - self.loss_early


def icl_score(curve: LossByPosition, early: Optional[int] = None,
              late: Optional[int] = None) -> IclScore:
    """Olsson et al.'s in-context-learning score on a loss-by-position curve."""
    d_early, d_late = default_icl_positions(int(curve.positions[-1]) + 1)
    early = d_early if early is None else int(early)
    late = d_late if late is None else int(late)
    if not early < late:
        raise AnalysisError(f"the early position ({early}) must come before the late one "
                            f"({late})")
    return IclScore(model=curve.model, early=early, late=late, loss_early=curve.at(early),
                    loss_late=curve.at(late))


@dataclass(frozen=True)
class IclView:
    """Loss-by-position curves of several models over dataset windows and over the probe.

    Attributes:
        dataset: one curve per model over the dataset's windows.
        probe: one curve per model over the repeated-random-token probe [r ; r].
        scores: the in-context-learning score of each model on the dataset.
        probe_len: T, the probe's random segment length (its repeat starts at position T,
            plus one after a BOS).
        probe_halves: model -> (mean loss on the first half, on the repeated half), over the
            same predicted positions as :class:`~attention_lens.analysis.probe.ProbeScores`.
    """

    dataset: tuple[LossByPosition, ...]
    probe: tuple[LossByPosition, ...]
    scores: tuple[IclScore, ...]
    probe_len: int
    probe_halves: dict[str, tuple[float, float]]


def probe_halves(curve: LossByPosition, seq_len: int, bos: bool = False) -> tuple[float, float]:
    """Mean loss on the probe's first half and on its repeated half (the repeat's first token,
    which nothing predicts, left out)."""
    b = int(bos)
    return (float(curve.loss[b: b + seq_len - 1].mean()),
            float(curve.loss[seq_len + b:].mean()))


def icl_view(models: list[LoadedModel], window_tokens: np.ndarray, dataset_label: str,
             probe_tokens: np.ndarray, probe_len: int, probe_bos: bool = False,
             early: Optional[int] = None, late: Optional[int] = None,
             progress: Optional[Callable[[float], None]] = None) -> IclView:
    """Every model's loss by position over the windows and the probe, and its ICL score."""
    if not models:
        raise AnalysisError("no model to compare")
    for lm in models[1:]:
        reason = same_tokenizer(models[0], lm)
        if reason:
            raise AnalysisError(reason)
    n = len(models)
    dataset, probe = [], []
    for i, lm in enumerate(models):
        def report(f: float, i: int = i) -> None:
            if progress is not None:
                progress((i + f) / n)
        dataset.append(loss_by_position(lm, window_tokens, source=dataset_label,
                                        progress=report))
        probe.append(loss_by_position(lm, probe_tokens, source=f"probe [r ; r], T = {probe_len}"))
    return icl_from_curves(dataset, probe, probe_len, probe_bos, early, late)


def icl_from_curves(dataset: list[LossByPosition], probe: list[LossByPosition], probe_len: int,
                    probe_bos: bool = False, early: Optional[int] = None,
                    late: Optional[int] = None) -> IclView:
    """The in-context-learning view of curves already computed (e.g. cached ones)."""
    scores = tuple(icl_score(c, early, late) for c in dataset)
    halves = {c.model: probe_halves(c, probe_len, probe_bos) for c in probe}
    return IclView(dataset=tuple(dataset), probe=tuple(probe), scores=scores,
                   probe_len=probe_len, probe_halves=halves)
