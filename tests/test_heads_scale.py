"""Strongest head examples come from a partial selection that equals a full stable sort."""

from __future__ import annotations

import numpy as np

from attention_lens.analysis.heads import _top_indices


def test_top_indices_equal_a_full_stable_sort_ties_included():
    rng = np.random.default_rng(0)
    for trial in range(300):
        size = int(rng.integers(1, 600))
        a = rng.integers(0, 4, size=(2, 3, size)).astype(float)  # many ties, zeros
        if trial % 3 == 0:
            a = rng.random(a.shape)
        n = min(int(rng.integers(1, 12)), size)
        ref = np.argsort(-a, axis=-1, kind="stable")[..., :n]
        np.testing.assert_array_equal(_top_indices(a, n), ref)
