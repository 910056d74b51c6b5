"""Direct logit attribution: how much each residual-stream component writes towards a token.

The final residual stream at a position is a sum of components c_k (token embedding,
positional embedding, each head's output ``z W_O``, each layer's ``b_O``, each MLP output).
Its logit for token u is ``LN_final(Σ c_k) · W_U[:, u] + b_U[u]``. Without LayerNorm
``attr_k = c_k · W_U[:, u]``; with LayerNorm each component is centred and divided by the
final LN scale of the real forward pass (the scale is shared, so the split is exact), times the
LN weight, and the LN bias adds one more term. The attributions then sum to
``logit_u − b_U[u]`` exactly. For a pair (u, u') the direction is ``W_U[:, u] − W_U[:, u']``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .attention import head_results
from .checks import check_position
from .declare import Position, Token, declare, fields_of
from .forward import ForwardPass
from .predictions import TokenLike, token_id

#: Component kinds, in the order they enter the residual stream.
KINDS: tuple[str, ...] = ("embed", "pos_embed", "head", "b_O", "mlp", "ln_bias")


@dataclass(frozen=True)
class LogitAttribution:
    """Direct logit attribution of every component at one position.

    Attributes:
        position: the position whose next-token logit is explained.
        context: display string of the token at ``position``.
        target_id: token u.
        target_display: display string of u.
        contrast_id: token u' for a logit difference, or None.
        contrast_display: display string of u' ("" without one).
        heads: [n_layers, n_heads] attribution of each head (same numbers as in ``values``).
        labels: [C] component names ("embed", "pos_embed", "L0H3", "L0 b_O", "L0 MLP", ...).
        kinds: [C] component kind, one of :data:`KINDS`.
        layers: [C] layer of each component (-1 for embeddings and the final LN bias).
        head_index: [C] head of each component (-1 for non-head components).
        values: [C] attribution of each component.
        logit: the model's logit of u (or logit_u − logit_u') at ``position``.
        bias: b_U[u] (or b_U[u] − b_U[u']).
        normalization: "none", "LN" or "RMS" (how components were scaled).
    """

    position: int
    context: str
    target_id: int
    target_display: str
    contrast_id: Optional[int]
    contrast_display: str
    heads: np.ndarray
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: np.ndarray
    head_index: np.ndarray
    values: np.ndarray
    logit: float
    bias: float
    normalization: str

    def __post_init__(self) -> None:  # noqa: D105
        c = len(self.labels)
        assert len(self.kinds) == c and self.values.shape == (c,)
        assert self.layers.shape == self.head_index.shape == (c,)

    @property
    def total(self) -> float:
        """Sum of all attributions; equals ``logit - bias``."""
        return float(self.values.sum())


def logit_attribution(lm: LoadedModel, fp: ForwardPass, *, target: Optional[TokenLike] = None,
                      contrast: Optional[TokenLike] = None,
                      position: int = -1) -> LogitAttribution:
    """Attribute the logit of ``target`` (minus ``contrast``'s) at ``position`` to every component.

    Without ``target`` the model's top prediction at ``position`` is explained.
    """
    pos = check_position(fp, position)
    u = int(fp.logits[pos].argmax()) if target is None else token_id(lm, target)
    u2 = None if contrast is None else token_id(lm, contrast)
    model, cfg = lm.model, lm.cfg
    dt = torch.float64
    with torch.no_grad():
        direction = model.W_U[:, u].detach().to("cpu", dt).clone()
        bias = float(model.b_U[u])
        logit = float(fp.logits[pos, u])
        if u2 is not None:
            direction -= model.W_U[:, u2].detach().to("cpu", dt)
            bias -= float(model.b_U[u2])
            logit -= float(fp.logits[pos, u2])

        labels: list[str] = []
        kinds: list[str] = []
        layers: list[int] = []
        heads: list[int] = []
        vectors: list[torch.Tensor] = []

        def add(label: str, kind: str, layer: int, head: int, vec: torch.Tensor) -> None:
            labels.append(label)
            kinds.append(kind)
            layers.append(layer)
            heads.append(head)
            vectors.append(vec.to("cpu", dt))

        add("embed", "embed", -1, -1, fp.cache["hook_embed"][pos])
        if "hook_pos_embed" in fp.cache:
            add("pos_embed", "pos_embed", -1, -1, fp.cache["hook_pos_embed"][pos])
        for layer in range(cfg.n_layers):
            result = head_results(lm, fp, layer)[pos]  # [h, d]
            for h in range(cfg.n_heads):
                add(f"L{layer}H{h}", "head", layer, h, result[h])
            add(f"L{layer} b_O", "b_O", layer, -1, model.blocks[layer].attn.b_O.detach())
            if not cfg.attn_only:
                mlp_out = fp.cache[f"blocks.{layer}.hook_mlp_out"][pos]
                add(f"L{layer} MLP", "mlp", layer, -1, mlp_out)
        comps = torch.stack(vectors)  # [C, d]

        norm = cfg.normalization_type or "none"
        if norm == "none":
            values = comps @ direction
        else:
            ln = model.ln_final
            scale = fp.cache["ln_final.hook_scale"][pos].to(dt).reshape(())
            if norm == "LN":
                comps = comps - comps.mean(-1, keepdim=True)
            values = (comps / scale) @ (ln.w.detach().to("cpu", dt) * direction)
            if norm == "LN":
                values = torch.cat([values, (ln.b.detach().to("cpu", dt) @ direction)[None]])
                labels.append("LN bias")
                kinds.append("ln_bias")
                layers.append(-1)
                heads.append(-1)

    values_np = values.numpy()
    layers_np = np.asarray(layers, dtype=np.int64)
    heads_np = np.asarray(heads, dtype=np.int64)
    per_head = np.zeros((cfg.n_layers, cfg.n_heads))
    is_head = heads_np >= 0
    per_head[layers_np[is_head], heads_np[is_head]] = values_np[is_head]
    return LogitAttribution(
        position=pos, context=fp.display[pos], target_id=u,
        target_display=lm.tokenizer.display(u), contrast_id=u2,
        contrast_display="" if u2 is None else lm.tokenizer.display(u2),
        heads=per_head, labels=tuple(labels), kinds=tuple(kinds), layers=layers_np,
        head_index=heads_np, values=values_np, logit=logit, bias=bias, normalization=norm,
    )


ATTRIBUTION = declare(
    "attribution", logit_attribution,
    params=[Token("target", label="target token", placeholder="the actual next token"),
            Token("contrast", label="minus token", placeholder="optional"),
            Position("position", url="pos", auto=True, label="position",
                     placeholder="auto (-1 = last)")],
    to_json=lambda res: {"result": {**fields_of(res), "total": res.total}})
