"""Activation, attribution and path patching: TransformerLens 3.9 as the oracle, identities,
an independent two-pass path-patching reference, and bad input."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from tl_oracle import path_patch_with_hooks, to_transformer_lens

from attention_lens.analysis import patching as P
from attention_lens.analysis.errors import AnalysisError
from tests.conftest import make_tiny

tl_patching = pytest.importorskip("transformer_lens.patching")

SHIPPED = dict(clean=" The cat sat on the mat. The cat sat on the",
               corrupted=" The man sat on the mat. The cat sat on the",
               correct=" mat", wrong=" man")
TINY = dict(clean="Harry Potter went to the shop, and Harry",
            corrupted="Harry Potter went to and shop, and Harry",
            correct=" Potter", wrong=" the")

TL_FUNCTIONS = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "head_out": "get_act_patch_attn_head_out_all_pos",
    "head_out_by_pos": "get_act_patch_attn_head_out_by_pos",
    "head_q": "get_act_patch_attn_head_q_all_pos",
    "head_k": "get_act_patch_attn_head_k_all_pos",
    "head_v": "get_act_patch_attn_head_v_all_pos",
    "head_pattern": "get_act_patch_attn_head_pattern_all_pos",
}


def _pair_for(lm) -> dict:
    return TINY if lm.name.startswith("tiny") else SHIPPED


def _tl_grid(lm, tl, pair: dict, granularity: str, metric: str = "logit_diff",
             direction: str = "denoising") -> np.ndarray:
    """TransformerLens' grid for the same pair and metric (noising: the prompts swapped)."""
    s = P._Setup(lm, pair["clean"], pair["corrupted"], pair["correct"], pair.get("wrong"),
                 metric, direction, -1)
    base = torch.tensor([s.base_ids])
    _, source_cache = tl.run_with_cache(torch.tensor([s.source_ids]))
    fn = getattr(tl_patching, TL_FUNCTIONS[granularity])
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        out = fn(tl, base, source_cache, lambda logits: s.metric.on_full_logits(logits))
    return out.numpy()


@pytest.fixture(params=["model_1l", "model_2l", "tiny_ln"])
def any_model(request):
    return request.getfixturevalue(request.param)


def test_every_grid_equals_transformer_lens(any_model):
    lm = any_model
    tl = to_transformer_lens(lm)
    pair = _pair_for(lm)
    for granularity in P.GRANULARITIES:
        if granularity == "mlp_out" and lm.cfg.attn_only:
            continue
        ours = P.activation_patching(lm, **pair, granularity=granularity)
        theirs = _tl_grid(lm, tl, pair, granularity)
        assert ours.values.shape == theirs.shape, granularity
        np.testing.assert_allclose(ours.values, theirs, atol=1e-4, rtol=0, err_msg=granularity)
        assert ours.n_runs == theirs.size
        assert np.isfinite(ours.attribution).all()


@pytest.mark.parametrize("metric", ["normalized", "logprob", "kl"])
def test_other_metrics_and_noising_equal_transformer_lens(model_2l, tiny_ln, metric):
    for lm, granularities in ((model_2l, ("resid_pre", "head_out")),
                              (tiny_ln, ("attn_out", "mlp_out", "head_k"))):
        tl = to_transformer_lens(lm)
        pair = _pair_for(lm)
        for direction in P.DIRECTIONS:
            for granularity in granularities:
                ours = P.activation_patching(lm, **pair, granularity=granularity, metric=metric,
                                             direction=direction)
                theirs = _tl_grid(lm, tl, pair, granularity, metric, direction)
                np.testing.assert_allclose(ours.values, theirs, atol=1e-4, rtol=0,
                                           err_msg=f"{lm.name} {granularity} {direction}")


def test_metric_position_other_than_last(model_2l):
    lm = model_2l
    tl = to_transformer_lens(lm)
    pair = SHIPPED
    ours = P.activation_patching(lm, **pair, granularity="resid_pre", position=6)
    s = P._Setup(lm, pair["clean"], pair["corrupted"], pair["correct"], pair["wrong"],
                 "logit_diff", "denoising", 6)
    _, cache = tl.run_with_cache(torch.tensor([s.clean_ids]))
    with contextlib.redirect_stderr(io.StringIO()):
        theirs = tl_patching.get_act_patch_resid_pre(
            tl, torch.tensor([s.corrupted_ids]), cache, s.metric.on_full_logits).numpy()
    np.testing.assert_allclose(ours.values, theirs, atol=1e-4, rtol=0)
    assert (ours.values[:, 7:] == ours.base_metric).all()  # after the metric position: no effect


# ------------------------------------------------------------------------ identities
def test_self_patch_changes_nothing(model_2l, tiny_ln):
    for lm in (model_2l, tiny_ln):
        pair = dict(_pair_for(lm))
        pair["corrupted"] = pair["clean"]
        for granularity in P.GRANULARITIES:
            if granularity == "mlp_out" and lm.cfg.attn_only:
                continue
            for direction in P.DIRECTIONS:
                g = P.activation_patching(lm, **pair, granularity=granularity,
                                          direction=direction)
                assert np.abs(g.effect).max() <= 1e-6
                assert np.abs(g.attribution_effect).max() <= 1e-6


def test_denoising_the_embedding_reproduces_the_clean_metric(model_2l, tiny_ln):
    for lm in (model_2l, tiny_ln):
        pair = _pair_for(lm)
        clean, corrupted = P.pair_tokens(lm, pair["clean"], pair["corrupted"])
        differ = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
        assert len(differ) == 1  # one token differs: patching resid_pre[0] there is the clean run
        for direction, target in (("denoising", "clean_metric"), ("noising", "corrupted_metric")):
            g = P.activation_patching(lm, **pair, granularity="resid_pre", direction=direction)
            assert g.values[0, differ[0]] == pytest.approx(getattr(g, target), abs=1e-5)
            others = np.delete(g.values[0], differ[0])
            assert (others == g.base_metric).all()


def test_attribution_is_exact_where_the_metric_is_linear(model_2l, tiny):
    # Attention-only model, logit difference: the last layer's head outputs reach the logits
    # linearly, so the first-order estimate is exact there.
    for lm in (model_2l, tiny):
        pair = _pair_for(lm)
        last = lm.cfg.n_layers - 1
        for granularity in ("head_out", "head_out_by_pos", "attn_out"):
            g = P.activation_patching(lm, **pair, granularity=granularity)
            np.testing.assert_allclose(g.attribution[last], g.values[last], atol=1e-4)
    # ... and not in general: the earlier layer goes through attention (non-linear)
    g = P.activation_patching(model_2l, **SHIPPED, granularity="resid_pre")
    assert np.abs(g.attribution[0] - g.values[0]).max() > 1e-2
    assert -1 <= g.correlation <= 1


# ----------------------------------------------------------------------- path patching
def _runs(lm, pair):
    """The setup (metric, token ids) and plain caches of both prompts."""
    s = P._Setup(lm, pair["clean"], pair["corrupted"], pair["correct"], pair["wrong"],
                 "logit_diff", "denoising", -1)
    _, cc = lm.model.run_with_cache(torch.tensor([s.clean_ids]))
    _, rc = lm.model.run_with_cache(torch.tensor([s.corrupted_ids]))
    return s, cc, rc


def _plain_path_patch(lm, runs, sender, receiver, component, ln="recomputed"):
    """Rerun the corrupted prompt with the receiver's q/k/v recomputed from (corrupted
    residual + the sender's clean − corrupted output), every other input unchanged (the
    "MLPs frozen" variant)."""
    model = lm.model
    s, cc, rc = runs
    (ls, hs), (lr, hr) = sender, receiver
    w_o = model.blocks[ls].attn.W_O[hs]
    delta = (cc[f"blocks.{ls}.attn.hook_z"][0, :, hs] - rc[f"blocks.{ls}.attn.hook_z"][0, :, hs]
             ) @ w_o
    attn = model.blocks[lr].attn
    x = rc[f"blocks.{lr}.hook_resid_pre"][0] + delta
    if ln == "recomputed":
        x = model.blocks[lr].ln1(x)
    else:
        scale = rc[f"blocks.{lr}.ln1.hook_scale"][0]
        x = model.blocks[lr].ln1(rc[f"blocks.{lr}.hook_resid_pre"][0]) + delta / scale
    w = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[component][hr]
    b = {"q": attn.b_Q, "k": attn.b_K, "v": attn.b_V}[component][hr]
    new = x @ w + b

    def hook(act, hook):
        act = act.clone()
        act[0, :, hr] = new
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([s.corrupted_ids]),
                                      fwd_hooks=[(f"blocks.{lr}.attn.hook_{component}", hook)])
    return float(s.metric.on_full_logits(logits))


def _plain_direct(lm, runs, sender):
    model = lm.model
    s, cc, rc = runs
    ls, hs = sender
    name = f"blocks.{ls}.attn.hook_z"
    delta = (cc[name][0, -1, hs] - rc[name][0, -1, hs]) @ model.blocks[ls].attn.W_O[hs]
    final = rc[f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post"][0, -1] + delta
    if lm.cfg.normalization_type:
        final = model.ln_final(final)
    return float(s.metric(model.unembed(final)))


def test_path_patching_equals_two_pass_reference(model_2l, tiny_ln):
    for lm, senders in ((model_2l, [(0, 1), (0, 7)]), (tiny_ln, [(0, 2)])):
        pair = _pair_for(lm)
        runs = _runs(lm, pair)
        for sender in senders:
            pp = P.path_patching(lm, **pair, sender=sender, mlps="frozen")
            assert np.isnan(pp.values[0]).all()
            for hr in range(lm.cfg.n_heads):
                for c, comp in enumerate(P.COMPONENTS):
                    ref = _plain_path_patch(lm, runs, sender, (1, hr), comp)
                    assert pp.values[1, hr, c] == pytest.approx(ref, abs=1e-4), (sender, hr, comp)
            assert pp.direct == pytest.approx(_plain_direct(lm, runs, sender), abs=1e-4)


def test_path_patching_equals_transformer_lens_direct_path(tiny_ln):
    # TransformerLens linearises LayerNorm (frozen scale, no centring, weight 1): give the
    # model unit LN weights and W_O that writes mean-zero vectors, where that is exact.
    from transformer_lens.tools.analysis import get_act_patch_direct_path

    lm = tiny_ln
    with torch.no_grad():
        for blk in lm.model.blocks:
            blk.ln1.w.fill_(1.0)
            blk.attn.W_O.sub_(blk.attn.W_O.mean(-1, keepdim=True))
    tl = to_transformer_lens(lm)
    pair = TINY
    s = P._Setup(lm, pair["clean"], pair["corrupted"], pair["correct"], pair["wrong"],
                 "logit_diff", "denoising", -1)
    _, cc = tl.run_with_cache(torch.tensor([s.clean_ids]))
    corrupted = torch.tensor([s.corrupted_ids])
    _, rc = tl.run_with_cache(corrupted)
    for sender in [(0, 0), (0, 3)]:
        ours = P.path_patching(lm, **pair, sender=sender, ln_mode="frozen", mlps="frozen")
        for c, comp in enumerate(P.COMPONENTS):
            theirs = get_act_patch_direct_path(
                tl, corrupted, cc, rc, s.metric.on_full_logits, src_layer=sender[0],
                src_head=sender[1], component=comp, verbose=False).numpy()
            np.testing.assert_allclose(ours.values[1, :, c], theirs[1], atol=1e-4)
            ref = _plain_path_patch(lm, _runs(lm, pair), sender, (1, 1), comp, ln="frozen")
            assert ours.values[1, 1, c] == pytest.approx(ref, abs=1e-4)


def test_path_table_matches_single_senders(model_2l, deep_ln):
    table = P.path_patching_table(model_2l, **SHIPPED)
    one = P.path_patching(model_2l, **SHIPPED, sender=(0, 7))
    np.testing.assert_allclose(table.values[0, 7], one.values, atol=1e-6)
    assert table.direct[0, 7] == pytest.approx(one.direct, abs=1e-6)
    assert np.isnan(table.values[1]).all()
    for mlps in P.MLP_MODES:
        table = P.path_patching_table(deep_ln, **TINY, mlps=mlps)
        assert table.mlps == mlps
        one = P.path_patching(deep_ln, **TINY, sender=(1, 2), mlps=mlps)
        np.testing.assert_allclose(table.values[1, 2], one.values, atol=1e-6)
        assert table.direct[1, 2] == pytest.approx(one.direct, abs=1e-6)


# ------------------------------------------------ path patching's two variants, by hooks
@pytest.fixture(scope="module")
def deep_ln(tiny_tokenizer):
    """A random four-layer GPT-2-like model: LayerNorm, GELU MLPs."""
    return make_tiny(tiny_tokenizer, seed=3, n_layers=4, attn_only=False, d_mlp=64,
                     act_fn="gelu", normalization_type="LN", name="tiny-deep")


@pytest.fixture(scope="module")
def deep_tl(deep_ln):
    return to_transformer_lens(deep_ln)


@pytest.mark.parametrize("mlps", P.MLP_MODES)
def test_path_patching_variants_equal_transformer_lens_hooks(deep_ln, deep_tl, mlps):
    """Both variants, both LayerNorm modes and both directions against two hooked
    TransformerLens runs (ARENA's construction; tl_oracle.path_patch_with_hooks)."""
    lm, tl = deep_ln, deep_tl
    for direction, sender in (("denoising", (0, 1)), ("noising", (1, 3))):
        s = P._Setup(lm, TINY["clean"], TINY["corrupted"], TINY["correct"], TINY["wrong"],
                     "logit_diff", direction, -1)
        base = torch.tensor([s.base_ids])
        _, base_cache = tl.run_with_cache(base)
        _, source_cache = tl.run_with_cache(torch.tensor([s.source_ids]))
        for ln_mode in ("recomputed", "frozen"):
            ours = P.path_patching(lm, **TINY, sender=sender, direction=direction,
                                   ln_mode=ln_mode, mlps=mlps)
            assert ours.mlps == mlps
            for c, comp in enumerate(P.COMPONENTS):
                theirs, direct = path_patch_with_hooks(
                    tl, base, base_cache, source_cache, sender, comp, s.metric.on_full_logits,
                    mlps=mlps, ln_mode=ln_mode)
                np.testing.assert_allclose(ours.values[..., c], theirs.numpy(), atol=1e-5,
                                           rtol=1e-6, err_msg=f"{direction} {ln_mode} {comp}")
            assert ours.direct == pytest.approx(direct, abs=1e-5)


def test_path_patching_variants_differ_only_through_mlps(deep_ln, model_2l):
    frozen = P.path_patching(deep_ln, **TINY, sender=(0, 1), mlps="frozen")
    recomputed = P.path_patching(deep_ln, **TINY, sender=(0, 1), mlps="recomputed")
    gap = abs(frozen.clean_metric - frozen.corrupted_metric)
    assert np.nanmax(np.abs(frozen.values - recomputed.values)) > 0.5 * gap
    assert abs(frozen.direct - recomputed.direct) > 0.05 * gap
    # attention-only: nothing between the heads to recompute, the variants are one
    a = P.path_patching(model_2l, **SHIPPED, sender=(0, 7), mlps="frozen")
    b = P.path_patching(model_2l, **SHIPPED, sender=(0, 7), mlps="recomputed")
    np.testing.assert_array_equal(a.values, b.values)
    assert a.direct == b.direct


def test_path_patching_recomputed_on_parallel_rotary_models(tiny_tokenizer):
    """Parallel attention + MLP and rotary positions (NeoX-like), against the same two
    hooked runs through our own model's hooks."""
    lm = make_tiny(tiny_tokenizer, seed=4, n_layers=3, attn_only=False, d_mlp=64,
                   act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True,
                   positional_embedding_type="rotary", rotary_dim=4, name="tiny-neox")
    s = P._Setup(lm, TINY["clean"], TINY["corrupted"], TINY["correct"], TINY["wrong"],
                 "logit_diff", "denoising", -1)
    base = torch.tensor([s.base_ids])
    _, base_cache = lm.model.run_with_cache(base)
    _, source_cache = lm.model.run_with_cache(torch.tensor([s.source_ids]))
    for mlps in P.MLP_MODES:
        ours = P.path_patching(lm, **TINY, sender=(0, 2), mlps=mlps)
        for c, comp in enumerate(P.COMPONENTS):
            theirs, direct = path_patch_with_hooks(lm.model, base, base_cache, source_cache,
                                                   (0, 2), comp, s.metric.on_full_logits,
                                                   mlps=mlps)
            np.testing.assert_allclose(ours.values[..., c], theirs.numpy(), atol=1e-5,
                                       rtol=1e-6, err_msg=f"{mlps} {comp}")
        assert ours.direct == pytest.approx(direct, abs=1e-5)


# ---------------------------------------------------------------------- sets of pairs
def test_pairs_average_the_per_pair_grids(model_2l):
    text = ("clean,corrupted,correct,wrong\n"
            f"\"{SHIPPED['clean']}\",\"{SHIPPED['corrupted']}\", mat, man\n"
            " The cat sat on the car. The cat sat on the, The man sat on the car. The cat sat "
            "on the, car, man\n")
    pairs = P.parse_pairs(text)
    assert len(pairs) == 2 and pairs[1].correct == " car"
    res = P.patching_over_pairs(model_2l, pairs, granularity="head_out")
    assert res.per_pair.shape == (2, 2, 12)
    for i, pair in enumerate(pairs):
        g = P.activation_patching(model_2l, pair.clean, pair.corrupted, correct=pair.correct,
                                  wrong=pair.wrong, granularity="head_out")
        np.testing.assert_allclose(res.per_pair[i], g.values)
    np.testing.assert_allclose(res.mean, res.per_pair.mean(0))
    as_json = P.parse_pairs('[{"clean": "a b", "corrupted": "a c", "correct": " d", '
                            '"wrong": " e"}]')
    assert as_json == [P.PromptPair("a b", "a c", " d", " e")]


def test_pairs_of_different_lengths_need_whole_head_granularities(model_2l):
    pairs = [P.PromptPair(**SHIPPED),
             P.PromptPair(" The cat sat. The cat", " The man sat. The cat", " cat", " man")]
    res = P.patching_over_pairs(model_2l, pairs, granularity="head_v")
    assert res.per_pair.shape == (2, 2, 12)
    with pytest.raises(AnalysisError, match="pairs of one length"):
        P.patching_over_pairs(model_2l, pairs, granularity="resid_pre")


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(corrupted=" The dog sat on the mat. The cat sat on the"),
     r"clean prompt has 14 tokens and the corrupted prompt 15.*first differ at position 1"),
    (dict(clean="   "), "clean prompt: the prompt is empty"),
    (dict(corrupted=""), "corrupted prompt: the prompt is empty"),
    (dict(correct=" matress"), "correct answer: ' matress' is not a single token"),
    (dict(wrong=" zzqx"), "wrong answer: ' zzqx' is not a single token"),
    (dict(correct=""), "the target token is empty"),
    (dict(correct=99999), "outside the vocabulary"),
    (dict(wrong=" mat"), "the same token"),
    (dict(wrong=None), "needs a wrong answer"),
    (dict(correct=None), "needs a correct answer"),
    (dict(position=14), "position 14 is outside the prompts: they have 14 tokens"),
    (dict(position=-15), "outside the prompts"),
    (dict(position="3"), "whole number"),
    (dict(granularity="neurons"), "granularity must be one of"),
    (dict(metric="loss"), "metric must be one of"),
    (dict(direction="sideways"), "direction must be one of"),
    (dict(granularity="mlp_out"), "no MLPs"),
    (dict(corrupted=SHIPPED["clean"], metric="normalized"), "cannot be normalised"),
])
def test_bad_input_is_refused_with_a_message(model_2l, kwargs, message):
    args = dict(SHIPPED, granularity="resid_pre")
    args.update(kwargs)
    clean, corrupted = args.pop("clean"), args.pop("corrupted")
    with pytest.raises(AnalysisError, match=message):
        P.activation_patching(model_2l, clean, corrupted, **args)


def test_too_long_prompts_and_bad_senders(model_2l):
    long = " the" * 200
    with pytest.raises(AnalysisError, match="more than the model's context of 128"):
        P.activation_patching(model_2l, long, long, correct=" a", wrong=" b")
    with pytest.raises(AnalysisError, match="layer 2 does not exist"):
        P.path_patching(model_2l, **SHIPPED, sender=(2, 0))
    with pytest.raises(AnalysisError, match="head 12 does not exist"):
        P.path_patching(model_2l, **SHIPPED, sender=(0, 12))
    with pytest.raises(AnalysisError, match=r"\(layer, head\) pair"):
        P.path_patching(model_2l, **SHIPPED, sender=5)
    with pytest.raises(AnalysisError, match="LayerNorm mode"):
        P.path_patching(model_2l, **SHIPPED, sender=(0, 0), ln_mode="thawed")
    with pytest.raises(AnalysisError, match="mlps .* must be one of recomputed, frozen"):
        P.path_patching(model_2l, **SHIPPED, sender=(0, 0), mlps="skipped")


def test_bad_sets_of_pairs():
    rows = "clean,corrupted,correct,wrong\n" + "a b,a c, d, e\n" * 10_000
    with pytest.raises(AnalysisError, match=r"holds 10,000 pairs; at most 100"):
        P.parse_pairs(rows)
    with pytest.raises(AnalysisError, match="lacks the column.*wrong"):
        P.parse_pairs("clean,corrupted,correct\na b,a c, d\n")
    with pytest.raises(AnalysisError, match="empty"):
        P.parse_pairs("  ")
    with pytest.raises(AnalysisError, match="no rows"):
        P.parse_pairs("clean,corrupted,correct,wrong\n")
    with pytest.raises(AnalysisError, match="JSON could not be read"):
        P.parse_pairs("[{")
    with pytest.raises(AnalysisError, match="list of objects"):
        P.parse_pairs('[1, 2]')
    with pytest.raises(AnalysisError, match="pair 1 lacks wrong"):
        P.parse_pairs('[{"clean": "a", "corrupted": "b", "correct": "c"}]')
    with pytest.raises(AnalysisError, match="at most"):
        P.parse_pairs("x" * (P.MAX_PAIR_FILE_CHARS + 1))


def test_runs_are_shared_by_the_analyses_of_one_pair_and_bounded(model_2l, monkeypatch):
    clean = " Anna gave Peter a red book. Anna gave Peter a red"
    corrupted, *_ = P.corrupt_one_token(model_2l, clean)
    ids = model_2l.tokenizer.encode(clean)
    first = P._run(model_2l, ids, len(ids))
    top_c, _ = P.pair_predictions(model_2l, clean, corrupted)
    assert P._run(model_2l, ids, len(ids)) is first  # predictions read the same run
    with torch.no_grad():
        fresh = model_2l.model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(first.logits, fresh, atol=1e-5, rtol=0)
    assert top_c[0] == int(fresh.argmax())
    # a bound smaller than one run keeps nothing
    monkeypatch.setattr(P.runs, "RUN_CACHE_BYTES", 1)
    P._run(model_2l, ids[:-1], len(ids) - 1)
    assert len(P._RUNS) == 0
    assert P._run(model_2l, ids, len(ids)) is not first
