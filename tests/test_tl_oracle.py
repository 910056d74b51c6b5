"""The TransformerLens oracle holds our weights: same logits on the same tokens."""

from __future__ import annotations

import pytest
import torch
from tl_oracle import tl_tokens, to_transformer_lens

TEXT = "Harry Potter and Hermione Granger walked. Harry Potter and Hermione"


@pytest.mark.parametrize("which", ["tiny", "tiny_ln", "model_2l", "model_1l"])
def test_same_logits(which, request):
    lm = request.getfixturevalue(which)
    tl = to_transformer_lens(lm)
    tokens = tl_tokens(lm, TEXT)
    with torch.no_grad():
        ours, theirs = lm.model(tokens), tl(tokens)
    scale = float(ours.abs().max())
    assert float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, scale)


def test_gated_mlp_with_b_in_loads_into_transformer_lens_unchanged(tmp_path, tiny_tokenizer):
    """A folder in our format with a gated (SiLU) MLP and a non-zero b_in: TransformerLens'
    HookedTransformer given the same state dict computes the same logits (b_in is added after
    the gated product, act(x W_gate) * (x W_in) + b_in)."""
    from attention_lens.model import load_model, save_model
    from tests.conftest import make_tiny

    made = make_tiny(tiny_tokenizer, seed=5, attn_only=False, d_mlp=48, act_fn="silu",
                     gated_mlp=True, normalization_type="RMS", name="tiny-gated")
    with torch.no_grad():
        for blk in made.model.blocks:
            blk.mlp.b_in.normal_(0, 1.0)
    save_model(made.model, tiny_tokenizer, tmp_path / "tiny-gated")
    lm = load_model(tmp_path / "tiny-gated")
    assert lm.cfg.gated_mlp and float(lm.model.blocks[0].mlp.b_in.abs().min()) > 0
    tl = to_transformer_lens(lm)
    tokens = tl_tokens(lm, TEXT)
    with torch.no_grad():
        ours, theirs = lm.model(tokens), tl(tokens)
    assert float(theirs.std()) > 0.1
    assert float((ours - theirs).abs().max()) <= 1e-4

    # b_in inside the product, act(x W_gate) * (x W_in + b_in), is another model: the test
    # sees the difference (hook_post holds act(g) * (x W_in) + b_in; the other order adds
    # act(g) * b_in instead of b_in)
    gates: dict = {}

    def keep(act, hook):
        gates[hook.name.rsplit(".", 1)[0]] = torch.nn.functional.silu(act)

    def other_order(act, hook):
        mlp = hook.name.rsplit(".", 1)[0]
        b_in = lm.model.get_submodule(mlp).b_in
        return act - b_in + gates[mlp] * b_in

    with torch.no_grad():
        other = lm.model.run_with_hooks(tokens, fwd_hooks=[
            (lambda name: name.endswith("mlp.hook_pre"), keep),
            (lambda name: name.endswith("mlp.hook_post"), other_order)])
    assert float((other - theirs).abs().max()) > 1e-2
