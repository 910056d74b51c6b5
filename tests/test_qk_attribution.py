"""QK attribution: the terms add back to TransformerLens' attention scores, cell by cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from tl_oracle import tl_tokens, to_transformer_lens

from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.heads import probe_head_scores
from attention_lens.analysis.qk_attribution import (
    qk_attribution,
    qk_attribution_row,
    residual_components,
)

TEXT = "Harry Potter and Hermione Granger walked. Harry Potter and Hermione"


@pytest.mark.parametrize("which", ["model_1l", "model_2l", "tiny_ln"])
def test_terms_sum_to_transformer_lens_scores(which, request):
    """Every head, every causal (q, k): Σ terms = TL's hook_attn_scores[q, k] (≤ 1e-4)."""
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    tl = to_transformer_lens(lm)
    with torch.no_grad():
        _, cache = tl.run_with_cache(tl_tokens(lm, TEXT))
    n = fp.n_tokens
    assert n == tl_tokens(lm, TEXT).shape[1] and n > 10
    checked = 0
    for layer in range(lm.cfg.n_layers):
        theirs = cache[f"blocks.{layer}.attn.hook_attn_scores"][0].double().numpy()
        for head in range(lm.cfg.n_heads):
            for q in range(n):
                row = qk_attribution_row(lm, fp, layer=layer, head=head, query=q)
                err = np.abs(row.terms.sum((1, 2)) - theirs[head, q, : q + 1]).max()
                assert err <= 1e-4, (layer, head, q, err)
                checked += q + 1
    assert checked == lm.cfg.n_layers * lm.cfg.n_heads * n * (n + 1) // 2


@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
def test_cell_contrast_dims_and_source_split(which, request):
    """One cell, its contrast, the per-dimension view and the split by source all add up."""
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    scores = fp.cache["blocks.1.attn.hook_attn_scores"][2].double().numpy()
    q, k, k2 = fp.n_tokens - 1, 5, 9
    cell = qk_attribution(lm, fp, layer=1, head=2, query=q, key=k)
    assert abs(cell.total - scores[q, k]) <= 1e-5 and abs(cell.score - scores[q, k]) <= 1e-6
    assert abs(cell.dims.sum() - scores[q, k]) <= 1e-5 and cell.dims.shape == (lm.cfg.d_head,)
    assert cell.q_labels[-1] == "b_Q" and cell.k_labels[-1] == "b_K"
    row = qk_attribution_row(lm, fp, layer=1, head=2, query=q)
    np.testing.assert_allclose(row.terms[k], cell.terms, atol=1e-12)
    diff = qk_attribution(lm, fp, layer=1, head=2, query=q, key=k, contrast_key=k2)
    assert abs(diff.total - (scores[q, k] - scores[q, k2])) <= 1e-5
    np.testing.assert_allclose(diff.terms, cell.terms - row.terms[k2], atol=1e-12)
    split = qk_attribution(lm, fp, layer=1, head=2, query=q, key=k, split_sources=True)
    assert abs(split.total - scores[q, k]) <= 1e-5
    # parts of L0H1 at the key, one per source position, add up to L0H1's unsplit column
    parts = [j for j, lab in enumerate(split.k_labels) if lab.startswith("L0H1←")]
    assert len(parts) == k + 1 and list(split.k_sources[parts]) == list(range(k + 1))
    whole = cell.k_labels.index("L0H1")
    np.testing.assert_allclose(split.terms[:, parts].sum(1)[-1], cell.terms[-1, whole],
                               rtol=1e-5, atol=1e-7)


def test_components_sum_to_resid_pre(tiny_ln):
    fp = run_forward(tiny_ln, TEXT)
    comps = residual_components(tiny_ln, fp, 1)
    np.testing.assert_allclose(comps.vectors.sum(1).numpy(),
                               fp.cache["blocks.1.hook_resid_pre"].double().numpy(), atol=1e-5)
    assert comps.labels[:2] == ("embed", "pos_embed") and "L0 MLP" in comps.labels


def test_rotary_rms_model(tiny_tokenizer):
    """Rotary positions and RMSNorm: each term is rotated at its own position; sum is exact."""
    lm = make_tiny(tiny_tokenizer, seed=3, attn_only=False, d_mlp=48, act_fn="silu",
                   gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                   name="tiny-rotary")
    fp = run_forward(lm, TEXT)
    for layer in range(2):
        scores = fp.cache[f"blocks.{layer}.attn.hook_attn_scores"].double().numpy()
        for q in (0, 7, fp.n_tokens - 1):
            row = qk_attribution_row(lm, fp, layer=layer, head=1, query=q)
            assert np.abs(row.terms.sum((1, 2)) - scores[1, q, : q + 1]).max() <= 1e-4
            assert "pos_embed" not in row.k_labels


def test_induction_heads_read_the_previous_token_head(model_2l):
    """On the seeded probe, every induction head (score ≥ 0.6) attends because of
    token embedding at the query × output of a previous-token head (score ≥ 0.5) at the key."""
    probe = probe_head_scores(model_2l)
    t = probe.seq_len
    fp = run_forward(model_2l, "", token_ids=[int(x) for x in probe.tokens[0]])
    induction = list(zip(*np.nonzero(probe.induction >= 0.6)))
    assert induction, "the shipped two-layer model has induction heads"
    for layer, head in induction:
        pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head].numpy()
        total, hits = None, 0
        for q in range(t, 2 * t):
            cell = qk_attribution(model_2l, fp, layer=int(layer), head=int(head), query=q,
                                  key=int(pattern[q].argmax()))
            i, j = np.unravel_index(np.argmax(cell.terms), cell.terms.shape)
            hits += _is_induction_term(cell, i, j, probe.previous_token)
            total = cell.terms if total is None else total + cell.terms
        i, j = np.unravel_index(np.argmax(total), total.shape)
        assert _is_induction_term(cell, i, j, probe.previous_token), (layer, head, i, j)
        assert hits > t // 2, (layer, head, hits)


def _is_induction_term(cell, i: int, j: int, previous_token: np.ndarray) -> bool:
    if cell.q_kinds[i] != "embed" or cell.k_kinds[j] != "head":
        return False
    name = cell.k_labels[j]  # "L{layer}H{head}"
    layer, head = (int(x) for x in name[1:].split("H"))
    return layer == 0 and previous_token[layer, head] >= 0.5


def test_bad_input(model_2l):
    fp = run_forward(model_2l, TEXT)
    with pytest.raises(AnalysisError, match="comes after query"):
        qk_attribution(model_2l, fp, layer=1, head=5, query=3, key=4)
    with pytest.raises(AnalysisError, match="comes after query"):
        qk_attribution(model_2l, fp, layer=1, head=5, query=9, key=2, contrast_key=10)
    with pytest.raises(AnalysisError, match="head 12 does not exist"):
        qk_attribution(model_2l, fp, layer=1, head=12, query=3, key=1)
    with pytest.raises(AnalysisError, match="layer 2 does not exist"):
        qk_attribution_row(model_2l, fp, layer=2, head=0, query=3)
    with pytest.raises(AnalysisError, match="outside the prompt"):
        qk_attribution(model_2l, fp, layer=1, head=0, query=500, key=1)
    with pytest.raises(AnalysisError, match="whole number"):
        qk_attribution(model_2l, fp, layer=1, head=0, query=3, key=1.5)
