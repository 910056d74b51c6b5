"""The transformer: shapes, causality, hooks, editing hooks, probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_lens.analysis.probe import ordinary_token_ids, probe_scores, repeated_random_tokens
from attention_lens.model import HookedTransformer, ModelConfig

from .conftest import make_tiny

CONFIGS = {
    "attn-only": {},
    "ln-mlp": dict(attn_only=False, d_mlp=64, act_fn="gelu", normalization_type="LN"),
    "rms-swiglu-rotary": dict(attn_only=False, d_mlp=48, act_fn="silu", gated_mlp=True,
                              normalization_type="RMS", positional_embedding_type="rotary"),
    "parallel-gelu-new": dict(attn_only=False, d_mlp=64, act_fn="gelu_new",
                              normalization_type="LN", parallel_attn_mlp=True),
    "one-layer": dict(n_layers=1),
}


@pytest.fixture(params=list(CONFIGS))
def any_model(request, tiny_tokenizer):
    return make_tiny(tiny_tokenizer, **CONFIGS[request.param])


def test_output_shapes(any_model):
    cfg = any_model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (3, 11))
    logits = any_model.model(tokens)
    assert logits.shape == (3, 11, cfg.d_vocab)
    assert torch.isfinite(logits).all()
    assert any_model.model(tokens[0]).shape == (1, 11, cfg.d_vocab)


def test_parameter_count_matches_config(any_model):
    assert any_model.cfg.n_params == sum(p.numel() for p in any_model.model.parameters())


def test_causality(any_model):
    torch.manual_seed(0)
    tokens = torch.randint(0, any_model.cfg.d_vocab, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % any_model.cfg.d_vocab
    a, b = any_model.model(tokens), any_model.model(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8], atol=1e-5, rtol=0)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_cache_names_and_shapes(tiny_ln):
    cfg = tiny_ln.cfg
    b, p = 2, 9
    tokens = torch.randint(0, cfg.d_vocab, (b, p))
    logits, cache = tiny_ln.model.run_with_cache(tokens)
    d, h, e, m = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    expect = {"hook_embed": (b, p, d), "hook_pos_embed": (b, p, d),
              "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d)}
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}"
        expect |= {
            f"{pre}.hook_resid_pre": (b, p, d), f"{pre}.hook_resid_mid": (b, p, d),
            f"{pre}.hook_resid_post": (b, p, d), f"{pre}.hook_attn_out": (b, p, d),
            f"{pre}.hook_mlp_out": (b, p, d), f"{pre}.ln1.hook_scale": (b, p, 1),
            f"{pre}.attn.hook_q": (b, p, h, e), f"{pre}.attn.hook_k": (b, p, h, e),
            f"{pre}.attn.hook_v": (b, p, h, e), f"{pre}.attn.hook_z": (b, p, h, e),
            f"{pre}.attn.hook_attn_scores": (b, h, p, p), f"{pre}.attn.hook_pattern": (b, h, p, p),
            f"{pre}.attn.hook_result": (b, p, h, d),
            f"{pre}.mlp.hook_pre": (b, p, m), f"{pre}.mlp.hook_post": (b, p, m),
        }
    for name, shape in expect.items():
        assert name in cache, name
        assert tuple(cache[name].shape) == shape, name
    # the residual stream decomposes exactly into its parts
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    total = cache["hook_embed"] + cache["hook_pos_embed"]
    for layer in range(cfg.n_layers):
        total = (total + cache[f"blocks.{layer}.hook_attn_out"]
                 + cache[f"blocks.{layer}.hook_mlp_out"])
    torch.testing.assert_close(total, cache[last], atol=1e-5, rtol=1e-5)
    # each head's output sums (with b_O) to the attention output
    attn = tiny_ln.model.blocks[0].attn
    torch.testing.assert_close(cache["blocks.0.attn.hook_result"].sum(2) + attn.b_O,
                               cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=1e-5)
    # the final LN scale is the real statistic of the last residual stream
    x = cache[last]
    scale = ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    torch.testing.assert_close(cache["ln_final.hook_scale"], scale)
    _, only = tiny_ln.model.run_with_cache(tokens, names_filter=lambda n: n.endswith("pattern"))
    assert set(only) == {f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)}


def test_attention_rows_sum_to_one_and_are_causal(any_model):
    tokens = torch.randint(0, any_model.cfg.d_vocab, (2, 10))
    _, cache = any_model.model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n)
    for pattern in cache.values():
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert torch.all(pattern.triu(1) == 0)


def test_zeroing_a_head_matches_recomputation_by_hand(tiny):
    model, cfg = tiny.model, tiny.cfg
    tokens = torch.randint(0, cfg.d_vocab, (1, 10))
    layer, head = 0, 2
    _, cache = model.run_with_cache(tokens)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    edited = model.run_with_hooks(tokens, [(f"blocks.{layer}.attn.hook_z", zero_head)])
    # by hand: remove the head's result from layer 0's output and rerun the later layers
    result = cache[f"blocks.{layer}.attn.hook_z"][0, :, head] @ model.blocks[layer].attn.W_O[head]
    resid = cache["blocks.0.hook_resid_post"] - result
    for block in model.blocks[1:]:
        resid = block(resid)
    by_hand = model.unembed(resid)
    torch.testing.assert_close(edited, by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited, model(tokens))
    # hooks are removed afterwards
    assert not any(hp.active for hp in model.hook_points.values())


def test_hook_must_keep_shape(tiny):
    with pytest.raises(ValueError, match="shape"):
        tiny.model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long),
                                  [("hook_embed", lambda x, h: x[:, :2])])
    with pytest.raises(KeyError):
        tiny.model.run_with_cache(torch.zeros(1, 4, dtype=torch.long), names_filter=["nope"])


def test_bad_tokens_raise(tiny):
    with pytest.raises(ValueError, match="exceed"):
        tiny.model(torch.zeros(1, tiny.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        tiny.model(torch.tensor([[0, tiny.cfg.d_vocab]]))


def test_probe_scores_previous_token_head(tiny_tokenizer):
    """A head hand-built to attend to the previous position scores high; a random one low."""
    cfg = ModelConfig(n_layers=1, d_model=64, n_heads=2, d_head=32, n_ctx=128,
                      d_vocab=tiny_tokenizer.vocab_size)
    model = HookedTransformer(cfg).init_weights(0)
    theta = np.pi / cfg.n_ctx  # positions on a half circle: no aliasing
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(cfg.d_model, cfg.d_model))[0][:, :2]  # [d, 2]
        angles = torch.arange(cfg.n_ctx) * theta
        coords = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [n_ctx, 2]
        model.pos_embed.W_pos.copy_(10 * coords @ basis.T)
        model.embed.W_E.mul_(0.01)
        a = model.blocks[0].attn
        for w in (a.W_Q, a.W_K, a.b_Q, a.b_K):
            w.zero_()
        # row vector v @ R rotates v by -theta: q_i points where p_{i-1} points
        R = torch.tensor([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]],
                         dtype=torch.float32)
        a.W_Q[0, :, :2] = basis @ R * 1000
        a.W_K[0, :, :2] = basis * 10
    ids = ordinary_token_ids(tiny_tokenizer.strings)
    scores = probe_scores(model, ids)
    assert scores.previous_token[0, 0] > 0.9
    assert scores.previous_token[0, 1] < 0.3
    assert scores.induction.max() < 0.3


def test_repeated_random_tokens_is_seeded_and_repeated():
    ids = np.arange(100, 200)
    a = repeated_random_tokens(ids, 50, 10, seed=3)
    assert a.shape == (10, 100)
    np.testing.assert_array_equal(a[:, :50], a[:, 50:])
    np.testing.assert_array_equal(a, repeated_random_tokens(ids, 50, 10, seed=3))
    assert not np.array_equal(a, repeated_random_tokens(ids, 50, 10, seed=4))
