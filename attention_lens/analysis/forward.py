"""One cached forward pass per (model, prompt), shared by every per-prompt analysis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .errors import AnalysisError


#: Hook points kept in a :class:`ForwardPass` (each head's output is rebuilt exactly from
#: ``hook_z`` and ``W_O`` when needed, so ``hook_result`` is never stored; the MLP's hidden
#: activations, 4 × d_model wide, are read by no analysis and would double a pass's size).
def _keep(name: str) -> bool:
    return not name.endswith(("hook_result", "hook_q", "hook_k", "hook_v",
                              "hook_rot_q", "hook_rot_k", "hook_normalized", "mlp.hook_pre",
                              "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_in"))


@dataclass(frozen=True)
class ForwardPass:
    """A prompt run through a model, with every activation an analysis needs.

    Attributes:
        model_name: name of the model in the registry.
        text: the prompt as analysed (after truncation).
        token_ids: [pos] int64 token ids.
        tokens: raw text of each token.
        display: display string of each token (whitespace shown as ·, ↵, →).
        logits: [pos, d_vocab] float32 logits on the CPU.
        cache: activation name -> tensor with the batch dimension removed
            (e.g. ``blocks.0.attn.hook_pattern`` is [n_heads, pos, pos]).
        truncated: number of prompt tokens dropped to fit the context (0 if none).
        n_prompt_tokens: tokens in the prompt before truncation.
    """

    model_name: str
    text: str
    token_ids: np.ndarray
    tokens: tuple[str, ...]
    display: tuple[str, ...]
    logits: torch.Tensor
    cache: dict[str, torch.Tensor]
    truncated: int = 0
    n_prompt_tokens: int = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the logits and the cached activations."""
        tensors = [self.logits, *self.cache.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + self.token_ids.nbytes

    @property
    def n_tokens(self) -> int:
        """Number of positions analysed."""
        return int(self.token_ids.shape[0])


def tokenize(lm: LoadedModel, text: str,
             max_tokens: Optional[int] = None) -> tuple[list[int], int]:
    """Token ids of ``text`` cut to the context (and ``max_tokens``), and the count dropped."""
    if not isinstance(text, str):
        raise AnalysisError("the prompt must be text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AnalysisError("the prompt is not valid Unicode (it holds a lone surrogate)") from None
    if "\x00" in text:
        raise AnalysisError("the prompt contains a NUL character")
    if not text.strip():
        raise AnalysisError("the prompt is empty: type some text to analyse")
    ids = lm.tokenizer.encode(text)
    if not ids:
        raise AnalysisError("the prompt produced no tokens")
    if lm.cfg.extra.get("prepend_bos"):  # models trained with BOS on every sequence
        ids = [int(lm.cfg.extra["bos_token_id"])] + ids
    limit = lm.cfg.n_ctx if max_tokens is None else min(lm.cfg.n_ctx, max_tokens)
    return ids[:limit], max(0, len(ids) - limit)


def run_forward(lm: LoadedModel, text: str, max_tokens: Optional[int] = None,
                token_ids: Optional[list[int]] = None,
                tokenized: Optional[tuple[list[int], int]] = None) -> ForwardPass:
    """Run the model once on ``text`` (or on ``token_ids``) and keep its activations.

    ``tokenized`` is ``tokenize(lm, text, max_tokens)`` when the caller already has it.
    """
    if token_ids is None:
        ids, dropped = tokenized if tokenized is not None else tokenize(lm, text, max_tokens)
        n_prompt = len(ids) + dropped
    else:
        ids, dropped, n_prompt = list(token_ids), 0, len(token_ids)
        if not ids:
            raise AnalysisError("no tokens to analyse")
        if any(not 0 <= i < lm.cfg.d_vocab for i in ids):
            raise AnalysisError(f"token ids must lie in [0, {lm.cfg.d_vocab})")
    tokens = torch.tensor([ids], dtype=torch.long, device=lm.model.device)
    logits, cache = lm.model.run_with_cache(tokens, names_filter=_keep)
    strings = tuple(lm.tokenizer.token_text(i) for i in ids)
    return ForwardPass(
        model_name=lm.name,
        text=lm.tokenizer.decode(ids) if dropped else text,
        token_ids=np.asarray(ids, dtype=np.int64),
        tokens=strings,
        display=tuple(lm.tokenizer.display(i) for i in ids),
        logits=logits[0].float().cpu(),
        cache={k: v[0].float().cpu() for k, v in cache.items()},
        truncated=dropped,
        n_prompt_tokens=n_prompt,
    )
