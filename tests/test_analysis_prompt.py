"""Per-prompt analyses: exact identities on seeded tiny random models, and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attention_lens.analysis import AnalysisError, run_forward
from attention_lens.analysis.ablation import ablate_heads, ablated_logits
from attention_lens.analysis.attention import (
    attention_pattern,
    attention_patterns,
    head_outputs,
    pattern_entropy,
    residual_stream,
)
from attention_lens.analysis.attribution import logit_attribution
from attention_lens.analysis.logit_lens import lens_stages, logit_lens, stage_logits
from attention_lens.analysis.predictions import next_token, token_id, token_predictions

TEXT = "Harry Potter went to the shop, and Harry Potter bought a wand."


@pytest.fixture
def fp_tiny(tiny):
    return run_forward(tiny, TEXT)


@pytest.fixture
def fp_ln(tiny_ln):
    return run_forward(tiny_ln, TEXT)


# ---------------------------------------------------------------------- predictions
def test_next_token_matches_softmax(tiny, fp_tiny):
    res = next_token(tiny, fp_tiny, k=7)
    probs = torch.softmax(fp_tiny.logits[-1].double(), -1)
    order = torch.argsort(probs, descending=True)[:7].numpy()
    np.testing.assert_array_equal(res.token_ids, order)
    np.testing.assert_allclose(res.probs, probs[order].numpy(), atol=1e-9)
    np.testing.assert_allclose(res.logits, fp_tiny.logits[-1, order].numpy(), atol=1e-6)
    np.testing.assert_array_equal(res.ranks, np.arange(1, 8))
    assert np.all(np.diff(res.probs) <= 0)
    assert res.position == fp_tiny.n_tokens - 1
    assert res.display == tuple(tiny.tokenizer.display(int(i)) for i in order)
    entropy = -(probs * probs.log()).sum().item()
    assert res.entropy == pytest.approx(entropy, rel=1e-9)


def test_next_token_at_position(tiny, fp_tiny):
    res = next_token(tiny, fp_tiny, k=3, position=2)
    assert res.position == 2 and res.context == fp_tiny.display[2]
    assert res.token_ids[0] == int(fp_tiny.logits[2].argmax())


def test_token_predictions_consistent_with_softmax(tiny, fp_tiny):
    res = token_predictions(tiny, fp_tiny, k=4)
    p = fp_tiny.n_tokens
    log_probs = torch.log_softmax(fp_tiny.logits.double(), -1)
    ids = fp_tiny.token_ids
    for i in range(p - 1):
        lp = log_probs[i, ids[i + 1]].item()
        assert res.next_ids[i] == ids[i + 1]
        assert res.next_probs[i] == pytest.approx(math.exp(lp), rel=1e-9)
        assert res.surprisal_nats[i] == pytest.approx(-lp, rel=1e-9)
        rank = int((fp_tiny.logits[i] > fp_tiny.logits[i, ids[i + 1]]).sum()) + 1
        assert res.next_ranks[i] == rank
        assert res.top_ids[i, 0] == int(fp_tiny.logits[i].argmax())
    assert res.next_ids[-1] == -1 and res.next_ranks[-1] == -1
    assert math.isnan(res.next_probs[-1]) and math.isnan(res.surprisal_nats[-1])
    assert res.top_ids.shape == res.top_display.shape == (p, 4)
    # mean loss equals the model's own cross-entropy
    loss = tiny.model.loss(torch.as_tensor(ids)).item()
    assert res.loss == pytest.approx(loss, rel=1e-5)
    # the actual token is among the top-k exactly when its rank is <= k
    for i in range(p - 1):
        assert (res.next_ids[i] in res.top_ids[i]) == (res.next_ranks[i] <= 4)


def test_one_token_prompt_has_no_loss(tiny):
    fp = run_forward(tiny, "a")
    res = token_predictions(tiny, fp, k=2)
    assert fp.n_tokens == 1 and math.isnan(res.loss)


@pytest.mark.parametrize("k", [0, -1, 10**6, 2.5, True])
def test_bad_k(tiny, fp_tiny, k):
    with pytest.raises(AnalysisError, match="k must"):
        next_token(tiny, fp_tiny, k=k)
    with pytest.raises(AnalysisError, match="k must"):
        token_predictions(tiny, fp_tiny, k=k)


def test_k_equal_to_vocab_allowed(tiny, fp_tiny):
    res = next_token(tiny, fp_tiny, k=tiny.cfg.d_vocab)
    assert sorted(res.token_ids.tolist()) == list(range(tiny.cfg.d_vocab))
    assert res.probs.sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("position", [100, -100])
def test_bad_position(tiny, fp_tiny, position):
    with pytest.raises(AnalysisError, match="outside the prompt"):
        next_token(tiny, fp_tiny, position=position)


def test_empty_prompt(tiny):
    for text in ("", "   "):
        with pytest.raises(AnalysisError, match="empty"):
            run_forward(tiny, text)


def test_token_id(tiny):
    tid = tiny.tokenizer.encode(" Potter")
    assert len(tid) == 1
    assert token_id(tiny, " Potter") == tid[0]
    assert token_id(tiny, 5) == 5
    assert token_id(tiny, np.int64(7)) == 7
    with pytest.raises(AnalysisError, match="not a single token"):
        token_id(tiny, " Potter bought")
    with pytest.raises(AnalysisError, match="empty"):
        token_id(tiny, "")
    with pytest.raises(AnalysisError, match="outside the vocabulary"):
        token_id(tiny, tiny.cfg.d_vocab)
    with pytest.raises(AnalysisError, match="outside the vocabulary"):
        token_id(tiny, -1)
    with pytest.raises(AnalysisError):
        token_id(tiny, None)


# ------------------------------------------------------------------------ attention
def test_entropy_of_uniform_row_is_log_n():
    n = 7
    row = np.full(n, 1.0 / n)
    assert pattern_entropy(row) == pytest.approx(math.log(n), rel=1e-12)
    one_hot = np.eye(5)
    np.testing.assert_allclose(pattern_entropy(one_hot), 0.0)


def test_uniform_head_has_maximal_entropy(tiny):
    # W_K = b_K = 0 makes every score equal, so each query attends uniformly to its prefix
    with torch.no_grad():
        tiny.model.blocks[0].attn.W_K[1].zero_()
        tiny.model.blocks[0].attn.b_K[1].zero_()
    fp = run_forward(tiny, TEXT)
    res = attention_pattern(tiny, fp, layer=0, head=1)
    p = fp.n_tokens
    np.testing.assert_allclose(res.entropy, np.log(np.arange(1, p + 1)), atol=1e-5)
    np.testing.assert_allclose(res.pattern, np.tril(np.ones((p, p))) / np.arange(1, p + 1)[:, None],
                               atol=1e-6)
    every = attention_patterns(tiny, fp)
    np.testing.assert_allclose(every.entropy_per_query[0, 1], every.max_entropy, atol=1e-5)
    assert np.all(every.entropy_per_query <= every.max_entropy + 1e-5)


def test_attention_pattern(tiny, fp_tiny):
    res = attention_pattern(tiny, fp_tiny, layer=1, head=2, n_top=5)
    cached = fp_tiny.cache["blocks.1.attn.hook_pattern"][2].numpy()
    np.testing.assert_array_equal(res.pattern, cached)
    np.testing.assert_allclose(res.pattern.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(res.pattern, 1) == 0)
    assert res.mean_entropy == pytest.approx(res.entropy.mean())
    # strongest cells really are the strongest below the diagonal (query 0 excluded)
    masked = np.tril(res.pattern).copy()
    masked[0] = -1
    masked[np.triu_indices(fp_tiny.n_tokens, 1)] = -1
    best = np.sort(masked.ravel())[::-1][:5]
    np.testing.assert_allclose(res.top_weights, best)
    np.testing.assert_allclose(res.pattern[res.top_queries, res.top_keys], res.top_weights)
    assert np.all(res.top_keys <= res.top_queries) and np.all(res.top_queries > 0)
    # negative indices count from the end
    res2 = attention_pattern(tiny, fp_tiny, layer=-1, head=-2)
    assert (res2.layer, res2.head) == (1, 2)


def test_attention_patterns_shape(tiny, fp_tiny):
    res = attention_patterns(tiny, fp_tiny)
    p = fp_tiny.n_tokens
    assert res.patterns.shape == (2, 4, p, p)
    assert res.entropy.shape == (2, 4)
    np.testing.assert_allclose(res.entropy, res.entropy_per_query.mean(-1))


@pytest.mark.parametrize("layer,head,match", [(2, 0, "layer 2"), (-3, 0, "layer -3"),
                                              (0, 4, "head 4"), (0, -5, "head -5"),
                                              (0.5, 0, "layer must")])
def test_bad_layer_head(tiny, fp_tiny, layer, head, match):
    with pytest.raises(AnalysisError, match=match):
        attention_pattern(tiny, fp_tiny, layer=layer, head=head)


def test_residual_stream(tiny_ln, fp_ln):
    res = residual_stream(tiny_ln, fp_ln)
    assert res.resid.shape == (3, fp_ln.n_tokens, 32)
    emb = tiny_ln.model.W_E[fp_ln.token_ids] + tiny_ln.model.W_pos[: fp_ln.n_tokens]
    np.testing.assert_allclose(res.resid[0], emb.numpy(), atol=1e-6)
    np.testing.assert_allclose(res.norms, np.linalg.norm(res.resid, axis=-1))
    assert res.labels[-1] == "blocks.1.hook_resid_post"


def test_head_outputs_sum_to_attention_output(tiny, fp_tiny):
    res = head_outputs(tiny, fp_tiny)
    assert res.norms.shape == (2, 4, fp_tiny.n_tokens)
    # with hook_result active, the model computes each head's output itself
    _, cache = tiny.model.run_with_cache(torch.as_tensor(fp_tiny.token_ids),
                                         names_filter=lambda n: n.endswith("hook_result"))
    for layer in range(2):
        direct = cache[f"blocks.{layer}.attn.hook_result"][0].norm(dim=-1).T.numpy()
        np.testing.assert_allclose(res.norms[layer], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.b_O_norms, tiny.model.b_O.norm(dim=-1).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------ logit lens
@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_logit_lens_last_stage_is_model_logits(which, granularity, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    stages = lens_stages(lm, granularity)
    last = stage_logits(lm, fp.cache[stages[-1][1]])
    torch.testing.assert_close(last, fp.logits, atol=1e-5, rtol=0)
    res = logit_lens(lm, fp, k=3, target=" Potter", granularity=granularity)
    probs = torch.softmax(fp.logits.double(), -1)
    top = torch.topk(fp.logits, 3, dim=-1)
    np.testing.assert_array_equal(res.top_ids[-1], top.indices.numpy())
    np.testing.assert_allclose(res.top_probs[-1], probs.gather(-1, top.indices).numpy(),
                               atol=1e-6)
    tid = token_id(lm, " Potter")
    np.testing.assert_allclose(res.target_probs[-1], probs[:, tid].numpy(), atol=1e-6)
    ranks = (fp.logits > fp.logits[:, tid:tid + 1]).sum(-1) + 1
    np.testing.assert_array_equal(res.target_ranks[-1], ranks.numpy())
    preds = token_predictions(lm, fp, k=3)
    np.testing.assert_allclose(res.next_probs[-1], preds.next_probs, atol=1e-6)
    np.testing.assert_array_equal(res.next_ranks[-1], preds.next_ranks)


def test_logit_lens_stages(tiny, tiny_ln):
    assert [h for _, h in lens_stages(tiny)] == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    assert [h for _, h in lens_stages(tiny_ln)] == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    assert lens_stages(tiny_ln)[-1][0].endswith("(final)")
    assert len(lens_stages(tiny_ln, "layer")) == 3
    with pytest.raises(AnalysisError, match="granularity"):
        lens_stages(tiny, "heads")


def test_logit_lens_recomputes_layernorm_per_stage(tiny_ln, fp_ln):
    model = tiny_ln.model
    x = fp_ln.cache["blocks.0.hook_resid_pre"].double()
    xc = x - x.mean(-1, keepdim=True)
    own = xc / (xc.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    ln = model.ln_final
    expected = (own * ln.w.double() + ln.b.double()) @ model.W_U.double() + model.b_U.double()
    got = stage_logits(tiny_ln, fp_ln.cache["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    # the cached final scale would give different numbers (the bug this guards against)
    stale = xc / fp_ln.cache["ln_final.hook_scale"].double()
    wrong = (stale * ln.w.double() + ln.b.double()) @ model.W_U.double() + model.b_U.double()
    assert (wrong - expected).abs().max() > 1e-2


def test_logit_lens_without_target(tiny, fp_tiny):
    res = logit_lens(tiny, fp_tiny, k=2)
    assert res.target_id is None and res.target_probs is None
    assert res.top_ids.shape == (3, fp_tiny.n_tokens, 2)
    assert res.top_display.shape == res.top_ids.shape
    # the embeddings stage of an attention-only model without LN is (W_E[t] + W_pos) W_U + b_U
    m = tiny.model
    direct = (m.W_E[fp_tiny.token_ids] + m.W_pos[: fp_tiny.n_tokens]) @ m.W_U + m.b_U
    np.testing.assert_array_equal(res.top_ids[0], torch.topk(direct, 2).indices.numpy())


def test_logit_lens_bad_input(tiny, fp_tiny):
    with pytest.raises(AnalysisError, match="not a single token"):
        logit_lens(tiny, fp_tiny, target="Harry Potter went")
    with pytest.raises(AnalysisError, match="k must"):
        logit_lens(tiny, fp_tiny, k=0)
    with pytest.raises(AnalysisError, match="outside the vocabulary"):
        logit_lens(tiny, fp_tiny, target=10**6)


# ----------------------------------------------------------------------- attribution
@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
@pytest.mark.parametrize("position", [-1, 3])
def test_attribution_sums_to_logit_minus_bias(which, position, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    res = logit_attribution(lm, fp, target=" Potter", position=position)
    u = token_id(lm, " Potter")
    pos = position % fp.n_tokens
    expected = float(fp.logits[pos, u] - lm.model.b_U[u])
    assert res.total == pytest.approx(expected, abs=1e-4)
    assert res.logit - res.bias == pytest.approx(expected, abs=1e-6)
    n_heads = lm.cfg.n_layers * lm.cfg.n_heads
    assert res.kinds.count("head") == n_heads
    assert res.heads.shape == (lm.cfg.n_layers, lm.cfg.n_heads)
    heads = np.array([v for v, k in zip(res.values, res.kinds) if k == "head"])
    np.testing.assert_allclose(res.heads.ravel(), heads)
    if which == "tiny_ln":
        assert res.kinds.count("mlp") == 2 and res.kinds[-1] == "ln_bias"
        assert res.normalization == "LN"
    else:
        assert "mlp" not in res.kinds and "ln_bias" not in res.kinds


@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
def test_attribution_logit_difference(which, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    u, u2 = token_id(lm, " Potter"), token_id(lm, " Harry")
    res = logit_attribution(lm, fp, target=u, contrast=" Harry")
    b = lm.model.b_U
    expected = float((fp.logits[-1, u] - fp.logits[-1, u2]) - (b[u] - b[u2]))
    assert res.total == pytest.approx(expected, abs=1e-4)
    single = logit_attribution(lm, fp, target=u)
    other = logit_attribution(lm, fp, target=u2)
    np.testing.assert_allclose(res.values, single.values - other.values, atol=1e-9)


def test_attribution_components_of_attention_only_model(tiny, fp_tiny):
    # head attributions are the heads' exact outputs projected on W_U[:, u]
    res = logit_attribution(tiny, fp_tiny)
    u = int(fp_tiny.logits[-1].argmax())
    assert res.target_id == u
    _, cache = tiny.model.run_with_cache(torch.as_tensor(fp_tiny.token_ids),
                                         names_filter=lambda n: n.endswith("hook_result"))
    for layer in range(2):
        out = cache[f"blocks.{layer}.attn.hook_result"][0, -1] @ tiny.model.W_U[:, u]
        np.testing.assert_allclose(res.heads[layer], out.numpy(), atol=1e-5)
    assert res.labels[:2] == ("embed", "pos_embed")


def test_attribution_bad_input(tiny, fp_tiny):
    with pytest.raises(AnalysisError, match="not a single token"):
        logit_attribution(tiny, fp_tiny, target="Harry Potter went")
    with pytest.raises(AnalysisError, match="outside the prompt"):
        logit_attribution(tiny, fp_tiny, position=fp_tiny.n_tokens)
    with pytest.raises(AnalysisError, match="outside the vocabulary"):
        logit_attribution(tiny, fp_tiny, target=1, contrast=-3)


# -------------------------------------------------------------------------- ablation
ALL_HEADS = [(layer, head) for layer in range(2) for head in range(4)]


def test_zero_ablating_every_head_leaves_the_direct_path(tiny, fp_tiny):
    m = tiny.model
    after = ablated_logits(tiny, fp_tiny, ALL_HEADS, "zero")
    # each attention layer still adds its output bias b_O, so the residual stream is
    # W_E[t] + W_pos + sum_l b_O[l], and the logits are that times W_U plus b_U
    p = fp_tiny.n_tokens
    direct = (m.W_E[fp_tiny.token_ids] + m.W_pos[:p]) @ m.W_U + m.b_U
    expected = direct + m.b_O.sum(0) @ m.W_U
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    # the bias term is not negligible here, so the check above could fail without it
    assert (after - direct).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablating_a_last_layer_head_removes_exactly_its_output(tiny, fp_tiny, method):
    m = tiny.model
    z = fp_tiny.cache["blocks.1.attn.hook_z"][:, 3]  # [p, e]
    removed = z if method == "zero" else z - z.mean(0)
    expected = fp_tiny.logits - removed @ m.blocks[1].attn.W_O[3] @ m.W_U
    after = ablated_logits(tiny, fp_tiny, [(1, 3)], method)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_mean_ablation_of_one_token_prompt_changes_nothing(tiny):
    fp = run_forward(tiny, "a")
    res = ablate_heads(tiny, fp, heads=ALL_HEADS, method="mean", k=3)
    assert res.kl == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(res.before_ids, res.after_ids)
    assert math.isnan(res.loss_before) and math.isnan(res.loss_after)


def test_ablation_report(tiny, fp_tiny):
    res = ablate_heads(tiny, fp_tiny, heads=[(0, 1), (1, 2), (0, 1)], k=4, target=" Potter")
    assert res.heads == ((0, 1), (1, 2))
    after = ablated_logits(tiny, fp_tiny, res.heads, "zero")
    u = token_id(tiny, " Potter")
    pb = torch.softmax(fp_tiny.logits[-1].double(), -1)
    pa = torch.softmax(after[-1].double(), -1)
    assert res.target_id == u
    assert res.target_logit_before == pytest.approx(float(fp_tiny.logits[-1, u]))
    assert res.target_logit_after == pytest.approx(float(after[-1, u]))
    assert res.target_prob_after == pytest.approx(float(pa[u]), rel=1e-6)
    assert res.target_prob_change == pytest.approx(float(pa[u] - pb[u]), rel=1e-5, abs=1e-9)
    kl = float((pb * (pb.log() - pa.log())).sum())
    assert res.kl == pytest.approx(kl, rel=1e-5) and res.kl > 0
    assert res.kl_per_position[-1] == pytest.approx(res.kl)
    np.testing.assert_array_equal(res.after_ids, torch.topk(after[-1], 4).indices.numpy())
    np.testing.assert_allclose(res.union_after[: 4], pa[res.before_ids].numpy(), rtol=1e-6)
    assert set(res.after_ids) <= set(res.union_ids)
    ids = torch.as_tensor(fp_tiny.token_ids)
    loss_after = float(torch.nn.functional.cross_entropy(after[:-1].double(), ids[1:]))
    assert res.loss_after == pytest.approx(loss_after, rel=1e-5)
    assert res.loss_before == pytest.approx(tiny.model.loss(ids).item(), rel=1e-5)
    assert res.loss_change == pytest.approx(res.loss_after - res.loss_before)


def test_ablation_on_layernorm_model(tiny_ln, fp_ln):
    res = ablate_heads(tiny_ln, fp_ln, heads=[(1, 0)], method="mean", k=2, position=4)
    assert res.position == 4 and res.kl == pytest.approx(res.kl_per_position[4]) and res.kl > 0
    preds = token_predictions(tiny_ln, fp_ln, k=2)
    np.testing.assert_allclose(res.surprisal_before, preds.surprisal_nats, rtol=1e-6)
    # mean-ablation replaces z at every position, so every position's prediction moves
    assert np.all(res.kl_per_position > 0)


@pytest.mark.parametrize("heads,match", [([], "at least one head"), ([(2, 0)], "layer 2"),
                                         ([(0, 9)], "head 9"), ([(0,)], "pairs"),
                                         (5, "pairs")])
def test_ablation_bad_heads(tiny, fp_tiny, heads, match):
    with pytest.raises(AnalysisError, match=match):
        ablate_heads(tiny, fp_tiny, heads=heads)


def test_ablation_bad_method_and_k(tiny, fp_tiny):
    with pytest.raises(AnalysisError, match="method"):
        ablate_heads(tiny, fp_tiny, heads=[(0, 0)], method="resample")
    with pytest.raises(AnalysisError, match="k must"):
        ablate_heads(tiny, fp_tiny, heads=[(0, 0)], k=0)
    with pytest.raises(AnalysisError, match="not a single token"):
        ablate_heads(tiny, fp_tiny, heads=[(0, 0)], target="Harry Potter went")


# ------------------------------------------------------------- the shipped 2-layer model
INDUCTION_HEADS = [(1, 5), (1, 0), (1, 10), (1, 6)]  # probe scores ~0.86 (model card)


@pytest.fixture(scope="module")
def fp_repeat(model_2l):
    """A random sequence of 20 ordinary tokens, then the same 20 again."""
    from attention_lens.analysis.probe import ordinary_token_ids, repeated_random_tokens

    ids = repeated_random_tokens(ordinary_token_ids(model_2l.tokenizer.strings), seq_len=20,
                                 batch=1, seed=0)[0]
    return run_forward(model_2l, "", token_ids=[int(i) for i in ids])


def test_shipped_induction_heads_carry_the_repeat(model_2l, fp_repeat):
    second_half = slice(20, -1)
    res = ablate_heads(model_2l, fp_repeat, heads=INDUCTION_HEADS)
    before = np.mean(res.surprisal_before[second_half])
    after = np.mean(res.surprisal_after[second_half])
    assert after > before + 2.0  # the repeat stops being predictable
    others = ablate_heads(model_2l, fp_repeat, heads=[(1, 1), (1, 2), (1, 3), (1, 4)])
    assert np.mean(others.surprisal_after[second_half]) < after - 1.0
    # direct logit attribution of the repeated token: the induction heads write it
    attr = logit_attribution(model_2l, fp_repeat, target=int(fp_repeat.token_ids[-1]),
                             position=-2)
    assert attr.total == pytest.approx(attr.logit - attr.bias, abs=1e-4)
    top4 = {(1, int(h)) for h in np.argsort(-attr.heads[1])[:4]}
    assert len(top4 & set(INDUCTION_HEADS)) >= 3


def test_shipped_logit_lens_final_stage(model_2l, fp_repeat):
    stages = lens_stages(model_2l)
    torch.testing.assert_close(stage_logits(model_2l, fp_repeat.cache[stages[-1][1]]),
                               fp_repeat.logits, atol=1e-5, rtol=0)
