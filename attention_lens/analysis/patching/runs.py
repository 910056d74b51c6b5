"""One prompt's cached activations (a *run*), kept for reuse in a byte-bounded cache."""

from __future__ import annotations

import weakref

import torch

from ...cache import ByteLRU
from ...model.checkpoint import LoadedModel

_CACHE_NAMES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                "hook_resid_post", "attn.hook_z", "attn.hook_pattern", "attn.hook_q",
                "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                "ln1.hook_scale")


class _Run:
    """One prompt's cached activations (batch dimension removed), rows 0..position only."""

    def __init__(self, lm: LoadedModel, ids: list[int], n: int) -> None:
        model = lm.model
        tokens = torch.tensor([ids[:n]], dtype=torch.long, device=model.device)
        logits, cache = model.run_with_cache(
            tokens, names_filter=lambda name: name.endswith(_CACHE_NAMES))
        self.logits = logits[0, -1]
        self.cache = {k: v[0] for k, v in cache.items()}
        self.rotary = lm.cfg.positional_embedding_type == "rotary"
        post = self.cache[f"blocks.{lm.cfg.n_layers - 1}.hook_resid_post"]
        self.final_row = post[-1]

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        name, layer = key
        if self.rotary and name in ("q", "k"):
            return self.cache[f"blocks.{layer}.attn.hook_rot_{name}"]
        if name in ("q", "k", "v", "z", "pattern"):
            return self.cache[f"blocks.{layer}.attn.hook_{name}"]
        if name == "ln1_scale":
            return self.cache[f"blocks.{layer}.ln1.hook_scale"]
        return self.cache[f"blocks.{layer}.hook_{name}"]


#: Runs kept for reuse (a page patches, path-patches and lists predictions of one pair, each
#: from the same two runs), bounded in bytes (a 64-token pair through GPT-2 small is ~48 MiB).
RUN_CACHE_BYTES = 128 * 2 ** 20
_RUNS = ByteLRU("patching runs", lambda: RUN_CACHE_BYTES, sizeof=lambda hit: hit[2])


def _run(lm: LoadedModel, ids: list[int], n: int) -> _Run:
    """The cached activations of ``ids[:n]`` through ``lm`` (computed once while they fit in
    :data:`RUN_CACHE_BYTES` with the other recent runs). Runs are read-only."""
    key = (lm.name, id(lm.model), tuple(int(i) for i in ids[:n]))
    hit = _RUNS.get(key)
    if hit is not None and hit[0]() is lm.model:
        return hit[1]
    with torch.no_grad():
        run = _Run(lm, ids, n)
    size = sum(t.numel() * t.element_size() for t in run.cache.values())
    _RUNS.put(key, (weakref.ref(lm.model), run, size))
    return run

