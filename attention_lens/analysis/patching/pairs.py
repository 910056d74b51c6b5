"""Clean/corrupted prompt pairs: one pair's tokens, and sets of pairs read from CSV or JSON."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ...model.checkpoint import LoadedModel
from ...model.jsonfile import JsonFileError, loads_bounded
from ..errors import AnalysisError
from ..forward import tokenize
from ..predictions import TokenLike

#: Most pairs a set of pairs may hold (each pair costs a full grid).
MAX_PAIRS = 100
#: Most characters of an uploaded set of pairs.
MAX_PAIR_FILE_CHARS = 1_000_000

#: A prompt: text, or token ids.
Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupted prompt of the same token length, and the answer tokens."""

    clean: Prompt
    corrupted: Prompt
    correct: TokenLike
    wrong: Optional[TokenLike] = None


def _prompt_ids(lm: LoadedModel, name: str, prompt: Prompt) -> tuple[list[int], int]:
    if isinstance(prompt, str):
        try:
            return tokenize(lm, prompt)
        except AnalysisError as exc:
            raise AnalysisError(f"{name} prompt: {exc}") from None
    try:
        ids = [int(i) for i in prompt]
    except (TypeError, ValueError):
        raise AnalysisError(f"the {name} prompt must be text or a list of token ids") from None
    if not ids:
        raise AnalysisError(f"{name} prompt: no tokens")
    if any(not 0 <= i < lm.cfg.d_vocab for i in ids):
        raise AnalysisError(f"{name} prompt: token ids must lie in [0, {lm.cfg.d_vocab})")
    return ids[:lm.cfg.n_ctx], max(0, len(ids) - lm.cfg.n_ctx)


def pair_tokens(lm: LoadedModel, clean: Prompt, corrupted: Prompt) -> tuple[list[int],
                                                                           list[int]]:
    """Token ids of both prompts (text, or token ids); refuse pairs of different length with
    where they differ."""
    ids = []
    for name, prompt in (("clean", clean), ("corrupted", corrupted)):
        tok, dropped = _prompt_ids(lm, name, prompt)
        if dropped:
            raise AnalysisError(f"the {name} prompt has {len(tok) + dropped} tokens, more than "
                                f"the model's context of {lm.cfg.n_ctx}")
        ids.append(tok)
    a, b = ids
    if len(a) != len(b):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        disp = lm.tokenizer.display
        where = (f"they first differ at position {first} "
                 f"({disp(a[first]) if first < len(a) else 'end'!r} vs "
                 f"{disp(b[first]) if first < len(b) else 'end'!r})")
        raise AnalysisError(f"the clean prompt has {len(a)} tokens and the corrupted prompt "
                            f"{len(b)}; a pair must have the same token length ({where})")
    return a, b


# ------------------------------------------------------------------------ sets of pairs
def parse_pairs(text: str) -> list[PromptPair]:
    """Read a set of pairs from CSV (header clean, corrupted, correct, wrong) or JSON (a list
    of objects with those keys)."""
    if not isinstance(text, str) or not text.strip():
        raise AnalysisError("the set of pairs is empty")
    if len(text) > MAX_PAIR_FILE_CHARS:
        raise AnalysisError(f"the file holds {len(text):,} characters; at most "
                            f"{MAX_PAIR_FILE_CHARS:,} are read")
    need = ("clean", "corrupted", "correct", "wrong")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            rows = loads_bounded(text, 16)
        except JsonFileError as exc:
            raise AnalysisError(f"the JSON could not be read: {exc}") from None
        if isinstance(rows, dict):
            rows = rows.get("pairs")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise AnalysisError("the JSON must be a list of objects with keys "
                                "clean, corrupted, correct, wrong")
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in need if c not in header]
        if missing:
            raise AnalysisError(f"the CSV lacks the column(s) {', '.join(missing)}; its header "
                                f"must name clean, corrupted, correct, wrong (found: "
                                f"{', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise AnalysisError(f"the CSV could not be read: {exc}") from None
    if not rows:
        raise AnalysisError("the set of pairs holds no rows")
    if len(rows) > MAX_PAIRS:
        raise AnalysisError(f"the set holds {len(rows):,} pairs; at most {MAX_PAIRS} are "
                            f"analysed at once (each pair is a full patching grid): split it")
    pairs = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in need if not isinstance(row.get(c), str)]
        if missing:
            raise AnalysisError(f"pair {i} lacks {', '.join(missing)} (each value must be text)")
        pairs.append(PromptPair(row["clean"], row["corrupted"], row["correct"], row["wrong"]))
    return pairs

