"""Clean/corrupted prompt pairs: one pair's tokens, and sets of pairs read from CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from ...model.checkpoint import LoadedModel
from ...model.jsonfile import JsonFileError, loads_bounded
from ..errors import AnalysisError
from ..forward import tokenize
from ..predictions import TokenLike
from .terms import DIRECTIONS, METRICS

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



# ------------------------------------------------------------------ the pair scope's input
#: The request fields of an analysis of scope pair (:mod:`..declare`): one pair, or a set.
PAIR_FIELDS = frozenset({"clean", "corrupted", "correct", "wrong", "metric", "direction",
                         "position", "pairs"})
_ONE = ("clean", "corrupted", "correct", "wrong")


def _plain(prompt: Prompt) -> Union[str, tuple[int, ...]]:
    return prompt if isinstance(prompt, str) else tuple(int(i) for i in prompt)


@dataclass(frozen=True)
class PairInput:
    """What an analysis of scope pair reads: one clean/corrupted pair or a set of pairs
    (``is_set``), the metric, its direction and position. ``n_tokens`` is the longest pair's
    token length (its cost is estimated from it). ``stored``: the content hash under which
    an uploaded set is kept in the shared store; it is then the set's identity in the cache
    key and all a job's request carries of it (never the set's text)."""

    pairs: tuple[PromptPair, ...]
    metric: str = "logit_diff"
    direction: str = "denoising"
    position: int = -1
    is_set: bool = False
    n_tokens: int = 0
    stored: str = ""

    @property
    def pair(self) -> PromptPair:
        """The one pair (of a set: the first)."""
        return self.pairs[0]

    def args(self) -> dict:
        """Keywords of the analyses of one pair (clean, corrupted, answers, metric)."""
        p = self.pair
        return dict(clean=p.clean, corrupted=p.corrupted, correct=p.correct, wrong=p.wrong,
                    metric=self.metric, direction=self.direction, position=self.position)

    def key(self) -> tuple:
        """The part of a cache key this input gives (equal inputs, equal keys)."""
        pairs = ("stored", self.stored) if self.stored else \
            tuple((_plain(p.clean), _plain(p.corrupted), p.correct, p.wrong)
                  for p in self.pairs)
        return (self.is_set, self.metric, self.direction, self.position, pairs)

    def to_json(self) -> str:
        """Canonical JSON of the input (a job's request carries it; a stored set by its
        content hash only)."""
        which: dict = {"stored": self.stored} if self.stored else {
            "pairs": [[_plain(p.clean), _plain(p.corrupted), p.correct, p.wrong]
                      for p in self.pairs]}
        return json.dumps({**which, "metric": self.metric, "direction": self.direction,
                           "position": self.position, "is_set": self.is_set,
                           "n_tokens": self.n_tokens}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, load: Optional[Callable[[str], str]] = None
                  ) -> "PairInput":
        """The input :meth:`to_json` wrote; ``load(hash)`` gives a stored set's text."""
        d = json.loads(text)
        if "stored" in d:
            if load is None:
                raise AnalysisError("a stored set of pairs needs the store to be read")
            pairs = tuple(parse_pairs(load(d["stored"])))
        else:
            pairs = tuple(PromptPair(c if isinstance(c, str) else list(c),
                                     r if isinstance(r, str) else list(r), a, w)
                          for c, r, a, w in d["pairs"])
        return cls(pairs, d["metric"], d["direction"], d["position"], d["is_set"],
                   d["n_tokens"], d.get("stored", ""))

    @classmethod
    def one(cls, lm: LoadedModel, clean: Prompt, corrupted: Prompt, correct: TokenLike,
            wrong: Optional[TokenLike] = None, metric: str = "logit_diff",
            direction: str = "denoising", position: int = -1,
            limit: Optional[int] = None) -> "PairInput":
        """One pair, tokenized (AnalysisError when its prompts differ in length or exceed
        ``limit`` tokens)."""
        ids, _ = pair_tokens(lm, clean, corrupted)
        if limit is not None and len(ids) > limit:
            raise AnalysisError(f"the prompts have {len(ids)} tokens; this server analyses at "
                                f"most {limit}")
        return cls((PromptPair(clean, corrupted, correct, wrong),), metric, direction,
                   position, False, len(ids))

    @classmethod
    def stored_set(cls, lm: LoadedModel, text: str, digest: str, metric: str = "logit_diff",
                   direction: str = "denoising", position: int = -1) -> "PairInput":
        """An uploaded set of pairs (its CSV or JSON ``text``), kept in the shared store under
        its content hash ``digest`` (a job's request carries only that)."""
        pairs = parse_pairs(text)
        longest = max(len(pair_tokens(lm, p.clean, p.corrupted)[0]) for p in pairs)
        return cls(tuple(pairs), metric, direction, position, True, longest, digest)

    @classmethod
    def read(cls, body: Mapping, lm: LoadedModel, limit: int) -> "PairInput":
        """The input of a request ``body`` (strict: a ParamError naming the field)."""
        from ..declare import ParamError, read_choice, read_int, read_text, read_token

        metric = read_choice(body, "metric", "logit_diff", METRICS)
        direction = read_choice(body, "direction", "denoising", DIRECTIONS)
        if "pairs" in body:
            extra = sorted(k for k in _ONE if k in body)
            if extra:
                raise ParamError(f"send either 'pairs' or one pair, not both (got 'pairs' and "
                                 f"{', '.join(map(repr, extra))})")
            pairs = body["pairs"]
            if not isinstance(pairs, (list, str)):
                raise ParamError("'pairs' must be a list of objects (clean, corrupted, correct, "
                                 "wrong) or CSV text with those columns")
            parsed = parse_pairs(pairs if isinstance(pairs, str) else json.dumps(pairs))
            longest = 0
            for i, pair in enumerate(parsed, start=1):
                try:
                    ids, _ = pair_tokens(lm, pair.clean, pair.corrupted)
                except AnalysisError as exc:
                    raise ParamError(f"pair {i}: {exc}") from None
                if len(ids) > limit:
                    raise ParamError(f"pair {i} has {len(ids)} tokens; this server analyses at "
                                     f"most {limit}")
                longest = max(longest, len(ids))
            position = read_int(body, "position", -1, -lm.cfg.n_ctx, lm.cfg.n_ctx - 1)
            return cls(tuple(parsed), metric, direction, position, True, longest)
        texts = [read_text(body, key, f"the {key} prompt") for key in ("clean", "corrupted")]
        ids, _ = pair_tokens(lm, *texts)
        if len(ids) > limit:
            raise ParamError(f"the prompts have {len(ids)} tokens; this server analyses at "
                             f"most {limit}")
        correct = read_token(body, "correct")
        if correct is None and metric != "kl":  # KL reads no answer token
            raise ParamError("missing field 'correct' (the answer token the clean prompt "
                             "should predict)")
        position = read_int(body, "position", -1, -len(ids), len(ids) - 1,
                            f" (the prompts have {len(ids)} tokens)")
        return cls((PromptPair(texts[0], texts[1], correct, read_token(body, "wrong")),),
                   metric, direction, position, False, len(ids))
