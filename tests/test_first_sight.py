"""Numbers checked against an exact or independent reference, and the defaults a page opens on.

- PCA of 2,000 embedding rows is exact (against numpy's eigendecomposition of the
  covariance), not scikit-learn's randomized solver.
- Head-detection scores match TransformerLens 3.9's ``detect_head`` ("mul" and "abs", with
  and without ``exclude_bos`` / ``exclude_current_token``) when averaged over every row;
  the default averages over the rows that have a target.
- ``GET /api/embeddings`` with no parameters works on a vocabulary under 2,000.
- The defaults chosen from the prompt (head, position, token, presets).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_lens.analysis import defaults as D
from attention_lens.analysis.ablation import ablate_heads, head_sweep
from attention_lens.analysis.embeddings import embedding_matrix, embedding_pca, token_selection
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.heads import (
    detection_pattern,
    head_detection,
    pattern_scores,
    probe_head_scores,
    prompt_patterns,
    target_rows,
)
from attention_lens.components.shell import DEFAULT_PROMPT
from attention_lens.figures.theme import number, signed, styled, wrap_title

MODEL = "attn-only-2l"


# ------------------------------------------------------------------------------- PCA
def test_pca_of_2000_rows_is_exact(model_2l):
    """10 components of 2,000 × 384 rows: coordinates and variances as an exact PCA."""
    res = embedding_pca(model_2l, token_filter="frequent", max_tokens=2000, n_components=10)
    ids = token_selection(model_2l, "frequent", 2000)
    x = embedding_matrix(model_2l, "W_E")[ids].astype(np.float64)
    xc = x - x.mean(0)
    cov = xc.T @ xc / (len(x) - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:10]
    evals, evecs = evals[order], evecs[:, order]
    np.testing.assert_allclose(res.explained_variance, evals, rtol=1e-9)
    np.testing.assert_allclose(res.explained_variance_ratio, evals / np.trace(cov), rtol=1e-9)
    ref = xc @ evecs
    signs = np.sign((ref * res.coords).sum(0))  # a component's sign is a convention
    np.testing.assert_allclose(res.coords, ref * signs, atol=1e-8)


def test_uncentred_map_is_the_exact_svd(model_2l):
    res = embedding_pca(model_2l, max_tokens=500, n_components=4, centre=False)
    x = embedding_matrix(model_2l, "W_E")[token_selection(model_2l, "frequent", 500)]
    x = x.astype(np.float64)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    signs = np.sign((vt[:4] * res.components).sum(1))
    np.testing.assert_allclose(res.components, vt[:4] * signs[:, None], atol=1e-10)
    np.testing.assert_allclose(res.explained_variance_ratio, s[:4] ** 2 / (s ** 2).sum(),
                               rtol=1e-9)


# ------------------------------------------------------------------ head detection
TL_HEADS = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
            "induction": "induction_head"}


@pytest.fixture(scope="module")
def tl_2l(model_2l):
    tl_oracle = pytest.importorskip("tl_oracle")
    pytest.importorskip("transformer_lens")
    return tl_oracle.to_transformer_lens(model_2l)


@pytest.mark.parametrize("metric", ["mul", "abs"])
@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_prompt_scores_match_transformer_lens(model_2l, tl_2l, registry, metric, exclude_bos,
                                              exclude_diagonal):
    from transformer_lens.head_detector import detect_head

    fp = registry.forward(DEFAULT_PROMPT, MODEL)
    tokens = torch.as_tensor(np.asarray(fp.token_ids))[None]
    tl_2l.to_tokens = lambda seq, **_: tokens  # our tokenizer's ids, no BOS
    patterns = prompt_patterns(model_2l, fp)
    for kind, tl_name in TL_HEADS.items():
        ours = pattern_scores(patterns, detection_pattern(fp.token_ids, kind), metric,
                              exclude_bos, exclude_diagonal, rows="all")
        theirs = detect_head(tl_2l, DEFAULT_PROMPT, tl_name, exclude_bos=exclude_bos,
                             exclude_current_token=exclude_diagonal,
                             error_measure=metric).numpy()
        # TransformerLens rounds "abs" to three decimals
        np.testing.assert_allclose(ours, theirs, atol=5.01e-4 if metric == "abs" else 2e-5,
                                   err_msg=f"{kind} {metric} bos={exclude_bos}")


def test_abs_with_exclude_bos_counts_nothing_in_column_zero():
    """A perfect previous-token head scores 1 with exclude_bos (it was 1 − 1/n)."""
    n = 6
    perfect = np.eye(n, k=-1)
    perfect[0, 0] = 1.0
    det = detection_pattern(np.arange(n), "previous_token")
    assert pattern_scores(perfect, det, "abs", exclude_bos=True) == pytest.approx(1.0)
    # without it, row 0 (all its weight on itself, no target) is one error over n rows
    assert pattern_scores(perfect, det, "abs") == pytest.approx(1 - 1 / n)
    assert pattern_scores(perfect, det, "abs", rows="target") == pytest.approx(1.0)


def test_target_rows_average_only_rows_with_a_target():
    t = np.array([5, 6, 7, 8, 5, 6, 7, 8])  # second half repeats the first
    det = detection_pattern(t, "induction")
    np.testing.assert_array_equal(target_rows(det), [False] * 4 + [True] * 4)
    ideal = np.zeros((8, 8))
    ideal[:4, 0] = 1.0  # the first half has nothing to find: it rests on token 0
    for i in range(4, 8):
        ideal[i, i - 3] = 1.0  # the token after the earlier copy
    assert pattern_scores(ideal, det, "mul", rows="target") == pytest.approx(1.0)
    assert pattern_scores(ideal, det, "mul", rows="all") == pytest.approx(0.5)
    assert np.isnan(pattern_scores(ideal, detection_pattern(np.arange(8), "induction"),
                                   rows="target"))


def test_head_detection_defaults_to_target_rows(model_2l, registry):
    fp = registry.forward(DEFAULT_PROMPT, MODEL)
    probe = probe_head_scores(model_2l, batch=2)
    target = head_detection(model_2l, fp, probe=probe)
    every = head_detection(model_2l, fp, probe=probe, rows="all")
    assert target.rows == "target" and every.rows == "all"
    # the first copy has no earlier copy: counting it roughly halves the induction score
    assert target.scores["induction"][1, 0] > 1.5 * every.scores["induction"][1, 0]


# -------------------------------------------------------------------- the API default
def test_api_embeddings_default_on_a_small_vocabulary(tiny_tokenizer, tmp_path):
    from conftest import make_tiny

    from attention_lens.model.checkpoint import save_model
    from attention_lens.server import ServerConfig, create_server

    lm = make_tiny(tiny_tokenizer, name="tiny-vocab")
    assert lm.cfg.d_vocab < 2000
    save_model(lm.model, lm.tokenizer, tmp_path / "tiny-vocab")
    app = create_server(ServerConfig(models_dirs=[tmp_path], model="tiny-vocab"))
    client = app.server.test_client()
    r = client.get("/api/embeddings")
    assert r.status_code == 200, r.get_json()
    assert len(r.get_json()["result"]["token_ids"]) <= lm.cfg.d_vocab


# ------------------------------------------------------------------------ defaults
def test_repeated_positions():
    t = np.array([1, 2, 3, 9, 1, 2, 3])
    # after the second 1, 2 and 3 the next token repeats what followed the first copy
    np.testing.assert_array_equal(D.repeated_positions(t), [4, 5])
    assert not D.repeats(t) and D.repeats(np.array([1, 2, 3, 4, 1, 2, 3, 4]))
    assert D.repeated_positions(np.arange(10)).size == 0


def test_defaults_on_the_shipped_prompt(model_2l, registry):
    fp = registry.forward(DEFAULT_PROMPT, MODEL)
    head = D.strongest_head(model_2l, fp)
    assert head.kind == "induction" and (head.layer, head.head) == (1, 0)
    assert "strongest induction head on this prompt" in head.reason
    assert [r[:2] for r in head.ranking[:4]] == [(1, 0), (1, 10), (1, 6), (1, 5)]
    where = D.focus_position(fp)
    assert where.position in D.repeated_positions(fp.token_ids)
    assert where.target_id == int(fp.token_ids[where.position + 1])
    assert fp.token_ids[where.earlier] == fp.token_ids[where.position]
    presets = D.head_presets(model_2l, fp)
    assert set(presets["induction"]) == {(1, 0), (1, 5), (1, 6), (1, 10)}
    assert (0, 2) in presets["previous-token"]
    # ablating the group hurts the repeated part far more than the best head alone
    part = D.repeated_positions(fp.token_ids)
    group = ablate_heads(model_2l, fp, heads=presets["induction"], part=part)
    sweep = head_sweep(model_2l, fp, "zero", part)
    assert group.part_loss_change > 1.5 * float(sweep.loss_change[1].max()) > 0


def test_defaults_without_repeats_fall_back(model_2l, registry):
    fp = registry.forward("The quick brown fox jumps over the lazy dog.", MODEL)
    # the model is unsure of the next token: no head is shown for writing it
    assert float(fp.logits[-1].double().softmax(-1).max()) < D.COPY_MIN_PROB
    head = D.strongest_head(model_2l, fp)
    assert head.kind == "card" and (head.layer, head.head) == (1, 5)
    where = D.focus_position(fp)
    assert where.position == fp.n_tokens - 1 and where.target_id is None
    assert D.chosen_position(fp, 3).target_id == int(fp.token_ids[4])


def _head_dla(lm, fp, target: int) -> np.ndarray:
    """[L, H] each head's output at the last position (its z through W_O) dotted with
    W_U[:, target], centred and divided by the final LayerNorm's scale of the real pass
    (MATH.md's direct logit attribution), from the cache's hook_z."""
    model, n = lm.model, fp.n_tokens
    direction = model.W_U[:, target].detach().double()
    norm = lm.cfg.normalization_type
    if norm:
        direction = model.ln_final.w.detach().double() * direction
        scale = float(fp.cache["ln_final.hook_scale"][n - 1])
    out = np.zeros((lm.cfg.n_layers, lm.cfg.n_heads))
    for layer in range(lm.cfg.n_layers):
        z = fp.cache[f"blocks.{layer}.attn.hook_z"][n - 1].double()  # [H, d_head]
        res = torch.einsum("hd,hdm->hm", z, model.blocks[layer].attn.W_O.detach().double())
        if norm == "LN":
            res = res - res.mean(-1, keepdim=True)
        out[layer] = ((res / scale) if norm else res) @ direction
    return out


def test_defaults_on_a_confident_prediction_show_the_head_that_writes_it(model_2l, registry):
    """A prompt that does not repeat itself but whose next token the model is confident of:
    the head with the largest direct logit attribution to it at the last position, not the
    model card's induction head (which shows nothing on such a prompt)."""
    fp = registry.forward("The capital of France is", MODEL)
    probs = fp.logits[-1].double().softmax(-1)
    top = int(probs.argmax())
    assert not D.repeats(fp.token_ids) and float(probs[top]) >= D.COPY_MIN_PROB
    assert top not in set(fp.token_ids.tolist())  # nothing to copy
    head = D.strongest_head(model_2l, fp)
    dla = _head_dla(model_2l, fp, top)
    best = np.unravel_index(int(np.argmax(dla)), dla.shape)
    assert head.kind == "writer" and (head.layer, head.head) == tuple(int(i) for i in best)
    assert head.score == pytest.approx(float(dla[best]), rel=1e-6) and head.score > 0
    assert "writes most directly toward the predicted" in head.reason
    assert [r[:2] for r in head.ranking] == [
        tuple(int(i) for i in np.unravel_index(k, dla.shape))
        for k in np.argsort(-dla.ravel(), kind="stable")[:D.N_RANKED]]
    # the sentence names the token it reads most from the last position
    row = fp.cache[f"blocks.{head.layer}.attn.hook_pattern"][head.head, -1]
    assert f"'{fp.display[int(row.argmax())]}'" in head.reason or "itself" in head.reason


def test_head_sweep_equals_single_ablations(tiny):
    fp = run_forward(tiny, "", token_ids=[3, 9, 1, 14, 3, 9, 1, 14, 7])
    for method in ("zero", "mean"):
        sweep = head_sweep(tiny, fp, method)
        for la, h in [(0, 1), (1, 3)]:
            one = ablate_heads(tiny, fp, heads=[(la, h)], method=method)
            # two float32 paths (a batch from the cached residual stream against a full
            # rerun of the prompt): equal to float32 precision, not bit for bit
            assert sweep.loss_after[la, h] == pytest.approx(one.loss_after, rel=1e-6)


# --------------------------------------------------------------------- formatting
def test_numbers_use_a_true_minus_sign():
    assert number(-1.26) == "\u22121.260" and number(6.471) == "6.471"
    assert signed(0.125) == "+0.125" and signed(-2.0, ".1f") == "\u22122.0"
    assert number(float("nan")) == "n/a"
    assert signed(-0.001, ".2f") == "0.00" == signed(0.0, ".2f") and number(-0.0004) == "0.000"


def test_titles_wrap_and_sit_below_the_toolbar():
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(y=[1]), layout=dict(title="word " * 30))
    styled(fig)
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) > 1 and all(len(s) <= 46 for s in lines)
    assert fig.layout.title.pad.t >= 30 and fig.layout.margin.t > fig.layout.title.pad.t
    top = fig.layout.margin.t
    styled(fig)  # idempotent: a second pass keeps the margins
    assert fig.layout.margin.t == top
    assert wrap_title("a<br>b") == "a<br>b"
    light = styled(go.Figure(go.Scatter(x=[0], y=[0], text=["x"], mode="text",
                                        textfont=dict(color="#ffffff"))), "light")
    assert light.layout.template.layout.paper_bgcolor == "#ffffff"
    assert light.data[0].textfont.color == "#000000"


def test_answered_pair_is_computed_once_per_model_and_limit(model_2l, tiny, monkeypatch):
    calls = []
    real = D._answered_pair
    monkeypatch.setattr(D, "_answered_pair", lambda lm, limit: calls.append(limit) or
                        real(lm, limit))
    first = D.answered_pair(model_2l, limit=77)
    assert D.answered_pair(model_2l, limit=77) is first and calls == [77]
    D.answered_pair(model_2l, limit=78)
    D.answered_pair(tiny, limit=77)  # another model: its own answer
    assert calls == [77, 78, 77]
