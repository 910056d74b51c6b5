"""Random models of a named shape, built from our own :class:`ModelConfig` (no training, no
download): the bench, the load test and the scale tests run on them."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import LoadedModel
from .config import ModelConfig
from .transformer import HookedTransformer

#: GPT-2 small's shape (12 x 12 heads, d_model 768, vocabulary 50257).
GPT2_SHAPE = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, n_ctx=1024, d_vocab=50257,
                  attn_only=False, d_mlp=3072, act_fn="gelu_new", normalization_type="LN",
                  name="random-gpt2-shape")


class IdTokenizer:
    """Stand-in tokenizer for a random model: token i displays as ``<i>``."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.strings = [f"<{i}>" for i in range(vocab_size)]

    def display(self, i: int) -> str:
        return self.strings[i]

    token_text = display


def random_gpt2_shape(seed: int = 0, tokenizer: Any = None) -> LoadedModel:
    """A random model of GPT-2-small shape (12 x 12 heads, d_model 768, vocab 50257).

    ``tokenizer``: e.g. GPT-2's own (``model.hf.gpt2_tokenizer()``) to read text; by default
    a stand-in that only displays ids.
    """
    cfg = ModelConfig(**GPT2_SHAPE)
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).init_weights(seed, std=0.02).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=cfg.name, model=model,
                       tokenizer=tokenizer or IdTokenizer(cfg.d_vocab))
