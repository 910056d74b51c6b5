"""A validated pair and metric with its base and source runs and the engine on the base run."""

from __future__ import annotations

from typing import Optional

import torch

from ...model.checkpoint import LoadedModel
from ..errors import AnalysisError
from ..predictions import TokenLike, token_id
from .engine import _Engine
from .pairs import Prompt, pair_tokens
from .runs import _run
from .terms import DIRECTIONS, METRIC_LABELS, METRICS, Metric, _check_choice, _check_position

class _Setup:
    """Validated pair, metric, base/source runs and the engine."""

    def __init__(self, lm: LoadedModel, clean: Prompt, corrupted: Prompt,
                 correct: Optional[TokenLike],
                 wrong: Optional[TokenLike], metric: str, direction: str,
                 position: int) -> None:
        self.kind = _check_choice(metric, METRICS, "metric")
        self.direction = _check_choice(direction, DIRECTIONS, "direction")
        clean_ids, corrupted_ids = pair_tokens(lm, clean, corrupted)
        self.clean_ids, self.corrupted_ids = clean_ids, corrupted_ids
        n_tok = len(clean_ids)
        self.position = _check_position(position, n_tok)
        self.n = self.position + 1
        a = None
        if self.kind != "kl" and correct is None:
            raise AnalysisError(f"the {METRIC_LABELS[self.kind]} needs a correct answer token")
        if self.kind != "kl" or (correct is not None and correct != ""):
            # KL compares whole distributions: it reads no answer token
            try:
                a = token_id(lm, correct)
            except AnalysisError as exc:
                raise AnalysisError(f"correct answer: {exc}") from None
        b = None
        if self.kind in ("logit_diff", "normalized"):
            if wrong is None or wrong == "":
                raise AnalysisError("a logit difference needs a wrong answer token too")
            try:
                b = token_id(lm, wrong)
            except AnalysisError as exc:
                raise AnalysisError(f"wrong answer: {exc}") from None
            if a == b:
                raise AnalysisError(f"the correct and the wrong answer are the same token "
                                    f"({lm.tokenizer.display(a)!r}); choose two different ones")
        self.lm = lm
        with torch.no_grad():
            self.clean = _run(lm, clean_ids, self.n)
            self.corrupted = _run(lm, corrupted_ids, self.n)
            lc, lr = self.clean.logits.float(), self.corrupted.logits.float()
            ld_c = float(lc[a] - lc[b]) if b is not None else 0.0
            ld_r = float(lr[a] - lr[b]) if b is not None else 0.0
            if self.kind == "normalized" and ld_c == ld_r:
                raise AnalysisError("the clean and corrupted prompts give the same logit "
                                    "difference, so it cannot be normalised; use the plain "
                                    "logit difference")
            self.metric = Metric(kind=self.kind, position=self.position, correct=a, wrong=b,
                                 clean_ld=ld_c, corrupted_ld=ld_r,
                                 clean_logprobs=lc.log_softmax(-1))
            self.clean_metric = float(self.metric(self.clean.logits))
            self.corrupted_metric = float(self.metric(self.corrupted.logits))
        if self.direction == "denoising":
            self.base, self.source = self.corrupted, self.clean
            self.base_ids, self.source_ids = corrupted_ids, clean_ids
            self.base_metric = self.corrupted_metric
        else:
            self.base, self.source = self.clean, self.corrupted
            self.base_ids, self.source_ids = clean_ids, corrupted_ids
            self.base_metric = self.clean_metric
        self.n_tokens = n_tok
        self.engine = _Engine(lm, self.base, self.metric, self.n)

