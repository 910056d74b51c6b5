"""A readable hooked transformer with TransformerLens parameter and hook names.

Row-vector convention (``x @ W``). Shapes in comments: b batch, p/q/k positions,
h heads, e d_head, d d_model, m d_mlp, v d_vocab.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .hooks import HookFn, HookPoint

NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), exposing its scale as ``hook_scale``."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__()
        self.kind, self.eps = kind, cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        if kind == "LN":
            self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # [b, p, 1]
        self.hook_normalized = HookPoint()  # [b, p, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        return x * self.w + self.b if self.kind == "LN" else x * self.w

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its hooks, LayerNorm in one fused kernel (the rows
        activation patching recomputes; equal to forward to rounding, tested)."""
        if self.kind == "LN":
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        return self(x)


def rotate(x: torch.Tensor, positions: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Apply rotary position embeddings to the first ``rotary_dim`` dims of q or k [b,p,h,e]."""
    r = cfg.rotary_dim or cfg.d_head
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, r, 2, dtype=torch.float32,
                                                        device=x.device) / r))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [p, r/2]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if cfg.rotary_adjacent_pairs:  # GPT-J style: (x0, x1), (x2, x3), ...
        cos = angles.cos().repeat_interleave(2, -1)[None, :, None, :]
        sin = angles.sin().repeat_interleave(2, -1)[None, :, None, :]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama style: first half pairs with second half
        cos = torch.cat((angles.cos(), angles.cos()), -1)[None, :, None, :]
        sin = torch.cat((angles.sin(), angles.sin()), -1)[None, :, None, :]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos.to(x.dtype) + rotated * sin.to(x.dtype), x_pass), dim=-1)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
            resid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w + b`` (``+ resid``) on the rows' 2-D view, in one fused product."""
    x2 = x.reshape(-1, x.shape[-1])
    if resid is None:
        out = torch.addmm(b, x2, w)
    else:
        out = torch.addmm(resid.reshape(-1, w.shape[1]), x2, w)
        out += b
    return out.view(*x.shape[:-1], w.shape[1])


class Attention(nn.Module):
    """Multi-head causal self-attention with per-head weights [h, d, e] (TransformerLens layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint()  # [b, p, h, e]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [b, h, q, k], masked with -inf
        self.hook_pattern = HookPoint()  # [b, h, q, k], rows sum to 1
        self.hook_z = HookPoint()  # [b, p, h, e]
        self.hook_result = HookPoint()  # [b, p, h, d]; computed only when hooked
        self._flat: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    # The pieces below are the one definition of attention: :meth:`forward` is made of them,
    # and activation patching (analysis/patching/engine.py) calls them on the rows it
    # recomputes.
    def project(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """The query, key or value (``which``: "q", "k", "v") of normalised rows
        x [..., p, d] -> [..., p, h, e], before rotary positions."""
        w, b = {"q": (self.W_Q, self.b_Q), "k": (self.W_K, self.b_K),
                "v": (self.W_V, self.b_V)}[which]
        h, _, e = w.shape
        return _linear(x, self._flat_weight(which, w), b.reshape(-1)).unflatten(-1, (h, e))

    def _flat_weight(self, which: str, w: torch.Tensor) -> torch.Tensor:
        """W [h, d, e] as one [d, h*e] matrix (a copy). Without gradients it is kept while
        the weight is unchanged (same storage, no in-place change), so the many small runs
        of activation patching do not copy it again each time."""
        if torch.is_grad_enabled():
            return w.permute(1, 0, 2).reshape(w.shape[1], -1)
        key = (w.data_ptr(), w._version)
        kept = self._flat.get(which)
        if kept is None or kept[0] != key:
            kept = (key, w.detach().permute(1, 0, 2).reshape(w.shape[1], -1))
            self._flat[which] = kept
        return kept[1]

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions of q or k rows [b, p, h, e] at ``positions`` [p] (unchanged for
        other position embeddings)."""
        if self.cfg.positional_embedding_type != "rotary":
            return x
        return rotate(x, positions, self.cfg)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_pos: torch.Tensor) -> torch.Tensor:
        """Causal attention of queries q [b, nq, h, e] at positions ``q_pos`` [nq] over the
        keys and values k, v [b, n, h, e] at positions 0..n-1 -> z [b, nq, h, e]."""
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.cfg.d_head)
        future = torch.arange(k.shape[1], device=q.device)[None, :] > q_pos[:, None]
        scores = self.hook_attn_scores(scores.masked_fill(future, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        return torch.einsum("bhqk,bkhe->bqhe", pattern, v)

    def attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_pos: torch.Tensor) -> torch.Tensor:
        """:meth:`attend` without its hooks, in one fused kernel (scores, mask, softmax and
        the weighted sum; the same scale); equal to it to rounding, tested."""
        allowed = torch.arange(k.shape[1], device=q.device)[None, :] <= q_pos[:, None]
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=allowed,
                                           scale=1 / math.sqrt(self.cfg.d_head))
        return z.transpose(1, 2)

    def output(self, z: torch.Tensor, resid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention output of z rows [..., h, e] (bias included) -> [..., d], plus
        ``resid`` rows when given (in the same fused product)."""
        return _linear(z.flatten(-2), self.W_O.reshape(-1, self.W_O.shape[-1]), self.b_O,
                       resid)

    def forward(self, x_q: torch.Tensor, x_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``x_q`` to ``x_kv`` (the same normalised stream unless given)."""
        x_kv = x_q if x_kv is None else x_kv
        q = self.hook_q(self.project(x_q, "q"))
        k = self.hook_k(self.project(x_kv, "k"))
        v = self.hook_v(self.project(x_kv, "v"))
        pos = torch.arange(q.shape[1], device=q.device)
        if self.cfg.positional_embedding_type == "rotary":
            q = self.hook_rot_q(self.rotary(q, pos))
            k = self.hook_rot_k(self.rotary(k, pos))
        z = self.hook_z(self.attend(q, k, v, pos))
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return self.output(z)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Two-layer MLP (GELU): act(x W_in + b_in) W_out + b_out; or gated MLP (SwiGLU, Llama)
    as TransformerLens computes it: (act(x W_gate) * (x W_in) + b_in) W_out + b_out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp or 0
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.act_fn or "gelu"]
        self.W_in = nn.Parameter(torch.empty(d, m))
        self.b_in = nn.Parameter(torch.zeros(m))
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m))
        self.W_out = nn.Parameter(torch.empty(m, d))
        self.b_out = nn.Parameter(torch.zeros(d))
        self.hook_pre = HookPoint()  # [b, p, m]
        self.hook_pre_linear = HookPoint()  # gated only
        self.hook_post = HookPoint()  # [b, p, m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.gated:  # TransformerLens' GatedMLP: b_in is added after the product
            pre = self.hook_pre(x @ self.W_gate)
            linear = self.hook_pre_linear(x @ self.W_in)
            post = self.hook_post(self.act(pre) * linear + self.b_in)
        else:
            post = self.hook_post(self.act(self.hook_pre(x @ self.W_in + self.b_in)))
        return post @ self.W_out + self.b_out

    def fused(self, x: torch.Tensor, resid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` without its hooks (plus ``resid`` when given), each product fused
        with its bias (the rows activation patching recomputes; equal to forward to
        rounding, tested)."""
        if self.gated:
            out = self(x)
            return out if resid is None else out + resid
        x2 = x.reshape(-1, x.shape[-1])
        post = self.act(torch.addmm(self.b_in, x2, self.W_in))
        if resid is None:
            out = torch.addmm(self.b_out, post, self.W_out)
        else:
            out = torch.addmm(resid.reshape(-1, self.W_out.shape[1]), post, self.W_out)
            out += self.b_out
        return out.view(*x.shape[:-1], self.W_out.shape[1])


class Block(nn.Module):
    """One transformer block: resid_pre -> attention -> resid_mid -> MLP -> resid_post."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm = cfg.normalization_type
        self.ln1 = Norm(cfg, norm) if norm else nn.Identity()
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            self.ln2 = Norm(cfg, norm) if norm else nn.Identity()
            self.mlp = MLP(cfg)
            self.hook_mlp_in = HookPoint()
            self.hook_mlp_out = HookPoint()  # [b, p, d]
        self.hook_resid_pre = HookPoint()  # [b, p, d]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: torch.Tensor) -> torch.Tensor:  # noqa: D102
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        if self.cfg.attn_only:
            resid_mid = self.hook_resid_mid(resid_pre + attn_out)
            return self.hook_resid_post(resid_mid)
        if self.cfg.parallel_attn_mlp:
            mlp_out = self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.ln2(resid_pre))))
            resid_mid = self.hook_resid_mid(resid_pre + attn_out)
            return self.hook_resid_post(resid_mid + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.ln2(resid_mid))))
        return self.hook_resid_post(resid_mid + mlp_out)


class Embed(nn.Module):
    """Token embedding ``W_E`` [v, d]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    """Learned absolute positions ``W_pos`` [n_ctx, d]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, p = tokens.shape
        return self.W_pos[:p].unsqueeze(0).expand(b, p, -1)


class Unembed(nn.Module):
    """Unembedding ``W_U`` [d, v] and bias ``b_U`` [v]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x @ self.W_U + self.b_U


class HookedTransformer(nn.Module):
    """Decoder-only transformer whose every activation passes a named :class:`HookPoint`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [b, p, d]
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()  # [b, p, d]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.normalization_type:
            self.ln_final = Norm(cfg, cfg.normalization_type)
        self.unembed = Unembed(cfg)
        self.hook_points: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_points[name] = module

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits [b, p, v] for token ids [b, p] (or [p])."""
        tokens = self._as_batch(tokens)
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding_type == "standard":
            resid = resid + self.hook_pos_embed(self.pos_embed(tokens))
        for block in self.blocks:
            resid = block(resid)
        if self.cfg.normalization_type:
            resid = self.ln_final(resid)
        return self.unembed(resid)

    def _as_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be [batch, pos] or [pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one position")
        if tokens.shape[1] > self.cfg.n_ctx and self.cfg.positional_embedding_type == "standard":
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context of {self.cfg.n_ctx}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab})")
        return tokens.to(self.device)

    def loss(self, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy (mean, or [b, p-1] when ``per_token``)."""
        tokens = self._as_batch(tokens)
        logits = self(tokens)[:, :-1]
        # log-sum-exp minus the target's logit: one temporary the size of the logits, where
        # log_softmax then gather would hold two
        nll = logits.logsumexp(-1) - logits.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return nll if per_token else nll.mean()

    # ------------------------------------------------------------------- hooks
    def _select(self, names: NamesFilter) -> list[HookPoint]:
        if names is None:
            return list(self.hook_points.values())
        if isinstance(names, str):
            names = [names]
        if callable(names):
            return [hp for n, hp in self.hook_points.items() if names(n)]
        names = list(names)
        unknown = [n for n in names if n not in self.hook_points]
        if unknown:
            raise KeyError(f"unknown hook point(s): {unknown}")
        return [self.hook_points[n] for n in names]

    def reset_hooks(self) -> None:
        """Remove every hook from every hook point."""
        for hp in self.hook_points.values():
            hp.remove_hooks()

    def run_with_hooks(
        self,
        tokens: torch.Tensor,
        fwd_hooks: Iterable[tuple[Union[str, Callable[[str], bool]], HookFn]] = (),
    ) -> torch.Tensor:
        """Run a forward pass with temporary hooks ``[(name or filter, fn), ...]``."""
        try:
            for names, fn in fwd_hooks:
                for hp in self._select(names):
                    hp.add_hook(fn)
            return self(tokens)
        finally:
            self.reset_hooks()

    def run_with_cache(
        self,
        tokens: torch.Tensor,
        names_filter: NamesFilter = None,
        fwd_hooks: Iterable[tuple[Union[str, Callable[[str], bool]], HookFn]] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run a forward pass and return ``(logits, cache)`` with detached activations.

        ``names_filter`` is None (everything), a name, a list of names or a predicate.
        ``hook_result`` (each head's output) is only computed when selected.
        Editing hooks in ``fwd_hooks`` run before the cache records.
        """
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach()

        selected = self._select(names_filter)
        hooks = list(fwd_hooks) + [(hp.name, save) for hp in selected]
        with torch.no_grad():
            logits = self.run_with_hooks(tokens, hooks)
        return logits.detach(), cache

    # ------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.embed.W_E.device

    def _stack(self, attr: str) -> torch.Tensor:
        return torch.stack([getattr(b.attn, attr) for b in self.blocks])

    @property
    def W_E(self) -> torch.Tensor:  # noqa: N802
        """Token embedding [d_vocab, d_model]."""
        return self.embed.W_E

    @property
    def W_U(self) -> torch.Tensor:  # noqa: N802
        """Unembedding [d_model, d_vocab]."""
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:  # noqa: N802
        """Unembedding bias [d_vocab]."""
        return self.unembed.b_U

    def __getattr__(self, name: str):  # noqa: D105
        # nn.Module's __getattr__ would replace W_pos's specific AttributeError with a generic one
        if name == "W_pos" and not self.cfg.has_absolute_positions:
            raise AttributeError("this model uses rotary positions: there is no W_pos")
        return super().__getattr__(name)

    @property
    def W_pos(self) -> torch.Tensor:  # noqa: N802
        """Positional embedding [n_ctx, d_model] (absent for rotary models)."""
        if self.cfg.positional_embedding_type != "standard":
            raise AttributeError("this model uses rotary positions: there is no W_pos")
        return self.pos_embed.W_pos

    @property
    def W_Q(self) -> torch.Tensor:  # noqa: N802
        """Queries [n_layers, n_heads, d_model, d_head]."""
        return self._stack("W_Q")

    @property
    def W_K(self) -> torch.Tensor:  # noqa: N802
        """Keys [n_layers, n_heads, d_model, d_head]."""
        return self._stack("W_K")

    @property
    def W_V(self) -> torch.Tensor:  # noqa: N802
        """Values [n_layers, n_heads, d_model, d_head]."""
        return self._stack("W_V")

    @property
    def W_O(self) -> torch.Tensor:  # noqa: N802
        """Outputs [n_layers, n_heads, d_head, d_model]."""
        return self._stack("W_O")

    @property
    def b_O(self) -> torch.Tensor:  # noqa: N802
        """Attention output biases [n_layers, d_model]."""
        return torch.stack([b.attn.b_O for b in self.blocks])

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "HookedTransformer":
        """Initialise for training (GPT-2 style); never used as a loading fallback."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith((".w",)):
                nn.init.ones_(p)
            elif name.split(".")[-1].startswith("b"):
                nn.init.zeros_(p)
            else:
                residual_out = name.endswith(("W_O", "W_out"))  # GPT-2: scale by depth
                scale = std / math.sqrt(2 * self.cfg.n_layers) if residual_out else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return self
