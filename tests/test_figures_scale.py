"""Figures stay readable at 256 positions and 144 heads: windows, thinned labels, bounded
heights, layer aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from attention_lens.analysis.attention import attention_pattern, attention_patterns
from attention_lens.analysis.composition import Composition
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.logit_lens import logit_lens
from attention_lens.figures import attention as FA
from attention_lens.figures import heads as FH
from attention_lens.figures import logit_lens as FL

from .conftest import make_tiny

N = 256


@pytest.fixture(scope="module")
def long_pass(tiny_tokenizer):
    lm = make_tiny(tiny_tokenizer, n_ctx=N + 8, n_heads=12, d_head=4, name="long")
    ids = [int(i) for i in np.random.default_rng(0).integers(0, lm.cfg.d_vocab, N)]
    return lm, run_forward(lm, "", token_ids=ids)


def test_logit_lens_grid_opens_on_a_window_of_the_last_positions(long_pass):
    lm, fp = long_pass
    fig = FL.logit_lens_figure(logit_lens(lm, fp, k=3))
    x = fig.layout.xaxis
    assert list(x.range) == [N - FL.WINDOW - 0.5, N - 0.5]
    assert x.rangeslider.visible and fig.layout.dragmode == "pan"
    assert x.nticks <= FL.WINDOW + 1
    assert fig.layout.yaxis.fixedrange  # panning moves the positions only
    assert len(fig.data[0].x) == N  # every position is in the figure, off-window ones too
    assert max(len(t) for row in fig.data[0].text for t in row) <= FL.CELL_CHARS + 8  # escaped
    assert fig.layout.height < 26 * 3 + 400
    short = FL.logit_lens_figure(logit_lens(lm, run_forward(lm, "", token_ids=[1, 2, 3]), k=2))
    assert short.layout.xaxis.range is None and not short.layout.xaxis.rangeslider.visible


def test_long_pattern_fits_the_screen_with_thinned_labels(long_pass):
    lm, fp = long_pass
    fig = FA.attention_figure(attention_pattern(lm, fp, layer=1, head=0))
    assert fig.layout.height <= FA.PATTERN_MAX_HEIGHT
    assert fig.layout.xaxis.nticks == fig.layout.yaxis.nticks == FA.PATTERN_MAX_LABELS


def test_one_layer_of_many_heads_wraps_into_larger_thumbnails(long_pass):
    lm, fp = long_pass
    every = attention_patterns(lm, fp)
    fig = FA.attention_grid_figure(every, [1])
    assert len(fig.data) == 12
    # two rows of six: head 7 sits in the second row, second column
    assert fig.data[7].xaxis == "x8" and fig.layout.xaxis8.domain == fig.layout.xaxis2.domain
    assert fig.layout.yaxis8.domain != fig.layout.yaxis2.domain
    assert fig.layout.height >= 2 * 150


def composition(L: int = 12, H: int = 12) -> Composition:
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(3):
        a = rng.random((L, H, L, H)) * 0.1
        for l1 in range(L):
            a[l1, :, : l1 + 1, :] = np.nan
        arrays.append(a)
    if L > 7:
        arrays[1][3, 4, 7, 2] = 0.9  # a strong K-composition pair
    base = {"Q": 0.05, "K": 0.05, "V": 0.05}
    return Composition(*arrays, baseline=base, baseline_std=base, n_samples=10, seed=0)


def test_composition_of_144_heads_shows_layer_pairs_and_the_strongest_head_pair():
    comp = composition()
    fig = FH.composition_figure(comp, "K")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (11, 11)
    assert z[3, 6] == pytest.approx(0.9)  # layer 3 -> layer 7
    assert fig.data[0].customdata[3][6].startswith("L3H4 → L7H2")
    assert np.isnan(z[5, 2])  # layer 5 cannot write into layer 3
    assert fig.layout.height < 700
    one = FH.composition_figure(comp, "K", source_layer=3)
    assert np.asarray(one.data[0].z).shape == (12, 8 * 12)
    assert one.layout.xaxis.nticks <= FH.COMPOSITION_MAX_HEADS
    small = FH.composition_figure(composition(2, 4), "K")
    assert np.asarray(small.data[0].z).shape == (4, 4)  # few heads: every head pair
