"""What patching returns: a grid, path patching from one sender or every sender, and a
set of pairs' grids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

@dataclass(frozen=True)
class PatchingGrid:
    """An activation-patching grid with its attribution-patching estimate.

    Attributes:
        granularity: one of :data:`GRANULARITIES`.
        axes: names of the grid's axes (``("layer", "pos")``, ``("layer", "pos", "head")``
            or ``("layer", "head")``).
        direction: "denoising" (clean into corrupted) or "noising" (corrupted into clean).
        metric: one of :data:`METRICS`.
        values: grid of the metric after each patch (TransformerLens' order of axes).
        attribution: same shape: base metric + (a_source − a_base) · ∂m/∂a on the base run.
        base_metric: metric of the unpatched base run.
        clean_metric: metric of the clean run.
        corrupted_metric: metric of the corrupted run.
        correlation: Pearson correlation of exact and attribution effects (NaN if constant).
        position: the metric's position.
        correct_id: the correct answer token (None for KL when none was given).
        wrong_id: the wrong answer token (None for log-probability and KL).
        clean_display: [pos] display strings of the clean prompt.
        corrupted_display: [pos] display strings of the corrupted prompt.
        n_runs: patched runs the grid stands for (one per cell).
        n_computed: patched runs actually computed (the rest changed an activation to an
            identical value, or could not reach the metric position, so equal the base).
    """

    granularity: str
    axes: tuple[str, ...]
    direction: str
    metric: str
    values: np.ndarray
    attribution: np.ndarray
    base_metric: float
    clean_metric: float
    corrupted_metric: float
    correlation: float
    position: int
    correct_id: Optional[int]
    wrong_id: Optional[int]
    clean_display: tuple[str, ...]
    corrupted_display: tuple[str, ...]
    n_runs: int
    n_computed: int

    def __post_init__(self) -> None:  # noqa: D105
        assert self.values.shape == self.attribution.shape
        assert self.values.ndim == len(self.axes)

    @property
    def effect(self) -> np.ndarray:
        """Exact change of the metric caused by each patch."""
        return self.values - self.base_metric

    @property
    def attribution_effect(self) -> np.ndarray:
        """Attribution-patching estimate of that change."""
        return self.attribution - self.base_metric


@dataclass(frozen=True)
class PathPatching:
    """Path patching from one sender head into every later receiver and into the logits.

    Attributes:
        sender: (layer, head) of the sender.
        direction: "denoising" or "noising".
        metric: one of :data:`METRICS`.
        ln_mode: "recomputed" (receivers' LayerNorm uses its patched input's statistics) or
            "frozen" (the base run's scale; TransformerLens' direct-path linearisation).
        mlps: "recomputed" (the MLPs between sender and receiver run on the patched residual
            stream, every other head frozen; Wang et al.) or "frozen" (only the sender's
            change reaches the receiver).
        values: [n_layers, n_heads, 3] metric after patching the sender's output into each
            receiver's query, key, value input (NaN for receivers not after the sender).
        direct: metric after patching the sender's output into the final residual stream only.
        base_metric: metric of the base run.
        clean_metric: metric of the clean run.
        corrupted_metric: metric of the corrupted run.
    """

    sender: tuple[int, int]
    direction: str
    metric: str
    ln_mode: str
    values: np.ndarray
    direct: float
    base_metric: float
    clean_metric: float
    corrupted_metric: float
    mlps: str = "recomputed"


@dataclass(frozen=True)
class PathPatchingTable:
    """Every sender × receiver × {Q, K, V} path, and every sender's direct effect.

    Attributes:
        values: [n_layers, n_heads, n_layers, n_heads, 3] metric after patching the path
            (sender layer, sender head, receiver layer, receiver head, q/k/v); NaN where the
            receiver is not after the sender.
        direct: [n_layers, n_heads] metric after patching each sender into the logits only.
        base_metric: metric of the base run.
        direction: "denoising" or "noising".
        metric: one of :data:`METRICS`.
        ln_mode: "recomputed" or "frozen".
        mlps: "recomputed" or "frozen" (see :class:`PathPatching`).
    """

    values: np.ndarray
    direct: np.ndarray
    base_metric: float
    direction: str
    metric: str
    ln_mode: str
    mlps: str = "recomputed"


@dataclass(frozen=True)
class PairSetPatching:
    """One granularity's grid over a set of pairs: per-pair grids and their mean.

    Attributes:
        granularity: one of :data:`GRANULARITIES`.
        axes: names of the grid's axes.
        per_pair: [n_pairs, *grid] metric after each patch, per pair.
        per_pair_attribution: [n_pairs, *grid] attribution-patching estimates.
        mean: [*grid] mean over pairs.
        mean_attribution: [*grid] mean of the estimates.
        base_metrics: [n_pairs] base metric of each pair.
        clean_metrics: [n_pairs] clean metric of each pair.
        corrupted_metrics: [n_pairs] corrupted metric of each pair.
        correlation: Pearson correlation of exact and attribution effects over every cell of
            every pair.
        grids: the per-pair :class:`PatchingGrid` results.
    """

    granularity: str
    axes: tuple[str, ...]
    per_pair: np.ndarray
    per_pair_attribution: np.ndarray
    mean: np.ndarray
    mean_attribution: np.ndarray
    base_metrics: np.ndarray
    clean_metrics: np.ndarray
    corrupted_metrics: np.ndarray
    correlation: float
    grids: tuple[PatchingGrid, ...]

