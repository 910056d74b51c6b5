"""The vocabulary of patching: granularities, directions, metrics and path-patching
variants; the metric read on the logits; checks of a choice and of a position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import torch

from ..errors import AnalysisError

Granularity = Literal["resid_pre", "attn_out", "mlp_out", "head_out", "head_out_by_pos",
                      "head_q", "head_k", "head_v", "head_pattern"]
#: Granularities, in the order a page lists them.
GRANULARITIES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head_out",
                                  "head_out_by_pos", "head_q", "head_k", "head_v",
                                  "head_pattern")
#: What each granularity patches (for labels and help text).
GRANULARITY_LABELS: dict[str, str] = {
    "resid_pre": "residual stream before each layer × position",
    "attn_out": "attention output of each layer × position",
    "mlp_out": "MLP output of each layer × position",
    "head_out": "each head's output (z) over all positions",
    "head_out_by_pos": "each head's output (z) × position",
    "head_q": "each head's query over all positions",
    "head_k": "each head's key over all positions",
    "head_v": "each head's value over all positions",
    "head_pattern": "each head's attention pattern over all positions",
}
#: Axis names of each granularity's grid (TransformerLens' order).
GRID_AXES: dict[str, tuple[str, ...]] = {
    "resid_pre": ("layer", "pos"), "attn_out": ("layer", "pos"), "mlp_out": ("layer", "pos"),
    "head_out": ("layer", "head"), "head_out_by_pos": ("layer", "pos", "head"),
    "head_q": ("layer", "head"), "head_k": ("layer", "head"), "head_v": ("layer", "head"),
    "head_pattern": ("layer", "head"),
}
Direction = Literal["denoising", "noising"]
DIRECTIONS: tuple[str, ...] = ("denoising", "noising")
MetricKind = Literal["logit_diff", "normalized", "logprob", "kl"]
METRICS: tuple[str, ...] = ("logit_diff", "normalized", "logprob", "kl")
METRIC_LABELS: dict[str, str] = {
    "logit_diff": "logit difference (correct − wrong)",
    "normalized": "normalised logit difference (clean = 1, corrupted = 0)",
    "logprob": "log-probability of the correct token",
    "kl": "KL divergence to the clean distribution (nats)",
}
LnMode = Literal["recomputed", "frozen"]
MlpMode = Literal["recomputed", "frozen"]
#: Path-patching variants: what the MLPs between sender and receiver do.
MLP_MODES: tuple[str, ...] = ("recomputed", "frozen")
MLP_MODE_LABELS: dict[str, str] = {
    "recomputed": "MLPs recomputed (Wang et al.)",
    "frozen": "MLPs frozen (the sender's change only)",
}
COMPONENTS: tuple[str, ...] = ("q", "k", "v")

ProgressFn = Callable[[int, int], None]

@dataclass(frozen=True)
class Metric:
    """A patching metric on the logits at one position.

    ``logit_diff``: logit[correct] − logit[wrong]; ``normalized``: the same mapped so that the
    clean run gives 1 and the corrupted run 0; ``logprob``: log p(correct); ``kl``:
    KL(p_clean || p) in nats.
    """

    kind: str
    position: int
    correct: Optional[int]
    wrong: Optional[int]
    clean_ld: float = 0.0
    corrupted_ld: float = 0.0
    clean_logprobs: Optional[torch.Tensor] = field(default=None, repr=False)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Metric of logit rows [..., d_vocab] at the metric position -> [...]."""
        if self.kind in ("logit_diff", "normalized"):
            ld = logits[..., self.correct] - logits[..., self.wrong]
            if self.kind == "logit_diff":
                return ld
            return (ld - self.corrupted_ld) / (self.clean_ld - self.corrupted_ld)
        lp = logits.log_softmax(-1)
        if self.kind == "logprob":
            return lp[..., self.correct]
        ref = self.clean_logprobs.to(lp)
        return (ref.exp() * (ref - lp)).sum(-1)

    def of_rows(self, rows: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor  # noqa: N803
                ) -> torch.Tensor:
        """Metric of final (normalised) residual rows [B, d]: a logit difference needs only
        its two columns of W_U."""
        if self.kind in ("logit_diff", "normalized"):
            cols = torch.tensor([self.correct, self.wrong], device=rows.device)
            two = rows @ W_U[:, cols] + b_U[cols]
            ld = two[:, 0] - two[:, 1]
            if self.kind == "logit_diff":
                return ld
            return (ld - self.corrupted_ld) / (self.clean_ld - self.corrupted_ld)
        return self(rows @ W_U + b_U)

    def on_full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of a model's output logits [batch, pos, d_vocab] (TransformerLens style)."""
        return self(logits[:, self.position]).squeeze(0)


def _check_choice(value: str, options: tuple[str, ...], what: str) -> str:
    if value not in options:
        raise AnalysisError(f"{what} must be one of {', '.join(options)}; got {value!r}")
    return value


def _check_position(position: int, n: int) -> int:
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise AnalysisError(f"position must be a whole number, got {position!r}")
    if not -n <= int(position) < n:
        raise AnalysisError(f"position {position} is outside the prompts: they have {n} tokens "
                            f"(positions 0 to {n - 1}, or -1 for the last)")
    return int(position) % n

