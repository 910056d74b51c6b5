"""TransformerLens 3.9 as the oracle: the same weights loaded into its HookedTransformer."""

from __future__ import annotations

import torch

from attention_lens.model import LoadedModel


def to_transformer_lens(lm: LoadedModel):
    """A TransformerLens ``HookedTransformer`` holding ``lm``'s weights (standard positions,
    LayerNorm or none, GELU/ReLU MLPs or attention-only), in float32 on the CPU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = lm.cfg
    if c.positional_embedding_type != "standard" or c.gated_mlp or c.parallel_attn_mlp:
        raise ValueError("the oracle covers standard-position, ungated, sequential models")
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head,
        n_ctx=c.n_ctx, d_vocab=c.d_vocab, attn_only=c.attn_only, d_mlp=c.d_mlp,
        act_fn=c.act_fn if not c.attn_only else None,
        normalization_type=c.normalization_type, eps=c.eps, device="cpu", seed=0,
        default_prepend_bos=False)
    tl = HookedTransformer(cfg)
    ours = {k: v.detach().float().cpu() for k, v in lm.model.state_dict().items()}
    missing, unexpected = tl.load_state_dict(ours, strict=False)
    real_missing = [k for k in missing if not k.endswith(("IGNORE", "mask"))]
    if real_missing or unexpected:
        raise ValueError(f"weights do not map: missing {real_missing}, unexpected {unexpected}")
    return tl.eval()


def tl_tokens(lm: LoadedModel, text: str) -> torch.Tensor:
    """Our token ids of ``text`` as a [1, n] tensor (no BOS added)."""
    return torch.tensor([lm.tokenizer.encode(text)])
