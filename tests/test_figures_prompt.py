"""Figures of the per-prompt analyses: shapes, masking, hover text and export tables."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from attention_lens.analysis import run_forward
from attention_lens.analysis.ablation import ablate_heads
from attention_lens.analysis.attention import attention_pattern, attention_patterns
from attention_lens.analysis.attribution import logit_attribution
from attention_lens.analysis.logit_lens import logit_lens
from attention_lens.analysis.predictions import next_token, token_predictions
from attention_lens.figures import theme
from attention_lens.figures.ablation import (
    ablation_figure,
    ablation_positions_figure,
)
from attention_lens.figures.attention import (
    attention_figure,
    attention_grid_figure,
    entropy_figure,
)
from attention_lens.figures.attribution import (
    attribution_components_figure,
    attribution_heads_figure,
)
from attention_lens.figures.logit_lens import (
    logit_lens_figure,
    logit_lens_target_figure,
)
from attention_lens.figures.predictions import (
    next_token_figure,
    next_token_table,
    surprisal_figure,
)
from attention_lens.figures.theme import TEMPLATE
from attention_lens.figures.tokens import token_sequence_figure

# repeated tokens (" Potter", " Harry") and a markup character must survive on the axes
TEXT = "Harry Potter went to the <shop>, and Harry Potter bought a wand."


@pytest.fixture
def fp(tiny):
    return run_forward(tiny, TEXT)


def _check(fig: go.Figure) -> dict:
    assert isinstance(fig, go.Figure)
    dark_theme(fig)
    data = json.loads(fig.to_json())  # serialisable (what Dash sends)
    return data


def dark_theme(fig: go.Figure) -> None:
    """The figure carries the app's dark template (plotly's default is white)."""
    layout = fig.layout.template.layout
    assert layout.paper_bgcolor == theme.PAPER and layout.plot_bgcolor == theme.BACKGROUND
    assert layout.font.color == theme.TEXT


def test_the_theme_check_fails_on_plotly_defaults():
    with pytest.raises(AssertionError):
        dark_theme(go.Figure())
    dark_theme(go.Figure(layout=dict(template=theme.TEMPLATE)))


def _table_ok(rows: list[dict]) -> None:
    assert rows and all(isinstance(r, dict) for r in rows)
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row
    json.dumps(rows)  # plain Python values only


def test_template_is_ours(tiny, fp):
    fig = next_token_figure(next_token(tiny, fp, k=5))
    import plotly.io as pio

    assert fig.layout.template == pio.templates[TEMPLATE]


def test_next_token_figure(tiny, fp):
    res = next_token(tiny, fp, k=6)
    fig = next_token_figure(res)
    _check(fig)
    assert len(fig.data) == 1 and len(fig.data[0].y) == 6
    assert len(set(fig.data[0].y)) == 6
    np.testing.assert_allclose(fig.data[0].x, res.probs)
    rows = next_token_table(res)
    _table_ok(rows)
    assert [r["rank"] for r in rows] == list(range(1, 7))


def test_surprisal_figure(tiny, fp):
    res = token_predictions(tiny, fp, k=3)
    fig = surprisal_figure(res)
    _check(fig)
    assert len(fig.data[0].x) == fp.n_tokens == len(set(fig.data[0].x))


def test_token_sequence_figure(tiny, fp):
    res = token_predictions(tiny, fp, k=3)
    fig = token_sequence_figure(res, per_row=8)
    _check(fig)
    heat, text = fig.data
    assert len(text.text) == fp.n_tokens  # one label per token, in order
    assert "&lt;" in "".join(text.text)  # markup escaped
    z = np.asarray(heat.z, dtype=float)
    rows = -(-fp.n_tokens // 8)
    assert z.shape == (rows, 8)
    flat = z.ravel()
    assert np.isnan(flat[0])  # the first token has no prediction
    np.testing.assert_allclose(flat[1:fp.n_tokens], res.next_probs[:-1])
    assert np.all(np.isnan(flat[fp.n_tokens:]))
    custom = np.asarray(heat.customdata, dtype=object).reshape(-1, 2)
    assert [int(c) for c in custom[: fp.n_tokens, 0]] == list(range(fp.n_tokens))
    assert "rank" in custom[1, 1] and "top 3" in custom[1, 1]


def test_attention_figure_masks_upper_triangle(tiny, fp):
    res = attention_pattern(tiny, fp, layer=1, head=2)
    fig = attention_figure(res)
    _check(fig)
    heat = fig.data[0]
    p = fp.n_tokens
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (p, p) and len(heat.x) == len(heat.y) == p
    assert len(set(heat.x)) == p  # repeated tokens stay distinct
    assert np.all(np.isnan(z[np.triu_indices(p, 1)]))
    np.testing.assert_allclose(z[np.tril_indices(p)], res.pattern[np.tril_indices(p)])
    assert "query %{y} ← key %{x}" in heat.hovertemplate and "L1H2" in heat.hovertemplate
    assert heat.meta == {"layer": 1, "head": 2}  # a click on a cell reads its head here


def test_attention_grid_and_entropy(tiny, fp):
    res = attention_patterns(tiny, fp)
    grid = attention_grid_figure(res)
    _check(grid)
    assert len(grid.data) == 2 * 4
    assert all(len(t.x) == fp.n_tokens for t in grid.data)
    assert "L1H3" in grid.data[-1].hovertemplate
    ent = entropy_figure(res)
    _check(ent)
    assert np.asarray(ent.data[0].z).shape == (2, 4)


def test_logit_lens_figures(tiny_ln):
    fp = run_forward(tiny_ln, TEXT)
    res = logit_lens(tiny_ln, fp, k=3, target=" Potter")
    for colour in ("top", "actual", "target"):
        fig = logit_lens_figure(res, colour=colour)
        _check(fig)
        heat = fig.data[0]
        assert np.asarray(heat.z).shape == (res.n_stages, fp.n_tokens)
        assert len(heat.x) == fp.n_tokens == len(set(heat.x))
        assert len(heat.y) == res.n_stages == 5
    assert "target '·Potter'" in np.asarray(heat.customdata, dtype=object)[0, 0]
    traj = logit_lens_target_figure(res, position=-1)
    _check(traj)
    np.testing.assert_allclose(traj.data[0].y, res.target_probs[:, -1])
    no_target = logit_lens(tiny_ln, fp, k=2)
    with pytest.raises(ValueError):
        logit_lens_figure(no_target, colour="target")
    np.testing.assert_allclose(logit_lens_target_figure(no_target, position=2).data[0].y,
                               no_target.next_probs[:, 2])


def test_attribution_figures(tiny_ln):
    fp = run_forward(tiny_ln, TEXT)
    res = logit_attribution(tiny_ln, fp, target=" Potter", contrast=" Harry")
    heads = attribution_heads_figure(res)
    _check(heads)
    np.testing.assert_allclose(np.asarray(heads.data[0].z), res.heads)
    assert heads.data[0].zmid == 0
    assert "logit('·Potter') − logit('·Harry')" in heads.data[0].hovertemplate
    comps = attribution_components_figure(res)
    _check(comps)
    assert len(comps.data[0].x) == len(res.labels)


def test_ablation_figures(tiny, fp):
    res = ablate_heads(tiny, fp, heads=[(1, 0), (1, 1)], k=4, target=" Potter")
    fig = ablation_figure(res)
    _check(fig)
    assert len(fig.data) == 2
    assert len(fig.data[0].x) == len(res.union_ids) >= 4
    np.testing.assert_allclose(fig.data[1].y, res.union_after)
    pos = ablation_positions_figure(res)
    _check(pos)
    assert all(len(t.x) == fp.n_tokens for t in pos.data)


FIGURE_MODULES = ("tokens", "predictions", "attention", "logit_lens", "attribution", "ablation")


def test_figures_import_no_torch_or_dash():
    # at run time: importing the figure modules must not pull in torch
    code = ("import sys; " + "; ".join(f"import attention_lens.figures.{m}" for m in FIGURE_MODULES)
            + "; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # in the source: no direct import of torch or dash
    for name in FIGURE_MODULES:
        path = Path(__file__).resolve().parent.parent / "attention_lens" / "figures" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("torch", "dash") for m in mods), (name, mods)
