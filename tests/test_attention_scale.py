"""The all-heads attention grid stays usable on models with many heads and long prompts."""

from __future__ import annotations

import sys

import dash
import numpy as np
import pytest

from attention_lens.analysis.attention import attention_patterns
from attention_lens.server.app import create_app
from attention_lens.components import page as P
from attention_lens.figures.attention import GRID_MAX_POSITIONS, attention_grid_figure, pooled
from attention_lens.registry import DEFAULT_WEIGHTS, Registry

from .conftest import make_tiny


def test_pooling_keeps_the_block_maximum():
    n = 250
    z = np.tril(np.random.default_rng(0).random((2, n, n)))
    z[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = np.nan
    out, labels, is_pooled = pooled(z, [str(i) for i in range(n)])
    assert is_pooled and out.shape[-1] <= GRID_MAX_POSITIONS and len(labels) == out.shape[-1]
    b = -(-n // GRID_MAX_POSITIONS)
    assert out[1, 3, 2] == np.nanmax(z[1, 3 * b:4 * b, 2 * b:3 * b])
    assert labels[0] == f"0–{b - 1}"
    same, _, flag = pooled(z[:, :40, :40], [str(i) for i in range(40)])
    assert not flag and same.shape == (2, 40, 40)


@pytest.fixture(scope="module")
def big(tiny_tokenizer):
    """8 layers x 8 heads (64 heads) with a 200-token context."""
    return make_tiny(tiny_tokenizer, n_layers=8, n_heads=8, d_head=4, n_ctx=200, name="big")


def test_grid_shows_one_layer_of_a_big_model_and_pools_long_prompts(big, tiny_tokenizer):
    reg = Registry([DEFAULT_WEIGHTS])
    reg.add(big)
    create_app(reg)
    page = sys.modules[next(k for k, p in dash.page_registry.items()
                            if p["path"] == "/attention")]
    spec = P.spec_of("attention")
    text = "Harry Potter went to the shop. " * 30
    state = {"model": "big", "text": text, "pos": None}
    d = spec.render(state, layer=5)
    grid, entropy = d.figures["all-heads"], d.figures["entropy"]
    assert d.errors == []
    assert len(grid.data) == 8  # one layer's heads, not all 64
    assert "Layer 5 of 8" in grid.layout.title.text and "max-pooled" in grid.layout.title.text
    assert len(grid.data[0].x) <= GRID_MAX_POSITIONS
    assert np.asarray(entropy.data[0].z).shape == (8, 8)  # entropy keeps every head
    # clicking the third thumbnail of that row selects layer 5, head 2
    click = {"points": [{"curveNumber": 2}]}
    assert page.select_head(click, None, state, 5) == (5, 2)
    # the shipped 24-head model keeps the full grid
    full = spec.render({"model": "attn-only-2l", "text": "Harry Potter", "pos": None}
                       ).figures["all-heads"]
    assert len(full.data) == 24


def test_grid_figure_rows_follow_the_layers(big):
    fp_reg = Registry([DEFAULT_WEIGHTS])
    fp_reg.add(big)
    every = attention_patterns(big, fp_reg.forward("Harry Potter and Hermione", "big"))
    assert len(attention_grid_figure(every).data) == 64
    fig = attention_grid_figure(every, [0, 7])
    assert len(fig.data) == 16 and fig.data[8].hovertemplate.startswith("L7H0")
