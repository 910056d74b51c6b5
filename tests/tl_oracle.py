"""TransformerLens 3.9 as the oracle: the same weights loaded into its HookedTransformer."""

from __future__ import annotations

import torch

from attention_lens.model import LoadedModel


def to_transformer_lens(lm: LoadedModel):
    """A TransformerLens ``HookedTransformer`` holding ``lm``'s weights (standard positions,
    LayerNorm, RMSNorm or none, GELU/ReLU/SiLU MLPs, gated or not, or attention-only), in
    float32 on the CPU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = lm.cfg
    if c.positional_embedding_type != "standard" or c.parallel_attn_mlp or c.final_rms:
        raise ValueError("the oracle covers standard-position, sequential models")
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head,
        n_ctx=c.n_ctx, d_vocab=c.d_vocab, attn_only=c.attn_only, d_mlp=c.d_mlp,
        act_fn=c.act_fn if not c.attn_only else None, gated_mlp=c.gated_mlp,
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


def path_patch_with_hooks(model, base_tokens: torch.Tensor, base_cache: dict,
                          source_cache: dict, sender: tuple[int, int], component: str,
                          metric, mlps: str = "recomputed", ln_mode: str = "recomputed"
                          ) -> tuple[torch.Tensor, float]:
    """Path patching in two hooked runs, as ARENA's IOI code does it (Wang et al. 2022).

    Run 1: the base prompt with the sender head's ``hook_z`` taken from ``source_cache`` and
    every other head's ``hook_z`` frozen at ``base_cache``; the MLPs run on what they get
    (``mlps="recomputed"``), or every ``hook_mlp_out`` is frozen at its base value too
    (``"frozen"``: only the sender's change moves the residual stream). ``ln_mode="frozen"``
    freezes every ``ln1`` and the final LayerNorm's ``hook_scale`` at the base run's. It
    records each layer's ``hook_{component}`` (the receivers' input) and its logits (the
    direct path). Run 2, per receiver head (one batch row each): the base prompt with only
    that head's ``hook_{component}`` replaced by run 1's, everything else computed as usual.

    ``model``: a TransformerLens ``HookedTransformer``, or ours (the same hook names).
    Returns ([n_layers, n_heads] metric after each receiver's patch, NaN up to the sender's
    layer; the direct-path metric).
    """
    ls, hs = sender
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

    def z_hook(z, hook):
        new = base_cache[hook.name].clone()
        if hook.name == f"blocks.{ls}.attn.hook_z":
            new[:, :, hs] = source_cache[hook.name][:, :, hs]
        return new

    def frozen(act, hook):
        return base_cache[hook.name]

    seen: dict[str, torch.Tensor] = {}

    def record(act, hook):
        seen[hook.name] = act.detach().clone()

    hooks = [(lambda name: name.endswith("attn.hook_z"), z_hook)]
    if mlps == "frozen":
        hooks.append((lambda name: name.endswith("hook_mlp_out"), frozen))
    if ln_mode == "frozen":
        hooks.append((lambda name: name.endswith("ln1.hook_scale")
                      or name == "ln_final.hook_scale", frozen))
    hooks.append((lambda name: name.endswith(f"attn.hook_{component}"), record))
    with torch.no_grad():
        logits = model.run_with_hooks(base_tokens, fwd_hooks=hooks)
        direct = float(metric(logits))
        out = torch.full((n_layers, n_heads), float("nan"))
        receivers = [(la, h) for la in range(ls + 1, n_layers) for h in range(n_heads)]
        if not receivers:
            return out, direct
        # run 2 for every receiver at once: batch row b patches receivers[b] only

        def patch(act, hook):
            layer = int(hook.name.split(".")[1])
            act = act.clone()
            for b, (la, h) in enumerate(receivers):
                if la == layer:
                    act[b, :, h] = seen[hook.name][0, :, h]
            return act
        names = [f"blocks.{la}.attn.hook_{component}" for la in range(ls + 1, n_layers)]
        batch = base_tokens.expand(len(receivers), -1)
        values = metric(model.run_with_hooks(batch, fwd_hooks=[(n, patch) for n in names]))
        for (la, h), v in zip(receivers, values.tolist()):
            out[la, h] = v
    return out, direct
