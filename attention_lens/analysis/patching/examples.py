"""The page's default example and what fills the boxes a user leaves empty: a shorter pair
on models the measured one does not fit, a corrupted prompt, the answers."""

from __future__ import annotations

from typing import Optional

from ...model.checkpoint import LoadedModel
from ..errors import AnalysisError
from ..forward import tokenize
from .pairs import Prompt, pair_tokens
from .runs import _run
from .terms import _check_position

#: The default example (found by measuring on attn-only-2l): the second half repeats the
#: first, and the corrupted prompt changes the earlier copy of the last token (" h" of
#: " holiday" becomes " and"), so no earlier token is followed by " h": the induction heads
#: have nothing to copy, and the model says " house" instead of " holiday".
DEFAULT_CLEAN = (" Anna gave Peter a red book about ancient Rome before the winter holiday."
                 " Anna gave Peter a red book about ancient Rome before the winter h")
DEFAULT_CORRUPTED = (" Anna gave Peter a red book about ancient Rome before the winter andoliday."
                     " Anna gave Peter a red book about ancient Rome before the winter h")
DEFAULT_CORRECT, DEFAULT_WRONG = "olid", "ouse"
#: Replacement words tried (in order) when the corrupted prompt is left to the page.
REPLACEMENTS = (" and", " the", " of", " a", " to", " in")


#: The sentence a shorter default is built from, on models the measured example does not fit.
SHORT_SENTENCE = " Anna gave Peter a red book about ancient Rome before the winter holiday."


def default_fits(lm: LoadedModel, limit: Optional[int] = None) -> bool:
    """Whether the measured default example (pair and answers) fits ``lm``: both prompts within
    its context (and ``limit`` tokens), of one length, and each answer a single token."""
    n = min(lm.cfg.n_ctx, limit or lm.cfg.n_ctx)
    try:
        a, b = pair_tokens(lm, DEFAULT_CLEAN, DEFAULT_CORRUPTED)
    except AnalysisError:
        return False
    answers = [lm.tokenizer.encode(w) for w in (DEFAULT_CORRECT, DEFAULT_WRONG)]
    return len(a) <= n and all(len(t) == 1 for t in answers)


def short_default(lm: LoadedModel, limit: Optional[int] = None) -> tuple[str, str]:
    """A (clean, corrupted) pair in ``lm``'s tokenizer that fits its context: the first k
    words of :data:`SHORT_SENTENCE`, then the same words again but the last (so the next word
    is the one an induction head would copy); the corrupted prompt changes the earlier copy of
    the last word, as the measured example does."""
    n = min(lm.cfg.n_ctx, limit or lm.cfg.n_ctx)
    words = SHORT_SENTENCE.split()
    for k in range(len(words), 2, -1):
        first, second = words[:k], words[:k - 1]
        clean = " " + " ".join(first + second)
        ids, dropped = tokenize(lm, clean)
        if dropped or len(ids) > n:
            continue
        for word in REPLACEMENTS:
            changed = list(first)
            changed[k - 2] = word.strip()
            corrupted = " " + " ".join(changed + second)
            if len(tokenize(lm, corrupted)[0]) == len(ids):
                return clean, corrupted
    raise AnalysisError("this model's context is too short for a default example; type a "
                        "clean and a corrupted prompt")


def corrupt_one_token(lm: LoadedModel, clean: str) -> tuple[str, int, int, int]:
    """The clean prompt with one token changed: the earlier copy of the last token (what an
    induction head would attend next to), else the token before the last. Returns the text,
    the position, the old and the new token id."""
    ids, dropped = tokenize(lm, clean)
    if dropped:
        raise AnalysisError(f"the clean prompt has {len(ids) + dropped} tokens, more than the "
                            f"model's context of {lm.cfg.n_ctx}")
    if len(ids) < 2:
        raise AnalysisError("the clean prompt needs at least two tokens to corrupt one")
    earlier = [i for i in range(len(ids) - 1) if ids[i] == ids[-1]]
    spots = ([earlier[-1]] if earlier else []) + [len(ids) - 2]
    for c in spots:
        for word in REPLACEMENTS:
            new = lm.tokenizer.encode(word)
            if len(new) != 1 or new[0] == ids[c]:
                continue
            cand = list(ids)
            cand[c] = new[0]
            text = lm.tokenizer.decode(cand)
            if tokenize(lm, text)[0] == cand:
                return text, c, ids[c], new[0]
    raise AnalysisError("could not change one token of the clean prompt and keep its length; "
                        "type the corrupted prompt")


def pair_predictions(lm: LoadedModel, clean: Prompt, corrupted: Prompt, position: int = -1,
                     k: int = 5) -> tuple[list[int], list[int]]:
    """The top-k next tokens of the clean and of the corrupted prompt at ``position``."""
    a, b = pair_tokens(lm, clean, corrupted)
    pos = _check_position(position, len(a))
    out = []
    for ids in (a, b):
        logits = _run(lm, ids, pos + 1).logits
        out.append([int(i) for i in logits.topk(min(k, lm.cfg.d_vocab)).indices])
    return out[0], out[1]


def default_answers(lm: LoadedModel, clean: Prompt, corrupted: Prompt, position: int = -1
                    ) -> tuple[int, int]:
    """Correct = the clean prompt's top prediction; wrong = the corrupted prompt's top
    prediction (its second when both agree)."""
    top_c, top_r = pair_predictions(lm, clean, corrupted, position, k=2)
    wrong = top_r[0] if top_r[0] != top_c[0] else top_r[1]
    return top_c[0], wrong

