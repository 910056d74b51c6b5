"""The patching engine and the model share one definition of each block: the engine's norm,
MLP and attention calls are the model's own (model/transformer.py), and its layer-by-layer
continuation of a run gives the model's own activations."""

from __future__ import annotations

import pytest
import torch

from attention_lens.analysis import patching as P
from attention_lens.model import transformer as T
from tests.conftest import make_tiny

#: Model families the engine runs on: GPT-2 (LayerNorm, GELU MLP), Llama (RMSNorm, gated
#: MLP, rotary), NeoX (parallel attention and MLP, partial rotary), attention-only.
FAMILIES = {
    "gpt2": dict(n_layers=3, attn_only=False, d_mlp=64, act_fn="gelu_new",
                 normalization_type="LN"),
    "llama": dict(n_layers=3, attn_only=False, d_mlp=48, act_fn="silu", gated_mlp=True,
                  normalization_type="RMS", positional_embedding_type="rotary"),
    "neox": dict(n_layers=3, attn_only=False, d_mlp=64, act_fn="gelu",
                 normalization_type="LN", parallel_attn_mlp=True,
                 positional_embedding_type="rotary", rotary_dim=4),
    "attn-only": dict(n_layers=3, normalization_type="LN"),
}
CLEAN = "Harry Potter went to the shop, and Harry"
CORRUPTED = "Harry Potter went to and shop, and Harry"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_tokenizer):
    return make_tiny(tiny_tokenizer, seed=4, name=f"tiny-{request.param}",
                     **FAMILIES[request.param])


def test_the_engine_continues_a_run_as_the_model_computes_it(family):
    """Each layer run by the engine on the model's own resid_pre rows gives the model's
    resid_post (every row; the last layer: the metric's row), and the last layer's one-row
    update gives the model's attention output: float32 through the same code, so equal to
    rounding."""
    lm = family
    ids = lm.tokenizer.encode(CLEAN)
    s = P._Setup(lm, CLEAN, CORRUPTED, ids[1], ids[2], "logit_diff", "denoising", -1)
    eng, base, n, L = s.engine, s.base, s.n, lm.cfg.n_layers
    with torch.no_grad():
        for j in range(L):
            st = P._Dense(0, base["resid_pre", j][None])
            out = eng.layer(j, st)
            want = base.cache[f"blocks.{j}.hook_resid_post"]
            if j == L - 1:
                want = want[-1:]
            torch.testing.assert_close(out.val[0], want, rtol=1e-5, atol=1e-5)
        # one unchanged row at each position, through the last layer's score-row update
        pos = torch.arange(n)
        single = P._Single(pos, base["resid_pre", L - 1][pos])
        attn = eng._attention(L - 1, single, last=True)
        for b in range(n):
            torch.testing.assert_close(attn.val[b, 0], base["attn_out", L - 1][-1],
                                       rtol=1e-5, atol=1e-5)
        # the metric at the end of an unpatched continuation is the base run's
        m = eng.from_post(0, P._Dense(0, base.cache["blocks.0.hook_resid_post"][None]))
        assert float(m[0]) == pytest.approx(s.base_metric, rel=1e-5, abs=1e-5)


def test_the_engine_calls_the_models_blocks(family, monkeypatch):
    """Patching a grid goes through the model's Norm, MLP and Attention pieces (no copy of
    their arithmetic in the engine)."""
    calls: dict[str, int] = {}

    def counted(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[f"{cls.__name__}.{name}"] = calls.get(f"{cls.__name__}.{name}", 0) + 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    lm = family
    ids = lm.tokenizer.encode(CLEAN)
    s = P._Setup(lm, CLEAN, CORRUPTED, ids[1], ids[2], "logit_diff", "denoising", -1)
    for cls, name in ((T.Norm, "fused"), (T.MLP, "fused"), (T.Attention, "project"),
                      (T.Attention, "attend_fused"), (T.Attention, "output")):
        counted(cls, name)
    with torch.no_grad():
        P._exact_grid(s, "resid_pre", None)
        P._exact_grid(s, "head_q", None)
    needed = {"Norm.fused", "Attention.project", "Attention.attend_fused", "Attention.output"}
    if not lm.cfg.attn_only:
        needed.add("MLP.fused")
    assert needed <= {k for k, v in calls.items() if v}, calls


def test_the_fused_forms_equal_the_hooked_forward(family):
    """The forms without hooks the engine calls (one fused kernel each) compute what the
    model's forward computes."""
    lm = family
    blk = lm.model.blocks[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, lm.cfg.d_model, generator=g)
    resid = torch.randn(3, 7, lm.cfg.d_model, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(blk.ln1.fused(x), blk.ln1(x), rtol=1e-5, atol=1e-5)
        if not lm.cfg.attn_only:
            torch.testing.assert_close(blk.mlp.fused(x), blk.mlp(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(blk.mlp.fused(x, resid), blk.mlp(x) + resid,
                                       rtol=1e-5, atol=1e-5)
        a = blk.attn
        q, k, v = (a.rotary(a.project(x, c), torch.arange(7)) if c != "v" else
                   a.project(x, c) for c in "qkv")
        for q_pos in (torch.arange(7), torch.arange(3, 7)):
            torch.testing.assert_close(a.attend_fused(q[:, q_pos], k, v, q_pos),
                                       a.attend(q[:, q_pos], k, v, q_pos), rtol=1e-5,
                                       atol=1e-5)
        # forward is made of these pieces
        torch.testing.assert_close(a.output(a.attend(q, k, v, torch.arange(7))), a(x),
                                   rtol=1e-6, atol=1e-6)
