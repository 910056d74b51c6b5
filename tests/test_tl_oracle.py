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
