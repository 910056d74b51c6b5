"""Figures of the weight analyses: shapes, template, hover text, export tables."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from attention_lens.analysis.analogy import analogy
from attention_lens.analysis.circuits import circuit_svd
from attention_lens.analysis.composition import composition_scores
from attention_lens.analysis.eigen import attention_spectrum, circuit_eigenvalues
from attention_lens.analysis.embeddings import embedding_pca, nearest_neighbours, project_tokens
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.heads import head_detection, probe_head_scores
from attention_lens.figures import analogy as fa
from attention_lens.figures import eigen as fe
from attention_lens.figures import embeddings as fm
from attention_lens.figures import heads as fh
from attention_lens.figures import theme
from attention_lens.figures import weights as fw
from attention_lens.figures.theme import TEMPLATE

PROMPT = "Harry Potter went to the shop, and Harry Potter bought a wand."


def _check(fig: go.Figure, n_traces: int | None = None) -> None:
    assert isinstance(fig, go.Figure)
    layout = fig.layout.template.layout  # the app's dark template, not plotly's white one
    assert layout.paper_bgcolor == theme.PAPER and layout.plot_bgcolor == theme.BACKGROUND
    if n_traces is not None:
        assert len(fig.data) == n_traces
    for trace in fig.data:
        if trace.hoverinfo != "skip":
            assert trace.hovertemplate and "<extra>" in trace.hovertemplate
    json.loads(fig.to_json())  # serialisable for Dash


@pytest.fixture
def fp(tiny):
    return run_forward(tiny, PROMPT)


def _luminance(hex_colour: str) -> float:
    r, g, b = (int(hex_colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_template_is_registered_and_dark():
    import plotly.io as pio

    t = pio.templates[TEMPLATE].layout
    assert _luminance(t.paper_bgcolor) < 0.25 and _luminance(t.plot_bgcolor) < 0.25
    assert _luminance(t.font.color) > 0.75  # light text on the dark background
    assert pio.templates["plotly"].layout.paper_bgcolor != t.paper_bgcolor


def test_weight_figures(tiny):
    svd = circuit_svd(tiny, "OV", n_directions=2, top_k=3)
    fig = fw.singular_values_figure(svd, [(0, 1), (1, 2)])
    _check(fig, 2)
    np.testing.assert_allclose(fig.data[1].y, svd.singular_values[1, 2])
    _check(fw.svd_norms_figure(svd), 1)
    fig = fw.svd_directions_figure(svd, 1, 0)
    _check(fig, 2)
    assert np.asarray(fig.data[1].z).shape == (2, 3)


def test_eigen_figures(tiny, fp):
    spec = attention_spectrum(tiny, fp)
    fig = fe.attention_spectrum_figure(spec, 1, 2)
    _check(fig, 1)
    assert sorted(fig.data[0].y, reverse=True) == list(fig.data[0].y)
    assert "A[i, i]" in fig.layout.title.text
    res = circuit_eigenvalues(tiny)
    fig = fe.circuit_eigenvalues_figure(res, 0, 3)
    _check(fig, 4)
    np.testing.assert_allclose(fig.data[1].x, res.full_ov[0, 3].real)
    fig = fe.copying_scores_figure(res)
    _check(fig, 2)
    np.testing.assert_allclose(fig.data[0].z, res.copying["full_ov"])


def test_head_figures(tiny, fp):
    res = head_detection(tiny, fp, probe=probe_head_scores(tiny, seq_len=10, batch=2))
    _check(fh.head_scores_figure(res), 6)
    fig = fh.head_labels_figure(res, res.labels)
    assert fig.data[0].text is not None
    _check(fig)
    ex = res.examples("previous_token", 1, 1)
    _check(fh.head_examples_figure(ex, 1, 1, "previous_token"), 1)
    comp = composition_scores(tiny, n_samples=8)
    fig = fh.composition_figure(comp, "K")
    _check(fig, 1)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (4, 4)  # layer-0 heads (rows) x layer-1 heads (columns)
    np.testing.assert_allclose(z[1, 2], comp.k[0, 1, 1, 2])
    assert "baseline" in fig.layout.title.text


def test_composition_figure_one_layer(tiny_tokenizer):
    from tests.conftest import make_tiny

    lm = make_tiny(tiny_tokenizer, n_layers=1)
    fig = fh.composition_figure(composition_scores(lm, n_samples=4), "Q")
    assert len(fig.data) == 0 and fig.layout.annotations


def test_embedding_figures(tiny, fp):
    pca = embedding_pca(tiny, token_filter="all", max_tokens=None, n_clusters=3)
    prompt = project_tokens(tiny, pca, fp.token_ids)
    fig = fm.embedding_scatter_figure(pca, prompt)
    _check(fig, 3 + 1)
    assert all(isinstance(t, go.Scattergl) for t in fig.data)
    assert sum(len(t.x) for t in fig.data[:3]) == tiny.cfg.d_vocab
    assert len(fig.data[3].x) == fp.n_tokens
    _check(fm.explained_variance_figure(pca), 2)
    nb = nearest_neighbours(tiny, 5, k=4)
    _check(fm.neighbours_figure(nb), 1)
    _check(fm.neighbours_figure(None), 0)


def test_analogy_figure(model_2l):
    res = analogy(model_2l, ["king", "woman"], ["man"], top_k=4)
    fig = fa.analogy_figure(res)
    _check(fig, 1)
    np.testing.assert_allclose(fig.data[0].x, res.scores)
    assert "king" in fig.layout.title.text and "man" in fig.layout.title.text
