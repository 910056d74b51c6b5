"""Weight analyses: factored circuits equal dense ones; head labels, composition, analogy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_lens.analysis.analogy import analogy
from attention_lens.analysis.circuits import (
    FactoredMatrix,
    circuit_svd,
    head_weights,
    ov_circuit,
    qk_circuit,
    thin_qr,
    thin_r,
)
from attention_lens.analysis.composition import composition_score, composition_scores
from attention_lens.analysis.eigen import (
    attention_spectrum,
    circuit_eigenvalues,
    copying_score,
    full_ov_eigenvalues,
    positive_fraction,
)
from attention_lens.analysis.embeddings import (
    embedding_pca,
    nearest_neighbours,
    project_tokens,
    token_selection,
    unit_rows,
)
from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.heads import (
    detection_pattern,
    head_detection,
    label_heads,
    pattern_scores,
    probe_head_scores,
)
from attention_lens.analysis.probe import ordinary_token_ids
from tests.conftest import make_tiny


def _nonzero_eigs_dense(m: torch.Tensor, r: int) -> np.ndarray:
    """The r largest-magnitude eigenvalues of a dense square matrix, sorted by magnitude."""
    e = torch.linalg.eigvals(m).numpy()
    return e[np.argsort(-np.abs(e), kind="stable")][:r]


def _match_spectra(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Two complex spectra are equal as multisets (greedy nearest matching)."""
    b = list(b)
    for x in a:
        j = int(np.argmin([abs(x - y) for y in b]))
        assert abs(x - b[j]) < atol, (x, b[j])
        b.pop(j)


# ------------------------------------------------------------------ FactoredMatrix
def test_factored_svd_equals_dense():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    B = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    u, s, vh = fm.svd()
    assert s.shape == (3, 5)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:, :5])
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, dense)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(5, dtype=torch.float64)
                               .expand(3, 5, 5))
    torch.testing.assert_close(fm.frobenius_norm(), dense.flatten(1).norm(dim=1))
    torch.testing.assert_close(fm.T.dense(), dense.transpose(-1, -2))
    C = torch.randn(16, 7, dtype=torch.float64, generator=g)
    torch.testing.assert_close((fm @ C).dense(), dense @ C)


def test_factored_eigenvalues_equal_dense_nonzero_eigenvalues():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(12, 4, generator=g, dtype=torch.float64)
    B = torch.randn(4, 12, generator=g, dtype=torch.float64)
    ours = FactoredMatrix(A, B).eigenvalues().numpy()
    _match_spectra(ours, _nonzero_eigs_dense(A @ B, 4), 1e-9)


def test_circuit_svd_matches_dense(tiny):
    for which, fm in (("OV", ov_circuit(tiny)), ("QK", qk_circuit(tiny))):
        res = circuit_svd(tiny, which, n_directions=2, top_k=4)
        dense = fm.dense()
        d_head = tiny.cfg.d_head
        np.testing.assert_allclose(res.singular_values,
                                   torch.linalg.svdvals(dense)[..., :d_head].numpy(), atol=1e-9)
        assert res.input_ids.shape == (2, 4, 2, 4)
        assert len(res.output_tokens[1][3][1]) == 4
        # the top output tokens of OV direction 0 are the argmax of v0 @ W_U (up to sign)
        if which == "OV":
            _, _, vh = torch.linalg.svd(dense[0, 1])
            w = head_weights(tiny)
            proj = vh[0] @ w["W_U"]
            if proj[proj.abs().argmax()] < 0:
                proj = -proj
            assert res.output_ids[0, 1, 0, 0] == int(proj.argmax())
            np.testing.assert_allclose(res.output_scores[0, 1, 0, 0], float(proj.max()),
                                       rtol=1e-4)


def test_circuit_svd_bad_input(tiny):
    with pytest.raises(AnalysisError):
        circuit_svd(tiny, "XY")
    with pytest.raises(AnalysisError):
        circuit_svd(tiny, "OV", top_k=0)
    with pytest.raises(AnalysisError):
        circuit_svd(tiny, "OV", top_k=tiny.cfg.d_vocab + 1)
    with pytest.raises(AnalysisError):
        circuit_svd(tiny, "OV", n_directions=tiny.cfg.d_head + 1)


# -------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_circuit_eigenvalues_equal_dense(tiny_tokenizer, dtype):
    # a small vocabulary keeps the dense d_vocab x d_vocab reference cheap
    lm = make_tiny(tiny_tokenizer, seed=3, normalization_type="LN", attn_only=False,
                   d_mlp=16, act_fn="gelu", d_vocab=40)
    with torch.no_grad():  # non-trivial LayerNorm weights must be folded in
        for b in lm.model.blocks:
            b.ln1.w.uniform_(0.5, 1.5)
        lm.model.ln_final.w.uniform_(0.5, 1.5)
    res = circuit_eigenvalues(lm, dtype=dtype)
    m = lm.model
    W_E, W_U = m.W_E.double(), (m.ln_final.w[:, None] * m.W_U).double()
    atol = 1e-6 if dtype == "float64" else 1e-3
    for layer in range(lm.cfg.n_layers):
        ln1 = lm.model.blocks[layer].ln1.w.double()[:, None]
        for head in range(lm.cfg.n_heads):
            a = m.blocks[layer].attn
            W_Q, W_K = ln1 * a.W_Q[head].double(), ln1 * a.W_K[head].double()
            W_V, W_O = ln1 * a.W_V[head].double(), a.W_O[head].double()
            e = lm.cfg.d_head
            dense = {"ov": W_V @ W_O, "full_ov": W_E @ W_V @ W_O @ W_U,
                     "qk": W_Q @ W_K.T, "full_qk": W_E @ W_Q @ W_K.T @ W_E.T}
            for name, mat in dense.items():
                ref = _nonzero_eigs_dense(mat, e)
                scale = np.abs(ref).max()
                _match_spectra(res.eigenvalues(name)[layer, head] / scale, ref / scale, atol)
                np.testing.assert_allclose(res.copying[name][layer, head], copying_score(ref),
                                           atol=10 * atol)
    assert res.ov.dtype == np.complex128
    json = res.as_json()
    assert len(json["full_ov"][0][0][0]) == 2


def _copying_model(tiny_tokenizer, sign: float, pinv: bool):
    lm = make_tiny(tiny_tokenizer, seed=4, n_layers=1, d_model=16, n_heads=2, d_head=8)
    m = lm.model
    with torch.no_grad():
        if pinv:
            m.unembed.W_U.copy_(torch.linalg.pinv(m.W_E.double()).float())
        else:
            m.unembed.W_U.copy_(m.W_E.T)
        a = m.blocks[0].attn
        eye = torch.eye(16)
        # head 0: W_V W_O = the identity restricted to the first d_head dimensions
        a.W_V[0].copy_(eye[:, :8])
        a.W_O[0].copy_(sign * eye[:8, :])
    return lm


@pytest.mark.parametrize("pinv", [True, False])
def test_copying_score_of_hand_built_copying_head(tiny_tokenizer, pinv):
    pos = circuit_eigenvalues(_copying_model(tiny_tokenizer, 1.0, pinv), dtype="float64")
    neg = circuit_eigenvalues(_copying_model(tiny_tokenizer, -1.0, pinv), dtype="float64")
    assert pos.copying["full_ov"][0, 0] > 0.999
    assert pos.positive["full_ov"][0, 0] == 1.0
    assert neg.copying["full_ov"][0, 0] < -0.999
    assert neg.positive["full_ov"][0, 0] == 0.0
    assert pos.copying["ov"][0, 0] > 0.999 and neg.copying["ov"][0, 0] < -0.999
    # the random head next to it is not a clean copier
    assert abs(pos.copying["full_ov"][0, 1]) < 0.9


def test_copying_score_helpers():
    assert copying_score(np.array([1 + 0j, 2, 3])) == pytest.approx(1.0)
    assert copying_score(np.array([1j, -1j])) == pytest.approx(0.0)
    assert copying_score(np.zeros(3)) == 0.0
    assert positive_fraction(np.array([1.0, -1.0, 2.0, 0.0])) == pytest.approx(0.5)


def test_eigenvalues_bad_dtype(tiny):
    with pytest.raises(AnalysisError):
        circuit_eigenvalues(tiny, dtype="float16")


def test_attention_spectrum_is_the_diagonal(tiny):
    fp = run_forward(tiny, "Harry Potter went to the shop")
    spec = attention_spectrum(tiny, fp)
    pattern = fp.cache["blocks.1.attn.hook_pattern"][2].double()
    dense = np.sort(torch.linalg.eigvals(pattern).real.numpy())[::-1]
    np.testing.assert_allclose(spec.sorted_eigenvalues[1, 2], dense, atol=1e-6)
    np.testing.assert_allclose(spec.eigenvalues[1, 2], pattern.diagonal().numpy())
    assert spec.is_diagonal and "diagonal" in spec.note
    assert spec.eigenvalues[0, 0, 0] == pytest.approx(1.0)


# ----------------------------------------------------------------- head detection
def test_detection_patterns_on_a_small_sequence():
    t = np.array([5, 7, 5, 7])
    np.testing.assert_array_equal(detection_pattern(t, "previous_token"), np.eye(4, k=-1))
    dup = detection_pattern(t, "duplicate_token")
    assert dup[2, 0] == 1 and dup[3, 1] == 1 and dup.sum() == 2
    ind = detection_pattern(t, "induction")
    # query 2 (token 5) -> key 1 (after the earlier 5); query 3 (token 7) -> key 2
    assert ind[2, 1] == 1 and ind[3, 2] == 1 and ind.sum() == 2
    # j = i counts when the token repeats immediately (t_{i-1} = t_i)
    assert detection_pattern(np.array([2, 2]), "induction")[1, 1] == 1
    with pytest.raises(AnalysisError):
        detection_pattern(t, "bogus")


def test_pattern_scores_mul_and_abs():
    t = np.array([3, 4, 5, 6])
    det = detection_pattern(t, "previous_token")
    perfect = np.eye(4, k=-1)
    perfect[0, 0] = 1.0
    assert pattern_scores(perfect, det, "mul") == pytest.approx(3 / 4)
    assert pattern_scores(perfect, det, "mul", exclude_bos=True) == pytest.approx(1.0)
    assert pattern_scores(perfect, det, "abs") == pytest.approx(1 - 1 / 4)
    uniform = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    assert pattern_scores(uniform, det, "mul") < 0.5
    with pytest.raises(AnalysisError):
        pattern_scores(perfect, det, "max")


def _hand_built_heads(tiny_tokenizer):
    """Two layers: L0H0 previous-token, L0H1 duplicate, L1H0 induction, L1H1 uniform.

    Residual layout: [0, n_ctx) one-hot position, then one-hot token, then the previous
    token (written by L0H0's OV); the induction head's key reads that block (K-composition).
    """
    n_ctx, v, c = 24, 16, 80.0
    d, e = n_ctx + 2 * v, v + n_ctx
    lm = make_tiny(tiny_tokenizer, seed=5, n_layers=2, n_heads=2, d_head=e, d_model=d,
                   n_ctx=n_ctx, d_vocab=v)
    m = lm.model
    pos, tok, prev = range(0, n_ctx), range(n_ctx, n_ctx + v), range(n_ctx + v, d)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for i in pos:
            m.pos_embed.W_pos[i, i] = 1
        for t in range(v):
            m.embed.W_E[t, tok[t]] = 1
        m.unembed.W_U.normal_()
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        for i in pos:  # previous token: query at i matches the key at i - 1
            a0.W_K[0, i, i] = 1
            if i:
                a0.W_Q[0, i, i - 1] = c
        for t in range(v):  # ...and copies the token into the "prev" block
            a0.W_V[0, tok[t], t] = 1
            a0.W_O[0, t, prev[t]] = 1
        for t in range(v):  # duplicate: same token, never itself
            a0.W_Q[1, tok[t], t] = c
            a0.W_K[1, tok[t], t] = 1
        for i in pos:
            a0.W_Q[1, i, v + i] = c
            a0.W_K[1, i, v + i] = -1
        for t in range(v):  # induction: the query's token against the key's previous token
            a1.W_Q[0, tok[t], t] = c
            a1.W_K[0, prev[t], t] = 1
    return lm


def test_hand_built_heads_get_their_own_labels(tiny_tokenizer):
    lm = _hand_built_heads(tiny_tokenizer)
    r = [3, 9, 1, 14, 6, 11, 0, 8]
    fp = run_forward(lm, "", token_ids=r * 3)
    res = head_detection(lm, fp, probe=probe_head_scores(lm, seq_len=8, batch=2))
    assert res.labels[0][0] == "previous-token"
    assert res.labels[0][1] == "duplicate"
    assert res.labels[1][0] == "induction"
    assert res.labels[1][1] == "diffuse"
    assert res.mul_scores["previous_token"][0, 0] > 0.9
    assert res.mul_scores["duplicate_token"][0, 1] > 0.6
    assert res.mul_scores["induction"][1, 0] > 0.6
    # each detector is specific: the other heads score low on it
    assert res.mul_scores["induction"][0].max() < 0.1
    assert res.mul_scores["previous_token"][1, 0] < 0.1
    # evidence: the strongest induction example attends to the token after the earlier copy
    ex = res.examples("induction", 1, 0)[0]
    assert fp.token_ids[ex["key_pos"] - 1] == fp.token_ids[ex["query_pos"]]
    assert ex["weight"] > 0.9
    ex = res.examples("previous_token", 0, 0)[0]
    assert ex["key_pos"] == ex["query_pos"] - 1
    # the probe sees the same heads (its 16-token vocabulary repeats, so splits happen)
    assert res.probe_induction.argmax() == 2 and res.probe_induction[1, 0] > 0.5
    assert res.probe_previous_token.argmax() == 0 and res.probe_previous_token[0, 0] > 0.9
    with pytest.raises(AnalysisError):
        res.examples("bogus", 0, 0)


def test_head_detection_abs_metric_and_exclusions(tiny_tokenizer):
    lm = _hand_built_heads(tiny_tokenizer)
    fp = run_forward(lm, "", token_ids=[3, 9, 1, 14] * 4)
    probe = probe_head_scores(lm, seq_len=8, batch=2)
    res = head_detection(lm, fp, metric="abs", exclude_bos=True, probe=probe)
    assert res.metric == "abs" and res.exclude_bos
    assert res.scores["previous_token"][0, 0] > 0.9
    assert res.scores["previous_token"][0, 0] > res.scores["previous_token"][1, 1]
    assert res.labels[0][0] == "previous-token"
    with pytest.raises(AnalysisError):
        head_detection(lm, fp, metric="sum", probe=probe)
    with pytest.raises(AnalysisError):
        head_detection(lm, fp, n_examples=0, probe=probe)
    with pytest.raises(AnalysisError):
        probe_head_scores(lm, seq_len=100)


def test_label_thresholds_for_self_and_copying():
    z = np.zeros((1, 3))
    scores = {k: z for k in ("induction", "duplicate_token", "previous_token")}
    labels, tags = label_heads(scores, self_attention=np.array([[0.9, 0.0, 0.0]]),
                               entropy=np.array([[0.0, 0.0, 0.2]]),
                               copying=np.array([[0.0, 0.95, 0.1]]))
    assert labels == [["self/diagonal", "copying", "other"]]
    assert tags[0][2] == []


def test_shipped_model_heads(model_2l):
    rng = np.random.default_rng(0)
    vocab = ordinary_token_ids(model_2l.tokenizer.strings)
    r = rng.choice(vocab[vocab > 300], 40, replace=False).tolist()
    fp = run_forward(model_2l, "", token_ids=r + r)
    res = head_detection(model_2l, fp, probe=probe_head_scores(model_2l, batch=4))
    induction = set(res.heads_labelled("induction"))
    assert {(1, 5), (1, 0), (1, 10), (1, 6)} <= induction
    assert res.labels[0][2] == "previous-token"
    assert all(res.probe_induction[1, h] > 0.6 for h in (5, 0, 10, 6))
    assert all(res.copying[1, h] > 0.9 for h in (5, 0, 10))


# -------------------------------------------------------------------- composition
def _dense_comp(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left @ right).norm() / (left.norm() * right.norm()))


def test_composition_score_equals_dense_formula():
    g = torch.Generator().manual_seed(2)
    A1, A2 = (torch.randn(3, 10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    B1, B2 = (torch.randn(3, 4, 10, generator=g, dtype=torch.float64) for _ in range(2))
    ours = composition_score(FactoredMatrix(A1, B1), FactoredMatrix(A2, B2))
    for i in range(3):
        assert float(ours[i]) == pytest.approx(_dense_comp(A1[i] @ B1[i], A2[i] @ B2[i]),
                                               rel=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_composition_scores_equal_dense_on_a_random_model(tiny_tokenizer, dtype):
    lm = make_tiny(tiny_tokenizer, seed=6, n_layers=3, n_heads=3)
    res = composition_scores(lm, n_samples=16, dtype=dtype)
    w = head_weights(lm)
    ov = w["W_V"] @ w["W_O"]
    qk = w["W_Q"] @ w["W_K"].transpose(-1, -2)
    rtol = 1e-9 if dtype == "float64" else 1e-4
    for l1 in range(3):
        for h1 in range(3):
            for l2 in range(3):
                for h2 in range(3):
                    got = (res.q[l1, h1, l2, h2], res.k[l1, h1, l2, h2], res.v[l1, h1, l2, h2])
                    if l2 <= l1:
                        assert all(np.isnan(x) for x in got)
                        continue
                    lft = ov[l1, h1]
                    want = (_dense_comp(lft, qk[l2, h2]), _dense_comp(lft, qk[l2, h2].T),
                            _dense_comp(lft, ov[l2, h2]))
                    np.testing.assert_allclose(got, want, rtol=rtol)
    # a random baseline of the same shapes sits near the random model's scores
    for kind in ("Q", "K", "V"):
        s = res.scores(kind)
        assert 0 < res.baseline[kind] < 1
        assert abs(np.nanmean(s) - res.baseline[kind]) < 0.1
    top = res.top_pairs("K", 3)
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert top[0]["target_layer"] > top[0]["source_layer"]
    with pytest.raises(AnalysisError):
        res.scores("X")
    with pytest.raises(AnalysisError):
        composition_scores(lm, dtype="float16")


def test_shipped_model_k_composition_finds_the_induction_circuit(model_2l):
    res = composition_scores(model_2l, n_samples=16)
    top = [(p["source_layer"], p["source_head"], p["target_layer"], p["target_head"])
           for p in res.top_pairs("K", 8)]
    # the previous-token head 0.2 feeds the induction heads' keys
    induction = {(1, 5), (1, 0), (1, 10), (1, 6)}
    assert {(0, 2, 1, h) for _, h in induction} <= set(top)
    for _, h in induction:  # and is each induction head's strongest K-composition source
        assert int(np.argmax(res.k[0, :, 1, h])) == 2
        assert res.k[0, 2, 1, h] > 3 * res.baseline["K"]


# ---------------------------------------------------------- embeddings and analogy
def test_embedding_pca_matches_numpy_and_clusters_full_rows(tiny):
    res = embedding_pca(tiny, token_filter="all", max_tokens=None, n_components=3,
                        n_clusters=4)
    x = tiny.model.W_E.detach().double().numpy()
    xc = x - x.mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    np.testing.assert_allclose(res.explained_variance_ratio, (s ** 2 / (s ** 2).sum())[:3],
                               rtol=1e-4)
    np.testing.assert_allclose(np.abs(res.coords), np.abs(xc @ res.components.T), atol=1e-6)
    assert res.coords.shape == (tiny.cfg.d_vocab, 3)
    assert res.cluster.shape == (tiny.cfg.d_vocab,) and res.cluster_sizes.sum() == tiny.cfg.d_vocab
    assert res.centroids.shape == (4, tiny.cfg.d_model)  # fit on full-dimensional rows
    # every token sits in the cluster of its nearest full-dimensional centre
    d2 = ((x[:, None] - res.centroids[None]) ** 2).sum(-1)
    assert (d2.argmin(1) == res.cluster).mean() > 0.99
    proj = project_tokens(tiny, res, [5, 7])
    np.testing.assert_allclose(proj.coords, res.coords[[5, 7]], atol=1e-6)
    unc = embedding_pca(tiny, token_filter="all", max_tokens=None, centre=False, n_clusters=2)
    assert not unc.centred and 0 < unc.explained_variance_ratio.sum() <= 1


def test_embedding_filters(model_2l):
    frequent = token_selection(model_2l, "frequent", 50)
    assert len(frequent) == 50 and (np.diff(frequent) > 0).all()
    words = token_selection(model_2l, "whole_word", None)
    strings = model_2l.tokenizer.strings
    assert len(words) > 100
    assert all(strings[i][0] == " " and strings[i][1:].isalpha() for i in words)
    with pytest.raises(AnalysisError):
        token_selection(model_2l, "rare")
    with pytest.raises(AnalysisError):
        embedding_pca(model_2l, matrix="W_X")
    with pytest.raises(AnalysisError):
        embedding_pca(model_2l, max_tokens=20, n_clusters=30)


def test_nearest_neighbours(model_2l):
    res = nearest_neighbours(model_2l, "king", k=5)
    assert res.query_display == ["·king"] and not res.multi_token
    assert res.query_ids[0] not in res.token_ids
    unit = unit_rows(model_2l.model.W_E.detach().double().numpy())
    np.testing.assert_allclose(res.cosine, unit[res.token_ids] @ unit[res.query_ids[0]],
                               atol=1e-5)
    assert (np.diff(res.cosine) <= 1e-12).all()
    with pytest.raises(AnalysisError):
        nearest_neighbours(model_2l, "king", k=0)


def _analogy_model(model_2l):
    """Embeddings built so that king - man + woman = queen exactly (all single tokens)."""
    tok = model_2l.tokenizer
    lm = make_tiny(tok, seed=7, n_layers=1, d_vocab=model_2l.cfg.d_vocab, d_model=16)
    ids = {w: tok.encode(" " + w) for w in ("king", "man", "France", "Germany")}
    assert all(len(v) == 1 for v in ids.values())
    king, man, woman, queen = (ids["king"][0], ids["man"][0], ids["France"][0],
                               ids["Germany"][0])
    with torch.no_grad():
        W = lm.model.embed.W_E
        W.mul_(0.01)  # everything else far from the plane spanned below
        e = torch.eye(16)
        W[king], W[man], W[woman] = e[0] + e[1], e[0] + e[2], e[3] + e[2]
        W[queen] = e[3] + e[1]  # = king - man + woman
    return lm, (king, man, woman, queen)


@pytest.mark.parametrize("method", ["3cosadd", "3cosmul"])
def test_analogy_solves_a_built_equation_and_excludes_inputs(model_2l, method):
    lm, (king, man, woman, queen) = _analogy_model(model_2l)
    res = analogy(lm, ["king", "France"], ["man"], top_k=3, method=method)
    assert res.token_ids[0] == queen
    assert res.cosine[0] == pytest.approx(1.0)
    assert not set(res.token_ids) & {king, man, woman}
    assert set(res.excluded_ids) == {king, man, woman}
    assert res.multi_token == [False, False, False] and res.notes == []
    # alone, "king" is nearest to itself: excluded, so the answer is another token
    solo = analogy(lm, ["king"], top_k=2, method=method)
    assert king not in solo.token_ids


def test_analogy_reports_multi_token_words(model_2l):
    res = analogy(model_2l, ["Paris", "Germany"], ["France"], top_k=5)
    assert res.multi_token == [True, False, False]
    assert res.term_tokens[0] == ["·Par", "is"]
    assert "2 tokens" in res.notes[0] and "mean" in res.notes[0]
    par, is_ = res.term_token_ids[0]
    assert par in res.excluded_ids and is_ in res.excluded_ids
    assert not set(res.token_ids) & set(res.excluded_ids)
    assert len(res.token_ids) == 5 and (np.diff(res.scores) <= 1e-12).all()


@pytest.mark.parametrize("kwargs", [
    dict(positive=[]), dict(positive=[""]), dict(positive=["  "]),
    dict(positive=["king"], negative=[""]), dict(positive=["king"], top_k=0),
    dict(positive=["king"], top_k=10 ** 6), dict(positive=["king"], method="cos"),
    dict(positive=["king"], matrix="W_Z"), dict(positive=["x" * 200]),
    dict(positive=[None]),
])
def test_analogy_bad_input(model_2l, kwargs):
    with pytest.raises(AnalysisError):
        analogy(model_2l, **kwargs)


def test_full_ov_eigenvalues_alone_match_the_full_result(tiny):
    alone = full_ov_eigenvalues(tiny, dtype="float64")
    np.testing.assert_allclose(alone, circuit_eigenvalues(tiny, dtype="float64").full_ov,
                               atol=1e-10)


def test_thin_qr_cholesky_path_and_fallback():
    g = torch.Generator().manual_seed(9)
    m = torch.randn(4, 30, 6, generator=g, dtype=torch.float64)
    q, r = thin_qr(m)
    torch.testing.assert_close(q @ r, m)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, torch.eye(6, dtype=torch.float64)
                               .expand(4, 6, 6))
    torch.testing.assert_close(r.transpose(-1, -2) @ r, thin_r(m).transpose(-1, -2) @ thin_r(m))
    m[1, :, 2] = 0  # a rank-deficient head takes the Householder path
    q, r = thin_qr(m)
    torch.testing.assert_close(q @ r, m)
    fm = FactoredMatrix(m, torch.randn(4, 6, 5, generator=g, dtype=torch.float64))
    torch.testing.assert_close(fm.singular_values(), torch.linalg.svdvals(fm.dense())[:, :5])
