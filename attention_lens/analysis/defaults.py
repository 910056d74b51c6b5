"""Defaults chosen from the prompt: the head, position and token that show what a page is for.

A page opens on the phenomenon it exists for, on the reader's own prompt, and says what it
chose. On a prompt that repeats itself that is induction: the strongest induction head on
this prompt, a position in the repeated part whose next token an induction head can copy
from the earlier copy, and that actual next token. Elsewhere the model card's head and the
last position are the fallbacks. Every choice carries a sentence saying why.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .errors import AnalysisError
from .forward import ForwardPass
from .heads import PATTERN_THRESHOLD, prompt_head_scores
from .predictions import check_position

#: A prompt "repeats itself" when at least this many positions have an earlier copy of
#: their token followed by the same next token (what an induction head can copy).
MIN_REPEATED = 3
#: Heads listed beside the figure.
N_RANKED = 5
#: A preset holds every head scoring at least this fraction of the strongest head's score
#: on the prompt, and at least :data:`PRESET_FLOOR`.
PRESET_RELATIVE = 0.5
PRESET_FLOOR = 0.2


@dataclass(frozen=True)
class HeadChoice:
    """The head a page opens on, the score that chose it, and the runners-up.

    Attributes:
        layer: the chosen head's layer.
        head: its index in the layer.
        kind: what chose it: "induction", "copying", "writer" or "previous_token" (scores
            on this prompt),
            "card" (the model card's strongest induction head on the probe) or "first".
        score: the chosen head's score on this prompt (None for "card" and "first").
        reason: a sentence saying why this head is shown.
        ranking: [(layer, head, score)] the strongest heads by the same score, best first.
    """

    layer: int
    head: int
    kind: str
    score: Optional[float]
    reason: str
    ranking: tuple[tuple[int, int, float], ...]


@dataclass(frozen=True)
class PositionChoice:
    """The position a page opens on and the token it follows there.

    Attributes:
        position: the query position (0-based).
        target_id: the token that actually comes next (None at the last position).
        earlier: the position of the earlier copy of the token at ``position`` whose next
            token was the same (None when the prompt does not repeat there).
        reason: a sentence saying why this position is shown.
    """

    position: int
    target_id: Optional[int]
    earlier: Optional[int]
    reason: str


def repeated_positions(token_ids: np.ndarray) -> np.ndarray:
    """Positions i < n-1 whose token t_i occurred before at some j with t_{j+1} = t_{i+1}.

    These are the positions where an induction head can predict the next token by copying
    what followed the earlier copy: the "repeated part" of a prompt.
    """
    t = np.asarray(token_ids)
    n = t.shape[0]
    if n < 3:
        return np.zeros(0, dtype=np.int64)
    pairs = np.stack([t[:-1], t[1:]], -1)  # [n-1, 2] (t_i, t_{i+1})
    same = (pairs[:, None, :] == pairs[None, :, :]).all(-1)  # [n-1, n-1]
    earlier = np.tril(same, k=-1).any(-1)
    return np.flatnonzero(earlier).astype(np.int64)


def repeats(token_ids: np.ndarray) -> bool:
    """Whether the prompt repeats itself enough for induction to show."""
    return repeated_positions(token_ids).size >= MIN_REPEATED


def _ranked(scores: np.ndarray, n: int = N_RANKED) -> tuple[tuple[int, int, float], ...]:
    flat = np.where(np.isnan(scores), -np.inf, scores).ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    H = scores.shape[1]
    return tuple((int(i // H), int(i % H), float(flat[i])) for i in order
                 if np.isfinite(flat[i]))


def card_head(lm: LoadedModel) -> Optional[tuple[int, int]]:
    """The strongest induction head on the probe named in the model card, if any."""
    probe = ((lm.card or {}).get("evaluation", {}) or {}).get("induction_probe", {}) or {}
    layer, head = probe.get("max_layer"), probe.get("max_head")
    if isinstance(layer, int) and isinstance(head, int) and 0 <= layer < lm.cfg.n_layers \
            and 0 <= head < lm.cfg.n_heads:
        return layer, head
    return None


def strongest_head(lm: LoadedModel, fp: ForwardPass) -> HeadChoice:
    """The head that shows what this prompt shows best.

    A prompt that repeats itself: the head with the highest induction score on it
    (averaged over the query rows that have a target). Otherwise, when the model's next
    token is confident: the copying head (:func:`copying_head`) if that token occurs earlier
    in the prompt, else the head writing most directly toward it (:func:`writer_head`).
    Otherwise the model card's strongest induction head on the probe, else the strongest
    previous-token head on the prompt.
    """
    if repeats(fp.token_ids):
        scores = prompt_head_scores(lm, fp, "induction", rows="target")
        ranking = _ranked(scores)
        if ranking and ranking[0][2] >= PATTERN_THRESHOLD / 2:
            layer, head, score = ranking[0]
            return HeadChoice(layer, head, "induction", score,
                              f"L{layer}H{head}: the strongest induction head on this prompt "
                              f"(induction score {score:.2f} on its repeated part)", ranking)
    copying = copying_head(lm, fp)
    if copying is not None:
        return copying
    writer = writer_head(lm, fp)
    if writer is not None:
        return writer
    prev = prompt_head_scores(lm, fp, "previous_token", rows="target") \
        if fp.n_tokens > 1 else np.zeros((lm.cfg.n_layers, lm.cfg.n_heads))
    card = card_head(lm)
    if card is not None:
        layer, head = card
        why = (f"no head reaches an induction score of {PATTERN_THRESHOLD / 2:.2f} on this "
               "prompt's repeated part" if repeats(fp.token_ids) else
               "this prompt does not repeat itself")
        return HeadChoice(layer, head, "card", None,
                          f"L{layer}H{head}: the model card's strongest induction head on "
                          f"repeated random tokens ({why})", _ranked(prev))
    ranking = _ranked(prev)
    if ranking:
        layer, head, score = ranking[0]
        return HeadChoice(layer, head, "previous_token", score,
                          f"L{layer}H{head}: the strongest previous-token head on this prompt "
                          f"(score {score:.2f})", ranking)
    return HeadChoice(0, 0, "first", None, "L0H0: the first head (the prompt is one token)",
                      ())


#: The model is confident of its next token at the last position when its top token has at
#: least this probability; a prompt "copies" when, besides, that token occurs earlier in it
#: ...
COPY_MIN_PROB = 0.3
#: ... and the head writing most directly toward it attends from the last position to its
#: earlier copies with at least this weight (a copying head, e.g. a name mover).
COPY_MIN_ATTENTION = 0.3


def copying_head(lm: LoadedModel, fp: ForwardPass) -> Optional[HeadChoice]:
    """On a prompt whose next token is copied from earlier in it (the indirect object of
    "When Mary and John went to the store, John gave a drink to"), the head that writes most
    directly toward that token at the last position (direct logit attribution) while
    attending to its earlier copy: a copying, name-mover head. None elsewhere."""
    from .attribution import logit_attribution  # imports this module's neighbours

    n = fp.n_tokens
    if n < 3:
        return None
    t = np.asarray(fp.token_ids)
    probs = fp.logits[n - 1].double().softmax(-1)
    top = int(probs.argmax())
    earlier = np.flatnonzero(t[: n - 1] == top)
    if earlier.size == 0 or float(probs[top]) < COPY_MIN_PROB:
        return None
    dla = logit_attribution(lm, fp, target=top, position=n - 1).heads  # [L, H]
    att = np.stack([fp.cache[f"blocks.{la}.attn.hook_pattern"][:, n - 1].double().numpy()
                    [:, earlier].sum(-1) for la in range(lm.cfg.n_layers)])  # [L, H]
    score = np.where(att >= COPY_MIN_ATTENTION, dla, -np.inf)
    ranking = _ranked(np.where(np.isfinite(score), score, np.nan))
    if not ranking or ranking[0][2] <= 0:
        return None
    layer, head, value = ranking[0]
    word = lm.tokenizer.display(top)
    return HeadChoice(layer, head, "copying", value,
                      f"L{layer}H{head}: the head that writes most directly toward the "
                      f"predicted '{word}' (p = {float(probs[top]):.2f}; direct logit "
                      f"attribution {value:+.2f}) while attending to its earlier copy at "
                      f"position {int(earlier[-1])} (weight {float(att[layer, head]):.2f}): "
                      "it copies the token from the prompt", ranking)


def _top_prediction(fp: ForwardPass) -> tuple[int, float]:
    """The model's top next token at the last position and its probability."""
    probs = fp.logits[fp.n_tokens - 1].double().softmax(-1)
    top = int(probs.argmax())
    return top, float(probs[top])


def writer_head(lm: LoadedModel, fp: ForwardPass) -> Optional[HeadChoice]:
    """On a prompt whose next token the model is confident of (p >= :data:`COPY_MIN_PROB`,
    e.g. " Paris" after "The capital of France is"), the head whose output at the last
    position has the largest direct logit attribution to that token (MATH.md: the head's
    output dotted with W_U[:, token], through the final normalisation's scale of the real
    forward pass): the head that most directly writes the prediction. Its reason names the
    token it attends to most from the last position (on a fact, often the subject). None
    when the model is not confident or no head writes toward its prediction."""
    from .attribution import logit_attribution  # imports this module's neighbours

    n = fp.n_tokens
    if n < 2:
        return None
    top, p = _top_prediction(fp)
    if p < COPY_MIN_PROB:
        return None
    dla = logit_attribution(lm, fp, target=top, position=n - 1).heads  # [L, H]
    ranking = _ranked(dla)
    if not ranking or ranking[0][2] <= 0:
        return None
    layer, head, value = ranking[0]
    row = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head, n - 1].double().numpy()
    key = int(np.argmax(row))
    where = (f"it attends most to '{fp.display[key]}' at position {key} "
             f"(weight {float(row[key]):.2f})" if key < n - 1 else
             f"it attends most to the last token itself (weight {float(row[key]):.2f})")
    word = lm.tokenizer.display(top)
    return HeadChoice(layer, head, "writer", value,
                      f"L{layer}H{head}: the head that writes most directly toward the "
                      f"predicted '{word}' (p = {p:.2f}; direct logit attribution {value:+.2f} "
                      f"at the last position); from there {where}", ranking)


def focus_position(fp: ForwardPass) -> PositionChoice:
    """A position in the repeated part of the prompt, and the token that comes next there.

    Among the repeated positions, the one where the model's probability of the actual next
    token rose most over what it gave the same token after the earlier copy (what
    induction buys); the last position when the prompt does not repeat itself.
    """
    n = fp.n_tokens
    t = np.asarray(fp.token_ids)
    positions = repeated_positions(t)
    if positions.size == 0:
        return PositionChoice(n - 1, None, None,
                              f"position {n - 1}, the last one: the model's next-token "
                              "guess (this prompt does not repeat itself)")
    logp = fp.logits[: n - 1].double().log_softmax(-1)
    nxt = np.asarray(t[1:], dtype=np.int64)
    prob = logp[np.arange(n - 1), nxt].exp().numpy()  # [n-1] p(t_{i+1} | t_<=i)
    best, best_gain, best_earlier = int(positions[0]), -np.inf, None
    for i in positions.tolist():
        j = next(j for j in range(i) if t[j] == t[i] and t[j + 1] == t[i + 1])
        gain = float(prob[i] - prob[j])
        if gain > best_gain:
            best, best_gain, best_earlier = i, gain, j
    here, nxt_tok = fp.display[best], fp.display[best + 1]
    return PositionChoice(best, int(t[best + 1]), best_earlier,
                          f"position {best} '{here}', in the repeated part: '{nxt_tok}' also "
                          f"followed '{here}' at position {best_earlier}; the model gives it "
                          f"p = {prob[best]:.2f} here against {prob[best_earlier]:.2f} after "
                          "the earlier copy")


def head_presets(lm: LoadedModel, fp: ForwardPass) -> dict[str, list[tuple[int, int]]]:
    """Sets of heads to ablate together, from their scores on this prompt.

    "induction": every head whose induction score on the prompt (over the rows that have a
    target) is at least half the strongest head's and at least 0.2; "previous-token":
    likewise for previous-token scores. Induction heads come in redundant groups, so
    ablating one of them alone barely changes the output.
    """
    out: dict[str, list[tuple[int, int]]] = {}
    for name, kind in (("induction", "induction"), ("previous-token", "previous_token")):
        if fp.n_tokens < 2:
            out[name] = []
            continue
        s = np.nan_to_num(prompt_head_scores(lm, fp, kind, rows="target"), nan=0.0)
        cut = max(PRESET_FLOOR, PRESET_RELATIVE * float(s.max()))
        out[name] = [(int(la), int(h)) for la, h in zip(*np.nonzero(s >= cut))]
    return out


def preset_heads(lm: LoadedModel, fp: ForwardPass, preset: str
                 ) -> tuple[list[tuple[int, int]], str]:
    """The heads of ``preset`` (see :func:`head_presets`) and a sentence saying why; when no
    head reaches the preset's floor on this prompt, the single strongest head of that kind."""
    heads = head_presets(lm, fp).get(preset)
    if heads is None:
        raise AnalysisError(f"unknown preset {preset!r}: use induction or previous-token")
    if heads:
        return heads, f"all {preset} heads of this prompt"
    if fp.n_tokens < 2:
        raise AnalysisError("the prompt has one token: no head has a score on it")
    kind = preset.replace("-", "_")
    s = np.nan_to_num(prompt_head_scores(lm, fp, kind, rows="target"), nan=0.0)
    layer, head = (int(i) for i in np.unravel_index(int(np.argmax(s)), s.shape))
    return [(layer, head)], (f"the strongest {preset} head of this prompt (score "
                             f"{float(s[layer, head]):.2f}; no head reaches "
                             f"{PRESET_FLOOR} on it)")


def chosen_position(fp: ForwardPass, position: Optional[int]) -> PositionChoice:
    """The position to use: ``position`` when given (a pinned or typed one), else
    :func:`focus_position`; the token that actually comes next there, if any."""
    if position is None:
        return focus_position(fp)
    pos = check_position(fp, position)
    nxt = int(fp.token_ids[pos + 1]) if pos + 1 < fp.n_tokens else None
    why = (f"position {pos} '{fp.display[pos]}', the one you chose" if nxt is not None else
           f"position {pos} '{fp.display[pos]}', the last one: no token comes after it")
    return PositionChoice(pos, nxt, None, why)


@dataclass(frozen=True)
class PairChoice:
    """A clean/corrupted pair a page opens on, its answers and a sentence saying why.

    Attributes:
        clean, corrupted: the two prompts (of one token length in the model's tokenizer).
        correct, wrong: the answers (text of one token each).
        reason: a sentence saying what the pair is and how the model answers it.
    """

    clean: str
    corrupted: str
    correct: str
    wrong: str
    reason: str


#: Pairs tried, in order, on a model the shipped models' measured example does not fit:
#: (name, clean, corrupted, correct, wrong). Indirect-object identification (Wang et al.
#: 2022): the corrupted prompt repeats the other name, so the answer flips.
PAIR_EXAMPLES = (
    ("the indirect-object pair (Wang et al. 2022)",
     "When Mary and John went to the store, John gave a drink to",
     "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
)


def _last_logits(lm: LoadedModel, prompts: list[list[int]]) -> torch.Tensor:
    """The logits at the last position of prompts of one length [b, d_vocab] (float64): the
    model's blocks on every position, its final norm and unembedding on the last row only,
    on one thread (a short batch is many small products; see ``one_thread``)."""
    from .circuit.sparse import one_thread

    model = lm.model
    with torch.no_grad(), one_thread():
        tokens = model._as_batch(torch.tensor(prompts, dtype=torch.long))
        resid = model.embed(tokens)
        if model.cfg.positional_embedding_type == "standard":
            resid = resid + model.pos_embed(tokens)
        for block in model.blocks:
            resid = block(resid)
        row = resid[:, -1]
        if model.cfg.normalization_type:
            row = model.ln_final(row)
        return model.unembed(row).double()


#: :func:`answered_pair`'s answers, per model object (freed with it) and limit: pages that
#: open on the pair ask on every visit, and each answer costs two forward passes.
_ANSWERED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_ANSWERED_LOCK = threading.Lock()


def answered_pair(lm: LoadedModel, limit: Optional[int] = None) -> Optional[PairChoice]:
    """The first of :data:`PAIR_EXAMPLES` that fits ``lm`` and that it answers: both prompts
    of one length within its context (and ``limit`` tokens), each answer one token, the clean
    prompt's top prediction the correct answer and the corrupted prompt's logit of the wrong
    answer above the correct one's (the corruption flips the answer). None when none does.
    Computed once per model and limit."""
    key = (lm.name, limit)
    with _ANSWERED_LOCK:
        memo = _ANSWERED.setdefault(lm.model, {})
        if key in memo:
            return memo[key]
    pair = _answered_pair(lm, limit)
    with _ANSWERED_LOCK:
        memo[key] = pair
    return pair


def _answered_pair(lm: LoadedModel, limit: Optional[int]) -> Optional[PairChoice]:
    from .patching import pair_tokens  # patching's own checks of a pair

    n = min(lm.cfg.n_ctx, limit or lm.cfg.n_ctx)
    for name, clean, corrupted, correct, wrong in PAIR_EXAMPLES:
        try:
            a, b = pair_tokens(lm, clean, corrupted)
        except AnalysisError:
            continue
        answers = [lm.tokenizer.encode(w) for w in (correct, wrong)]
        if len(a) > n or any(len(t) != 1 for t in answers):
            continue
        c, w = answers[0][0], answers[1][0]
        logits = _last_logits(lm, [a, b])
        probs = logits.softmax(-1)
        if int(logits[0].argmax()) != c or not logits[1, w] > logits[1, c]:
            continue
        return PairChoice(clean, corrupted, correct, wrong,
                          f"The page opens on {name}, which {lm.name} answers: "
                          f"'{correct.strip()}' with p = {float(probs[0, c]):.2f} on the clean "
                          f"prompt, '{wrong.strip()}' over it on the corrupted one "
                          f"(p = {float(probs[1, w]):.2f} against {float(probs[1, c]):.2f}).")
    return None
