"""Activation patching, attribution patching and path patching on a clean/corrupted pair.

Activation patching (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024): run
one prompt (the *base* run), replace one activation by its value on the other prompt (the
*source* run) and read a metric on the final logits. Denoising patches clean activations into
the corrupted run; noising patches corrupted activations into the clean run. The grids equal
TransformerLens' ``patching.get_act_patch_*`` (which compute denoising).

Exactness makes this fast. A patch at layer l and position p changes nothing before layer l
and nothing at positions < p; positions after the metric's position never matter; the last
layer needs only the metric's query row; a patch that replaces an activation by an identical
value changes nothing. So every patched run starts from the cached base run at the patch,
recomputes only rows >= p of layers >= l (batched over patches), and computes logits at the
metric position only.

Attribution patching (Nanda 2023) estimates each cell as base metric + (a_source − a_base) ·
∂m/∂a, with the gradient taken on the base run (one forward and one backward pass).

Path patching (Wang et al. 2022) sends one head's output, taken from the source run, only
into a receiver head's query, key or value input, and recomputes the network from the
receiver on; its direct effect sends it only into the final residual stream. Two variants
(``mlps``) say what happens between sender and receiver:

- ``"recomputed"`` (the default; Wang et al., as ARENA's IOI code implements it): the sender's
  output from the source run, every other attention head frozen at its base-run value, the
  MLPs in between recomputed on the patched residual stream; the receiver reads that stream.
- ``"frozen"``: only the sender's change is added to the receiver's input; every other
  component, the MLPs too, keeps its base value.

They agree on attention-only models (there is nothing to recompute).
"""

from __future__ import annotations

import csv
import io
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import ByteLRU
from ..model.checkpoint import LoadedModel
from ..model.jsonfile import JsonFileError, loads_bounded
from ..model.transformer import rotate
from .attention import check_head, check_layer
from .errors import AnalysisError
from .forward import tokenize
from .predictions import TokenLike, token_id

Granularity = Literal["resid_pre", "attn_out", "mlp_out", "head_out", "head_out_by_pos",
                      "head_q", "head_k", "head_v", "head_pattern"]
#: Granularities, in the order a page lists them.
GRANULARITIES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head_out",
                                  "head_out_by_pos", "head_q", "head_k", "head_v",
                                  "head_pattern")
#: What each granularity patches (for labels and help text).
GRANULARITY_LABELS: dict[str, str] = {
    "resid_pre": "residual stream before each layer × position",
    "attn_out": "attention output of each layer × position",
    "mlp_out": "MLP output of each layer × position",
    "head_out": "each head's output (z) over all positions",
    "head_out_by_pos": "each head's output (z) × position",
    "head_q": "each head's query over all positions",
    "head_k": "each head's key over all positions",
    "head_v": "each head's value over all positions",
    "head_pattern": "each head's attention pattern over all positions",
}
#: Axis names of each granularity's grid (TransformerLens' order).
GRID_AXES: dict[str, tuple[str, ...]] = {
    "resid_pre": ("layer", "pos"), "attn_out": ("layer", "pos"), "mlp_out": ("layer", "pos"),
    "head_out": ("layer", "head"), "head_out_by_pos": ("layer", "pos", "head"),
    "head_q": ("layer", "head"), "head_k": ("layer", "head"), "head_v": ("layer", "head"),
    "head_pattern": ("layer", "head"),
}
Direction = Literal["denoising", "noising"]
DIRECTIONS: tuple[str, ...] = ("denoising", "noising")
MetricKind = Literal["logit_diff", "normalized", "logprob", "kl"]
METRICS: tuple[str, ...] = ("logit_diff", "normalized", "logprob", "kl")
METRIC_LABELS: dict[str, str] = {
    "logit_diff": "logit difference (correct − wrong)",
    "normalized": "normalised logit difference (clean = 1, corrupted = 0)",
    "logprob": "log-probability of the correct token",
    "kl": "KL divergence to the clean distribution (nats)",
}
LnMode = Literal["recomputed", "frozen"]
MlpMode = Literal["recomputed", "frozen"]
#: Path-patching variants: what the MLPs between sender and receiver do.
MLP_MODES: tuple[str, ...] = ("recomputed", "frozen")
MLP_MODE_LABELS: dict[str, str] = {
    "recomputed": "MLPs recomputed (Wang et al.)",
    "frozen": "MLPs frozen (the sender's change only)",
}
COMPONENTS: tuple[str, ...] = ("q", "k", "v")

#: Most pairs a set of pairs may hold (each pair costs a full grid).
MAX_PAIRS = 100
#: Most characters of an uploaded set of pairs.
MAX_PAIR_FILE_CHARS = 1_000_000
#: Patched rows per batch (bounds memory: rows × d_model floats per activation).
ROW_BUDGET = 8192

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- inputs
#: A prompt: text, or token ids.
Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupted prompt of the same token length, and the answer tokens."""

    clean: Prompt
    corrupted: Prompt
    correct: TokenLike
    wrong: Optional[TokenLike] = None


def _prompt_ids(lm: LoadedModel, name: str, prompt: Prompt) -> tuple[list[int], int]:
    if isinstance(prompt, str):
        try:
            return tokenize(lm, prompt)
        except AnalysisError as exc:
            raise AnalysisError(f"{name} prompt: {exc}") from None
    try:
        ids = [int(i) for i in prompt]
    except (TypeError, ValueError):
        raise AnalysisError(f"the {name} prompt must be text or a list of token ids") from None
    if not ids:
        raise AnalysisError(f"{name} prompt: no tokens")
    if any(not 0 <= i < lm.cfg.d_vocab for i in ids):
        raise AnalysisError(f"{name} prompt: token ids must lie in [0, {lm.cfg.d_vocab})")
    return ids[:lm.cfg.n_ctx], max(0, len(ids) - lm.cfg.n_ctx)


def pair_tokens(lm: LoadedModel, clean: Prompt, corrupted: Prompt) -> tuple[list[int],
                                                                           list[int]]:
    """Token ids of both prompts (text, or token ids); refuse pairs of different length with
    where they differ."""
    ids = []
    for name, prompt in (("clean", clean), ("corrupted", corrupted)):
        tok, dropped = _prompt_ids(lm, name, prompt)
        if dropped:
            raise AnalysisError(f"the {name} prompt has {len(tok) + dropped} tokens, more than "
                                f"the model's context of {lm.cfg.n_ctx}")
        ids.append(tok)
    a, b = ids
    if len(a) != len(b):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        disp = lm.tokenizer.display
        where = (f"they first differ at position {first} "
                 f"({disp(a[first]) if first < len(a) else 'end'!r} vs "
                 f"{disp(b[first]) if first < len(b) else 'end'!r})")
        raise AnalysisError(f"the clean prompt has {len(a)} tokens and the corrupted prompt "
                            f"{len(b)}; a pair must have the same token length ({where})")
    return a, b


@dataclass(frozen=True)
class Metric:
    """A patching metric on the logits at one position.

    ``logit_diff``: logit[correct] − logit[wrong]; ``normalized``: the same mapped so that the
    clean run gives 1 and the corrupted run 0; ``logprob``: log p(correct); ``kl``:
    KL(p_clean || p) in nats.
    """

    kind: str
    position: int
    correct: Optional[int]
    wrong: Optional[int]
    clean_ld: float = 0.0
    corrupted_ld: float = 0.0
    clean_logprobs: Optional[torch.Tensor] = field(default=None, repr=False)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Metric of logit rows [..., d_vocab] at the metric position -> [...]."""
        if self.kind in ("logit_diff", "normalized"):
            ld = logits[..., self.correct] - logits[..., self.wrong]
            if self.kind == "logit_diff":
                return ld
            return (ld - self.corrupted_ld) / (self.clean_ld - self.corrupted_ld)
        lp = logits.log_softmax(-1)
        if self.kind == "logprob":
            return lp[..., self.correct]
        ref = self.clean_logprobs.to(lp)
        return (ref.exp() * (ref - lp)).sum(-1)

    def of_rows(self, rows: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor  # noqa: N803
                ) -> torch.Tensor:
        """Metric of final (normalised) residual rows [B, d]: a logit difference needs only
        its two columns of W_U."""
        if self.kind in ("logit_diff", "normalized"):
            cols = torch.tensor([self.correct, self.wrong], device=rows.device)
            two = rows @ W_U[:, cols] + b_U[cols]
            ld = two[:, 0] - two[:, 1]
            if self.kind == "logit_diff":
                return ld
            return (ld - self.corrupted_ld) / (self.clean_ld - self.corrupted_ld)
        return self(rows @ W_U + b_U)

    def on_full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of a model's output logits [batch, pos, d_vocab] (TransformerLens style)."""
        return self(logits[:, self.position]).squeeze(0)


def _check_choice(value: str, options: tuple[str, ...], what: str) -> str:
    if value not in options:
        raise AnalysisError(f"{what} must be one of {', '.join(options)}; got {value!r}")
    return value


def _check_position(position: int, n: int) -> int:
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise AnalysisError(f"position must be a whole number, got {position!r}")
    if not -n <= int(position) < n:
        raise AnalysisError(f"position {position} is outside the prompts: they have {n} tokens "
                            f"(positions 0 to {n - 1}, or -1 for the last)")
    return int(position) % n


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PatchingGrid:
    """An activation-patching grid with its attribution-patching estimate.

    Attributes:
        granularity: one of :data:`GRANULARITIES`.
        axes: names of the grid's axes (``("layer", "pos")``, ``("layer", "pos", "head")``
            or ``("layer", "head")``).
        direction: "denoising" (clean into corrupted) or "noising" (corrupted into clean).
        metric: one of :data:`METRICS`.
        values: grid of the metric after each patch (TransformerLens' order of axes).
        attribution: same shape: base metric + (a_source − a_base) · ∂m/∂a on the base run.
        base_metric: metric of the unpatched base run.
        clean_metric: metric of the clean run.
        corrupted_metric: metric of the corrupted run.
        correlation: Pearson correlation of exact and attribution effects (NaN if constant).
        position: the metric's position.
        correct_id: the correct answer token (None for KL when none was given).
        wrong_id: the wrong answer token (None for log-probability and KL).
        clean_display: [pos] display strings of the clean prompt.
        corrupted_display: [pos] display strings of the corrupted prompt.
        n_runs: patched runs the grid stands for (one per cell).
        n_computed: patched runs actually computed (the rest changed an activation to an
            identical value, or could not reach the metric position, so equal the base).
    """

    granularity: str
    axes: tuple[str, ...]
    direction: str
    metric: str
    values: np.ndarray
    attribution: np.ndarray
    base_metric: float
    clean_metric: float
    corrupted_metric: float
    correlation: float
    position: int
    correct_id: Optional[int]
    wrong_id: Optional[int]
    clean_display: tuple[str, ...]
    corrupted_display: tuple[str, ...]
    n_runs: int
    n_computed: int

    def __post_init__(self) -> None:  # noqa: D105
        assert self.values.shape == self.attribution.shape
        assert self.values.ndim == len(self.axes)

    @property
    def effect(self) -> np.ndarray:
        """Exact change of the metric caused by each patch."""
        return self.values - self.base_metric

    @property
    def attribution_effect(self) -> np.ndarray:
        """Attribution-patching estimate of that change."""
        return self.attribution - self.base_metric


@dataclass(frozen=True)
class PathPatching:
    """Path patching from one sender head into every later receiver and into the logits.

    Attributes:
        sender: (layer, head) of the sender.
        direction: "denoising" or "noising".
        metric: one of :data:`METRICS`.
        ln_mode: "recomputed" (receivers' LayerNorm uses its patched input's statistics) or
            "frozen" (the base run's scale; TransformerLens' direct-path linearisation).
        mlps: "recomputed" (the MLPs between sender and receiver run on the patched residual
            stream, every other head frozen; Wang et al.) or "frozen" (only the sender's
            change reaches the receiver).
        values: [n_layers, n_heads, 3] metric after patching the sender's output into each
            receiver's query, key, value input (NaN for receivers not after the sender).
        direct: metric after patching the sender's output into the final residual stream only.
        base_metric: metric of the base run.
        clean_metric: metric of the clean run.
        corrupted_metric: metric of the corrupted run.
    """

    sender: tuple[int, int]
    direction: str
    metric: str
    ln_mode: str
    values: np.ndarray
    direct: float
    base_metric: float
    clean_metric: float
    corrupted_metric: float
    mlps: str = "recomputed"


@dataclass(frozen=True)
class PathPatchingTable:
    """Every sender × receiver × {Q, K, V} path, and every sender's direct effect.

    Attributes:
        values: [n_layers, n_heads, n_layers, n_heads, 3] metric after patching the path
            (sender layer, sender head, receiver layer, receiver head, q/k/v); NaN where the
            receiver is not after the sender.
        direct: [n_layers, n_heads] metric after patching each sender into the logits only.
        base_metric: metric of the base run.
        direction: "denoising" or "noising".
        metric: one of :data:`METRICS`.
        ln_mode: "recomputed" or "frozen".
        mlps: "recomputed" or "frozen" (see :class:`PathPatching`).
    """

    values: np.ndarray
    direct: np.ndarray
    base_metric: float
    direction: str
    metric: str
    ln_mode: str
    mlps: str = "recomputed"


@dataclass(frozen=True)
class PairSetPatching:
    """One granularity's grid over a set of pairs: per-pair grids and their mean.

    Attributes:
        granularity: one of :data:`GRANULARITIES`.
        axes: names of the grid's axes.
        per_pair: [n_pairs, *grid] metric after each patch, per pair.
        per_pair_attribution: [n_pairs, *grid] attribution-patching estimates.
        mean: [*grid] mean over pairs.
        mean_attribution: [*grid] mean of the estimates.
        base_metrics: [n_pairs] base metric of each pair.
        clean_metrics: [n_pairs] clean metric of each pair.
        corrupted_metrics: [n_pairs] corrupted metric of each pair.
        correlation: Pearson correlation of exact and attribution effects over every cell of
            every pair.
        grids: the per-pair :class:`PatchingGrid` results.
    """

    granularity: str
    axes: tuple[str, ...]
    per_pair: np.ndarray
    per_pair_attribution: np.ndarray
    mean: np.ndarray
    mean_attribution: np.ndarray
    base_metrics: np.ndarray
    clean_metrics: np.ndarray
    corrupted_metrics: np.ndarray
    correlation: float
    grids: tuple[PatchingGrid, ...]


# ----------------------------------------------------------------------------- runs
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


@dataclass
class _Single:
    """Patched rows that differ from the base run at one position each: ``pos`` [B],
    ``val`` [B, d] (every other row equals the base run at this point of the network)."""

    pos: torch.Tensor
    val: torch.Tensor


@dataclass
class _Dense:
    """Patched rows ``p0``..``p0 + S - 1``: ``val`` [B, S, d]."""

    p0: int
    val: torch.Tensor


_State = Union[_Single, _Dense]


def _first_row(st: _State) -> int:
    """The first row a state changes."""
    return int(st.pos.min()) if isinstance(st, _Single) else st.p0


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
            resid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w + b`` (``+ resid``) on the rows' 2-D view, in one fused product."""
    shape, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if resid is None:
        out = torch.addmm(b, x2, w)
    else:
        out = torch.addmm(resid.reshape(-1, w.shape[1]), x2, w)
        out += b
    return out.view(*shape, w.shape[1])


def _first_difference(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> int:
    """First index along ``dim`` where ``a`` and ``b`` differ (their length if nowhere)."""
    diff = (a != b).flatten(dim + 1).any(-1) if a.ndim > dim + 1 else a != b
    where = torch.nonzero(diff.reshape(-1))
    return int(where[0]) if len(where) else int(a.shape[dim])


class _Engine:
    """Continues the base run from a batch of patches, recomputing only what they change."""

    def __init__(self, lm: LoadedModel, base: _Run, metric: Metric, n: int) -> None:
        self.lm, self.cfg, self.model = lm, lm.cfg, lm.model
        self.base, self.metric, self.n = base, metric, n
        c = self.cfg
        self.h, self.e, self.d = c.n_heads, c.d_head, c.d_model
        self.w = []
        for blk in self.model.blocks:
            a = blk.attn
            self.w.append({
                "Q": a.W_Q.detach().permute(1, 0, 2).reshape(self.d, -1),
                "K": a.W_K.detach().permute(1, 0, 2).reshape(self.d, -1),
                "V": a.W_V.detach().permute(1, 0, 2).reshape(self.d, -1),
                "bQ": a.b_Q.detach().reshape(-1), "bK": a.b_K.detach().reshape(-1),
                "bV": a.b_V.detach().reshape(-1),
                "O": a.W_O.detach().reshape(-1, self.d), "bO": a.b_O.detach(),
            })
        self.W_U, self.b_U = self.model.W_U.detach(), self.model.b_U.detach()

    # ------------------------------------------------------------------ pieces
    def _rot(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions for q or k rows [B, S, h, e] at ``positions`` [S] or [B, 1]."""
        if self.cfg.positional_embedding_type != "rotary":
            return x
        if positions.ndim == 1:
            return rotate(x, positions, self.cfg)
        return rotate(x.transpose(0, 1), positions[:, 0], self.cfg).transpose(0, 1)

    def _proj(self, j: int, x: torch.Tensor, which: str) -> torch.Tensor:
        """q, k or v of normalised rows x [..., d] -> [..., h, e] (before rotary)."""
        w = self.w[j]
        return _linear(x, w[which], w["b" + which]).unflatten(-1, (self.h, self.e))

    def _norm(self, module_name: str, j: int, x: torch.Tensor) -> torch.Tensor:
        """The block's LayerNorm (one fused pass; the same arithmetic as the model's) or
        other norm."""
        norm = getattr(self.model.blocks[j], module_name)
        if getattr(norm, "kind", None) == "LN":
            return F.layer_norm(x, (self.d,), norm.w, norm.b, norm.eps)
        return norm(x)

    def _out(self, j: int, z: torch.Tensor, resid: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Attention output rows from z rows [..., h, e] (bias included), plus ``resid``
        rows of the same shape when given (one fused product)."""
        w = self.w[j]
        return _linear(z.flatten(-2), w["O"], w["bO"], resid)

    @staticmethod
    def _softmax_z(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   d_head: int) -> torch.Tensor:
        """Causal attention of queries q [B, nq, h, e] at positions q_pos [nq] over keys and
        values k, v [B, T, h, e] -> z [B, nq, h, e]."""
        key_pos = torch.arange(k.shape[1], device=k.device)
        allowed = key_pos[None, :] <= q_pos[:, None]  # [nq, T]
        # one fused kernel (scores, mask, softmax and the weighted sum); same scale 1/sqrt(e)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=allowed,
                                           scale=1 / math.sqrt(d_head))
        return z.transpose(1, 2)  # [B, q, h, e]

    def _base_rows(self, name: str, j: int, p0: int, batch: int) -> torch.Tensor:
        return self.base[name, j][p0:].expand(batch, -1, -1)

    def _dense(self, st: _State, name: str, j: int, p0: int) -> torch.Tensor:
        """Rows p0.. of a state as [B, S, d], filling unpatched rows from the base run."""
        if isinstance(st, _Dense):
            return st.val[:, p0 - st.p0:]
        b = st.val.shape[0]
        rows = self._base_rows(name, j, p0, b).clone()
        inside = st.pos >= p0
        idx = torch.nonzero(inside).flatten()
        rows[idx, st.pos[idx] - p0] = st.val[idx]
        return rows

    def _attention(self, j: int, st: _State, last: bool,
                   resid: Optional[torch.Tensor] = None) -> _Dense:
        """Attention output of layer j for a patched resid_pre state (rows of the queries
        that can change; only the last row when ``last``), plus ``resid`` (those rows of the
        residual stream) when given."""
        n, h, e = self.n, self.h, self.e
        qb, kb, vb = self.base["q", j], self.base["k", j], self.base["v", j]
        if isinstance(st, _Single) and last:
            return self._attention_single_last(j, st, resid)
        if isinstance(st, _Single):
            b = st.val.shape[0]
            ar = torch.arange(b, device=st.val.device)
            xn = self._norm("ln1", j, st.val)[:, None]  # [B, 1, d]
            pos = st.pos[:, None]
            qi = self._rot(self._proj(j, xn, "Q"), pos)[:, 0]
            ki = self._rot(self._proj(j, xn, "K"), pos)[:, 0]
            vi = self._proj(j, xn, "V")[:, 0]
            k = kb.expand(b, n, h, e).clone()
            v = vb.expand(b, n, h, e).clone()
            k[ar, st.pos], v[ar, st.pos] = ki, vi
            p0 = n - 1 if last else int(st.pos.min())
            q = qb[p0:].expand(b, n - p0, h, e).clone()
            inside = torch.nonzero(st.pos >= p0).flatten()
            q[inside, st.pos[inside] - p0] = qi[inside]
        else:
            b, p0 = st.val.shape[0], st.p0
            xn = self._norm("ln1", j, st.val)
            positions = torch.arange(p0, n, device=xn.device)
            k = torch.cat([kb[:p0].expand(b, p0, h, e),
                           self._rot(self._proj(j, xn, "K"), positions)], 1)
            v = torch.cat([vb[:p0].expand(b, p0, h, e), self._proj(j, xn, "V")], 1)
            if last:
                xn, positions, p0 = xn[:, -1:], positions[-1:], n - 1
            q = self._rot(self._proj(j, xn, "Q"), positions)
        q_pos = torch.arange(p0, n, device=q.device)
        z = self._softmax_z(q, k, v, q_pos, e)
        return _Dense(p0, self._out(j, z, resid))

    def _attention_single_last(self, j: int, st: _Single,
                               resid: Optional[torch.Tensor] = None) -> _Dense:
        """Last layer, one changed row per variant: only the metric's query row is needed, so
        update the base run's score row at the changed key (and the query itself when the
        changed row is the metric's) instead of recomputing every key."""
        n, e = self.n, self.e
        qb, kb, vb = self.base["q", j], self.base["k", j], self.base["v", j]  # [n, h, e]
        b = st.val.shape[0]
        ar = torch.arange(b, device=st.val.device)
        xn = self._norm("ln1", j, st.val)[:, None]  # [B, 1, d]
        pos = st.pos[:, None]
        qi = self._rot(self._proj(j, xn, "Q"), pos)[:, 0]  # [B, h, e]
        ki = self._rot(self._proj(j, xn, "K"), pos)[:, 0]
        vi = self._proj(j, xn, "V")[:, 0]
        root = math.sqrt(e)
        q = qb[n - 1].expand_as(qi).clone()
        at_query = torch.nonzero(st.pos == n - 1).flatten()
        q[at_query] = qi[at_query]
        # every key of the base run (per head: [B, e] @ [e, n]) ...
        scores = (q.transpose(0, 1) @ kb.permute(1, 2, 0)).transpose(0, 1) / root  # [B, h, n]
        scores[ar, :, st.pos] = (q * ki).sum(-1) / root  # ... but the changed one
        pattern = scores.softmax(-1)
        z = (pattern.transpose(0, 1) @ vb.transpose(0, 1)).transpose(0, 1)  # [B, h, e]
        z = z + pattern[ar, :, st.pos][..., None] * (vi - vb[st.pos])
        return _Dense(n - 1, self._out(j, z, None if resid is None else resid[:, 0])[:, None])

    def _mlp(self, j: int, x: torch.Tensor, resid: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """MLP output of rows x (its LayerNorm included), plus ``resid`` when given."""
        blk = self.model.blocks[j]
        mlp, xn = blk.mlp, self._norm("ln2", j, x)
        if mlp.gated:
            out = mlp(xn)
            return out if resid is None else out + resid
        hidden = mlp.act(_linear(xn, mlp.W_in, mlp.b_in))
        return _linear(hidden, mlp.W_out, mlp.b_out, resid)

    def _rows_like(self, st: _State, name: str, j: int, like: _State) -> torch.Tensor:
        """Base rows ``name`` of layer j at the rows ``like`` holds."""
        if isinstance(like, _Single):
            return self.base[name, j][like.pos]
        return self._base_rows(name, j, like.p0, like.val.shape[0])

    def layer(self, j: int, st: _State) -> _State:
        """Run layer j on a patched resid_pre state; returns the resid_post state."""
        last = j == self.cfg.n_layers - 1
        x = self._dense(st, "resid_pre", j, self.n - 1 if last else _first_row(st))
        attn = self._attention(j, st, last, x)
        if self.cfg.attn_only:
            post = attn.val
        elif self.cfg.parallel_attn_mlp:
            post = self._mlp(j, x, attn.val)
        else:
            post = self._mlp(j, attn.val, attn.val)
        return _Dense(attn.p0, post)

    def from_attn(self, j: int, st: _State) -> torch.Tensor:
        """Metric after replacing layer j's attention output rows by ``st``."""
        if j == self.cfg.n_layers - 1 and isinstance(st, _Dense):
            st = _Dense(self.n - 1, st.val[:, -1:])
        pre = self._rows_like(st, "resid_pre", j, st)
        val = st.val
        if self.cfg.attn_only:
            post = pre + val
        elif self.cfg.parallel_attn_mlp:
            post = pre + val + self._rows_like(st, "mlp_out", j, st)
        else:
            mid = pre + val
            post = self._mlp(j, mid, mid)
        new = _Single(st.pos, post) if isinstance(st, _Single) else _Dense(st.p0, post)
        return self.from_post(j, new)

    def from_post(self, j: int, st: _State) -> torch.Tensor:
        """Metric after replacing layer j's resid_post rows by ``st``."""
        for layer in range(j + 1, self.cfg.n_layers):
            st = self.layer(layer, st)
        return self.finish(st)

    def finish(self, st: _State) -> torch.Tensor:
        """Metric of the final residual stream at the metric position [B]."""
        if isinstance(st, _Dense):
            row = st.val[:, -1]
        else:
            here = (st.pos == self.n - 1)[:, None]
            row = torch.where(here, st.val, self.base.final_row.expand_as(st.val))
        return self.metric.of_rows(self.normalized(row), self.W_U, self.b_U)

    def normalized(self, row: torch.Tensor, frozen_scale: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Final residual rows [B, d] through the final norm (if the model has one)."""
        if self.cfg.normalization_type:
            ln = self.model.ln_final
            if frozen_scale is None:
                row = ln(row)
            else:
                if self.cfg.normalization_type == "LN":
                    row = row - row.mean(-1, keepdim=True)
                row = row / frozen_scale * ln.w + (ln.b if self.cfg.normalization_type == "LN"
                                                   else 0)
        return row


# ------------------------------------------------------------------------ the grids
class _Setup:
    """Validated pair, metric, base/source runs and the engine."""

    def __init__(self, lm: LoadedModel, clean: Prompt, corrupted: Prompt,
                 correct: Optional[TokenLike],
                 wrong: Optional[TokenLike], metric: str, direction: str,
                 position: int) -> None:
        self.kind = _check_choice(metric, METRICS, "metric")
        self.direction = _check_choice(direction, DIRECTIONS, "direction")
        clean_ids, corrupted_ids = pair_tokens(lm, clean, corrupted)
        self.clean_ids, self.corrupted_ids = clean_ids, corrupted_ids
        n_tok = len(clean_ids)
        self.position = _check_position(position, n_tok)
        self.n = self.position + 1
        a = None
        if self.kind != "kl" and correct is None:
            raise AnalysisError(f"the {METRIC_LABELS[self.kind]} needs a correct answer token")
        if self.kind != "kl" or (correct is not None and correct != ""):
            # KL compares whole distributions: it reads no answer token
            try:
                a = token_id(lm, correct)
            except AnalysisError as exc:
                raise AnalysisError(f"correct answer: {exc}") from None
        b = None
        if self.kind in ("logit_diff", "normalized"):
            if wrong is None or wrong == "":
                raise AnalysisError("a logit difference needs a wrong answer token too")
            try:
                b = token_id(lm, wrong)
            except AnalysisError as exc:
                raise AnalysisError(f"wrong answer: {exc}") from None
            if a == b:
                raise AnalysisError(f"the correct and the wrong answer are the same token "
                                    f"({lm.tokenizer.display(a)!r}); choose two different ones")
        self.lm = lm
        with torch.no_grad():
            self.clean = _run(lm, clean_ids, self.n)
            self.corrupted = _run(lm, corrupted_ids, self.n)
            lc, lr = self.clean.logits.float(), self.corrupted.logits.float()
            ld_c = float(lc[a] - lc[b]) if b is not None else 0.0
            ld_r = float(lr[a] - lr[b]) if b is not None else 0.0
            if self.kind == "normalized" and ld_c == ld_r:
                raise AnalysisError("the clean and corrupted prompts give the same logit "
                                    "difference, so it cannot be normalised; use the plain "
                                    "logit difference")
            self.metric = Metric(kind=self.kind, position=self.position, correct=a, wrong=b,
                                 clean_ld=ld_c, corrupted_ld=ld_r,
                                 clean_logprobs=lc.log_softmax(-1))
            self.clean_metric = float(self.metric(self.clean.logits))
            self.corrupted_metric = float(self.metric(self.corrupted.logits))
        if self.direction == "denoising":
            self.base, self.source = self.corrupted, self.clean
            self.base_ids, self.source_ids = corrupted_ids, clean_ids
            self.base_metric = self.corrupted_metric
        else:
            self.base, self.source = self.clean, self.corrupted
            self.base_ids, self.source_ids = clean_ids, corrupted_ids
            self.base_metric = self.clean_metric
        self.n_tokens = n_tok
        self.engine = _Engine(lm, self.base, self.metric, self.n)


def _chunks(order: list[int], starts: list[int], n: int, one_row: bool = False
            ) -> list[list[int]]:
    """Split variants (sorted by start row) into batches of at most ROW_BUDGET rows
    (``one_row``: each variant recomputes a single row)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        p0 = starts[cur[0]] if cur else starts[i]
        rows = 1 if one_row else max(1, n - p0)
        # rows between p0 and a variant's own start are recomputed for nothing: keep them few
        spread = not one_row and starts[i] - p0 > max(1, (n - p0) // 16)
        if cur and ((len(cur) + 1) * rows > ROW_BUDGET or spread):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _exact_grid(s: _Setup, granularity: str, progress: Optional[ProgressFn]) -> tuple[
        np.ndarray, int]:
    """The exact grid (metric after each patch) and how many patched runs were computed."""
    cfg, base, src, n = s.lm.cfg, s.base, s.source, s.n
    L, H, T = cfg.n_layers, cfg.n_heads, s.n_tokens
    shape = {"head_out_by_pos": (L, T, H)}.get(
        granularity, (L, H) if GRID_AXES[granularity][1] == "head" else (L, T))
    out = torch.full(shape, s.base_metric, dtype=torch.float64)
    if granularity == "mlp_out" and cfg.attn_only:
        raise AnalysisError("this model has no MLPs (it is attention-only); choose another "
                            "granularity")
    # variants: (layer, index tuple into out, start row, kind-specific payload)
    jobs: dict[int, list[tuple[tuple[int, ...], int, object]]] = {j: [] for j in range(L)}
    for j in range(L):
        if granularity in ("resid_pre", "attn_out", "mlp_out"):
            a_s, a_b = src[granularity, j], base[granularity, j]
            for p in range(n):
                if not torch.equal(a_s[p], a_b[p]):
                    if granularity != "resid_pre" and j == L - 1 and p != n - 1:
                        continue  # a one-row change after the last attention misses the metric
                    jobs[j].append(((j, p), p, p))
        elif granularity == "head_out_by_pos":
            zs, zb = src["z", j], base["z", j]
            for p in range(n):
                if j == L - 1 and p != n - 1:
                    continue
                for hd in range(H):
                    if not torch.equal(zs[p, hd], zb[p, hd]):
                        jobs[j].append(((j, p, hd), p, (p, hd)))
        else:
            name = {"head_out": "z", "head_q": "q", "head_k": "k", "head_v": "v",
                    "head_pattern": "pattern"}[granularity]
            a_s, a_b = src[name, j], base[name, j]
            for hd in range(H):
                if name == "pattern":
                    p0 = _first_difference(a_s[hd], a_b[hd])
                else:
                    p0 = _first_difference(a_s[:, hd], a_b[:, hd])
                if p0 < n:
                    jobs[j].append(((j, hd), p0, hd))
    total = sum(len(v) for v in jobs.values())
    done = 0
    if progress:
        progress(0, total)
    with torch.no_grad():
        for j in range(L):
            variants = sorted(jobs[j], key=lambda v: v[1])
            starts = [v[1] for v in variants]
            # one changed row that meets only the last layer: a score-row update per variant
            one_row = (j == L - 1 or (j == L - 2 and granularity in (
                "attn_out", "mlp_out", "head_out_by_pos")))
            for chunk in _chunks(list(range(len(variants))), starts, n, one_row):
                batch = [variants[i] for i in chunk]
                values = _run_batch(s, granularity, j, batch)
                for (index, _, _), val in zip(batch, values.tolist()):
                    out[index] = val
                done += len(batch)
                if progress:
                    progress(done, total)
    return out.numpy(), total


def _run_batch(s: _Setup, granularity: str, j: int, batch: list) -> torch.Tensor:
    eng, base, src, n = s.engine, s.base, s.source, s.n
    dev = base.final_row.device
    if granularity == "resid_pre":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        st = _Single(pos, src["resid_pre", j][pos])
        return eng.from_post(j, eng.layer(j, st))
    if granularity == "attn_out":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        return eng.from_attn(j, _Single(pos, src["attn_out", j][pos]))
    if granularity == "mlp_out":
        pos = torch.tensor([b[2] for b in batch], device=dev)
        if s.lm.cfg.parallel_attn_mlp:
            row = base["resid_pre", j][pos] + base["attn_out", j][pos]
        else:
            row = base["resid_mid", j][pos]
        return eng.from_post(j, _Single(pos, row + src["mlp_out", j][pos]))
    if granularity == "head_out_by_pos":
        pos = torch.tensor([b[2][0] for b in batch], device=dev)
        heads = torch.tensor([b[2][1] for b in batch], device=dev)
        z = base["z", j][pos].clone()  # [B, h, e]
        ar = torch.arange(len(batch), device=dev)
        z[ar, heads] = src["z", j][pos, heads]
        return eng.from_attn(j, _Single(pos, eng._out(j, z)))
    # whole-head patches: recompute head h's output at rows p0.. and the layer's output
    heads = [b[2] for b in batch]
    p0 = min(b[1] for b in batch)
    b_n, h_idx = len(batch), torch.tensor(heads, device=dev)
    ar = torch.arange(b_n, device=dev)
    z = base["z", j][p0:].expand(b_n, -1, -1, -1).clone()  # [B, S, h, e]
    if granularity == "head_out":
        z[ar, :, h_idx] = src["z", j][p0:, h_idx].transpose(0, 1)
    else:
        q = base["q", j][p0:, h_idx].transpose(0, 1)  # [B, S, e]
        k = base["k", j][:, h_idx].transpose(0, 1)  # [B, n, e]
        v = base["v", j][:, h_idx].transpose(0, 1)
        if granularity == "head_pattern":
            pat = src["pattern", j][h_idx, p0:]  # [B, S, n]
        else:
            if granularity == "head_q":
                q = src["q", j][p0:, h_idx].transpose(0, 1)
            elif granularity == "head_k":
                k = src["k", j][:, h_idx].transpose(0, 1)
            else:
                v = src["v", j][:, h_idx].transpose(0, 1)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(eng.e)
            q_pos = torch.arange(p0, n, device=dev)
            mask = torch.arange(n, device=dev)[None, :] > q_pos[:, None]
            pat = scores.masked_fill(mask, float("-inf")).softmax(-1)
        z[ar, :, h_idx] = pat @ v
    return eng.from_attn(j, _Dense(p0, eng._out(j, z)))


# ---------------------------------------------------------------- attribution patching
_ATTR_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "head_out": "attn.hook_z",
               "head_out_by_pos": "attn.hook_z", "head_q": "attn.hook_q",
               "head_k": "attn.hook_k", "head_v": "attn.hook_v",
               "head_pattern": "attn.hook_pattern"}


def _attribution(s: _Setup, granularities: tuple[str, ...]) -> dict[str, np.ndarray]:
    """(a_source − a_base) · ∂m/∂a on the base run, per granularity (one forward, one backward)."""
    model, cfg = s.lm.model, s.lm.cfg
    names = sorted({f"blocks.{j}.{_ATTR_HOOKS[g]}" for g in granularities
                    for j in range(cfg.n_layers)})
    probes: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def probe(x: torch.Tensor, hook) -> torch.Tensor:
        e = torch.zeros_like(x, requires_grad=True)
        probes[hook.name] = e
        acts[hook.name] = x.detach()[0]
        return x + e

    tokens = torch.tensor([s.base_ids[:s.n]], dtype=torch.long, device=model.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(names, probe)])
        m = s.metric(logits[0, -1])
        grads = torch.autograd.grad(m, [probes[k] for k in names], allow_unused=True)
    grad = {k: (g[0] if g is not None else torch.zeros_like(acts[k]))
            for k, g in zip(names, grads)}
    src_cache = s.source.cache
    base_m = s.base_metric
    out: dict[str, np.ndarray] = {}
    L, H, T = cfg.n_layers, cfg.n_heads, s.n_tokens
    for g in granularities:
        rows = []
        for j in range(L):
            name = f"blocks.{j}.{_ATTR_HOOKS[g]}"
            delta = (src_cache[name] - acts[name]).double() * grad[name].double()
            if g in ("resid_pre", "attn_out", "mlp_out"):
                r = torch.zeros(T, dtype=torch.float64)
                r[:s.n] = delta.sum(-1)
            elif g == "head_out_by_pos":
                r = torch.zeros(T, H, dtype=torch.float64)
                r[:s.n] = delta.sum(-1)
            elif g == "head_pattern":
                r = delta.sum((-1, -2))
            else:
                r = delta.sum((0, 2))
            rows.append(r)
        out[g] = (torch.stack(rows) + base_m).numpy()
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def activation_patching(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *,
                        correct: Optional[TokenLike] = None,
                        wrong: Optional[TokenLike] = None, granularity: str = "resid_pre",
                        metric: str = "logit_diff", direction: str = "denoising",
                        position: int = -1, progress: Optional[ProgressFn] = None,
                        attribution: bool = True) -> PatchingGrid:
    """Patch every activation of one granularity and read the metric (exact), beside the
    attribution-patching estimate of the same grid (NaN when ``attribution`` is False)."""
    _check_choice(granularity, GRANULARITIES, "granularity")
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    return _grid(s, granularity, progress, attribution)


def _grid(s: _Setup, granularity: str, progress: Optional[ProgressFn],
          with_attribution: bool = True) -> PatchingGrid:
    values, computed = _exact_grid(s, granularity, progress)
    if with_attribution:
        attribution = _attribution(s, (granularity,))[granularity]
    else:
        attribution = np.full_like(values, np.nan)
    disp = s.lm.tokenizer.display
    return PatchingGrid(
        granularity=granularity, axes=GRID_AXES[granularity], direction=s.direction,
        metric=s.kind, values=values, attribution=attribution, base_metric=s.base_metric,
        clean_metric=s.clean_metric, corrupted_metric=s.corrupted_metric,
        correlation=_correlation(values - s.base_metric, attribution - s.base_metric),
        position=s.position, correct_id=s.metric.correct, wrong_id=s.metric.wrong,
        clean_display=tuple(disp(i) for i in s.clean_ids),
        corrupted_display=tuple(disp(i) for i in s.corrupted_ids),
        n_runs=int(values.size), n_computed=computed)


# ----------------------------------------------------------------------- path patching
def _receiver_batch(s: _Setup, j: int, resid: torch.Tensor, delta: torch.Tensor, p0: int,
                    ln_mode: str) -> torch.Tensor:
    """Metric after layer j's heads read ``resid`` [S, d] (rows p0.. of their input, which
    differs from the base run's by ``delta`` [S, d]) through their query, key or value input
    only, one head and input at a time: [n_heads, 3]."""
    eng, base, cfg, n = s.engine, s.base, s.lm.cfg, s.n
    H, e, dev = cfg.n_heads, cfg.d_head, delta.device
    x = base["resid_pre", j]
    blk = s.lm.model.blocks[j]
    if ln_mode == "recomputed" or not cfg.normalization_type:
        moved = blk.ln1(resid)
    else:
        d = delta
        if cfg.normalization_type == "LN":
            d = d - d.mean(-1, keepdim=True)
        moved = blk.ln1(x[p0:]) + d / base["ln1_scale", j][p0:] * blk.ln1.w
    positions = torch.arange(p0, n, device=dev)
    new = {c: eng._proj(j, moved[None], c.upper())[0] for c in COMPONENTS}  # [S, h, e]
    new["q"] = eng._rot(new["q"][None], positions)[0]
    new["k"] = eng._rot(new["k"][None], positions)[0]
    h_idx = torch.arange(H, device=dev).repeat(3)  # batch: (q, all heads), (k, ...), (v, ...)
    b_n = 3 * H
    ar = torch.arange(b_n, device=dev)
    q = base["q", j][p0:, h_idx].transpose(0, 1).clone()  # [B, S, e]
    k = base["k", j][:, h_idx].transpose(0, 1).clone()  # [B, n, e]
    v = base["v", j][:, h_idx].transpose(0, 1).clone()
    q[:H] = new["q"].transpose(0, 1)
    k[H:2 * H, p0:] = new["k"].transpose(0, 1)
    v[2 * H:, p0:] = new["v"].transpose(0, 1)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(e)
    q_pos = torch.arange(p0, n, device=dev)
    mask = torch.arange(n, device=dev)[None, :] > q_pos[:, None]
    pat = scores.masked_fill(mask, float("-inf")).softmax(-1)
    z = base["z", j][p0:].expand(b_n, -1, -1, -1).clone()
    z[ar, :, h_idx] = pat @ v
    vals = eng.from_attn(j, _Dense(p0, eng._out(j, z)))
    return vals.reshape(3, H).T


def _recomputed_stream(s: _Setup, layer: int, delta: torch.Tensor, p0: int
                       ) -> list[torch.Tensor]:
    """Rows p0.. of the residual stream after each layer (resid_post of ``layer`` .. the
    last) when the sender in ``layer`` adds ``delta`` [S, d], every attention output after it
    keeps its base value and every MLP from ``layer`` on is recomputed (position-wise, so
    rows before p0 keep their base values)."""
    cfg, base, eng = s.lm.cfg, s.base, s.engine
    out = []
    post = None
    for j in range(layer, cfg.n_layers):
        pre = base["resid_pre", j][p0:] if post is None else post
        attn = base["attn_out", j][p0:]
        if j == layer:
            attn = attn + delta
        if cfg.parallel_attn_mlp:
            # the MLP reads the layer's input: the sender's own layer's MLP does not see it
            mlp = base["mlp_out", j][p0:] if post is None else eng._mlp(j, pre)
            post = pre + attn + mlp
        else:
            mid = pre + attn
            post = eng._mlp(j, mid, mid)
        out.append(post)
    return out


def _path_from_sender(s: _Setup, layer: int, head: int, ln_mode: str,
                      mlps: str = "recomputed") -> tuple[np.ndarray, float]:
    cfg, base, src, eng = s.lm.cfg, s.base, s.source, s.engine
    W_O = s.lm.model.blocks[layer].attn.W_O.detach()[head]
    delta = (src["z", layer][:, head] - base["z", layer][:, head]) @ W_O  # [n, d]
    p0 = _first_difference(src["z", layer][:, head], base["z", layer][:, head])
    values = np.full((cfg.n_layers, cfg.n_heads, 3), np.nan)
    values[layer + 1:] = s.base_metric
    if p0 >= s.n:
        return values, s.base_metric
    if mlps == "frozen" or cfg.attn_only:  # attention-only: nothing to recompute
        for j in range(layer + 1, cfg.n_layers):
            values[j] = _receiver_batch(s, j, base["resid_pre", j][p0:] + delta[p0:],
                                        delta[p0:], p0, ln_mode).double().numpy()
        row = base.final_row + delta[-1]
    else:
        stream = _recomputed_stream(s, layer, delta[p0:], p0)
        for j in range(layer + 1, cfg.n_layers):
            resid = stream[j - 1 - layer]
            values[j] = _receiver_batch(s, j, resid, resid - base["resid_pre", j][p0:], p0,
                                        ln_mode).double().numpy()
        row = stream[-1][-1]
    scale = None
    if ln_mode == "frozen" and cfg.normalization_type:
        post = base.cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"][-1]
        scale = _norm_scale(post, cfg.normalization_type, cfg.eps)
    direct = float(s.metric.of_rows(eng.normalized(row[None], scale), eng.W_U, eng.b_U)[0])
    return values, direct


def _norm_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def path_patching(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *, sender: tuple[int, int],
                  correct: Optional[TokenLike] = None, wrong: Optional[TokenLike] = None,
                  metric: str = "logit_diff", direction: str = "denoising", position: int = -1,
                  ln_mode: str = "recomputed", mlps: str = "recomputed") -> PathPatching:
    """Path patching from ``sender`` = (layer, head) into later heads' q, k, v and the logits
    (``mlps``: the variant, see the module docstring)."""
    _check_choice(ln_mode, ("recomputed", "frozen"), "LayerNorm mode")
    _check_choice(mlps, MLP_MODES, "mlps (what the MLPs between sender and receiver do)")
    try:
        layer, head = sender
    except (TypeError, ValueError):
        raise AnalysisError("sender must be a (layer, head) pair") from None
    layer, head = check_layer(lm, layer), check_head(lm, head)
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    with torch.no_grad():
        values, direct = _path_from_sender(s, layer, head, ln_mode, mlps)
    return PathPatching(sender=(layer, head), direction=s.direction, metric=s.kind,
                        ln_mode=ln_mode, mlps=mlps, values=values, direct=direct,
                        base_metric=s.base_metric, clean_metric=s.clean_metric,
                        corrupted_metric=s.corrupted_metric)


#: Most heads for which the full sender × receiver table is computed.
MAX_TABLE_HEADS = 64


def path_patching_table(lm: LoadedModel, clean: Prompt, corrupted: Prompt, *,
                        correct: Optional[TokenLike] = None,
                        wrong: Optional[TokenLike] = None, metric: str = "logit_diff",
                        direction: str = "denoising", position: int = -1,
                        ln_mode: str = "recomputed", mlps: str = "recomputed",
                        progress: Optional[ProgressFn] = None) -> PathPatchingTable:
    """Every sender × receiver × {q, k, v} path and every sender's direct effect (small models)."""
    _check_choice(ln_mode, ("recomputed", "frozen"), "LayerNorm mode")
    _check_choice(mlps, MLP_MODES, "mlps (what the MLPs between sender and receiver do)")
    cfg = lm.cfg
    if cfg.n_layers * cfg.n_heads > MAX_TABLE_HEADS:
        raise AnalysisError(f"the full path-patching table covers models with at most "
                            f"{MAX_TABLE_HEADS} heads (this one has "
                            f"{cfg.n_layers * cfg.n_heads}); choose one sender head instead")
    s = _Setup(lm, clean, corrupted, correct, wrong, metric, direction, position)
    L, H = cfg.n_layers, cfg.n_heads
    values = np.full((L, H, L, H, 3), np.nan)
    direct = np.zeros((L, H))
    with torch.no_grad():
        for i, (layer, head) in enumerate((a, b) for a in range(L) for b in range(H)):
            values[layer, head], direct[layer, head] = _path_from_sender(s, layer, head,
                                                                         ln_mode, mlps)
            if progress:
                progress(i + 1, L * H)
    return PathPatchingTable(values=values, direct=direct, base_metric=s.base_metric,
                             direction=s.direction, metric=s.kind, ln_mode=ln_mode,
                             mlps=mlps)


# ------------------------------------------------------------------------ sets of pairs
def parse_pairs(text: str) -> list[PromptPair]:
    """Read a set of pairs from CSV (header clean, corrupted, correct, wrong) or JSON (a list
    of objects with those keys)."""
    if not isinstance(text, str) or not text.strip():
        raise AnalysisError("the set of pairs is empty")
    if len(text) > MAX_PAIR_FILE_CHARS:
        raise AnalysisError(f"the file holds {len(text):,} characters; at most "
                            f"{MAX_PAIR_FILE_CHARS:,} are read")
    need = ("clean", "corrupted", "correct", "wrong")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            rows = loads_bounded(text, 16)
        except JsonFileError as exc:
            raise AnalysisError(f"the JSON could not be read: {exc}") from None
        if isinstance(rows, dict):
            rows = rows.get("pairs")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise AnalysisError("the JSON must be a list of objects with keys "
                                "clean, corrupted, correct, wrong")
    else:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in need if c not in header]
        if missing:
            raise AnalysisError(f"the CSV lacks the column(s) {', '.join(missing)}; its header "
                                f"must name clean, corrupted, correct, wrong (found: "
                                f"{', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise AnalysisError(f"the CSV could not be read: {exc}") from None
    if not rows:
        raise AnalysisError("the set of pairs holds no rows")
    if len(rows) > MAX_PAIRS:
        raise AnalysisError(f"the set holds {len(rows):,} pairs; at most {MAX_PAIRS} are "
                            f"analysed at once (each pair is a full patching grid): split it")
    pairs = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in need if not isinstance(row.get(c), str)]
        if missing:
            raise AnalysisError(f"pair {i} lacks {', '.join(missing)} (each value must be text)")
        pairs.append(PromptPair(row["clean"], row["corrupted"], row["correct"], row["wrong"]))
    return pairs


def patching_over_pairs(lm: LoadedModel, pairs: list[PromptPair], *,
                        granularity: str = "head_out", metric: str = "logit_diff",
                        direction: str = "denoising", position: int = -1,
                        progress: Optional[ProgressFn] = None) -> PairSetPatching:
    """One granularity's grid on every pair of a set, kept per pair and averaged."""
    _check_choice(granularity, GRANULARITIES, "granularity")
    if not pairs:
        raise AnalysisError("the set of pairs holds no rows")
    if len(pairs) > MAX_PAIRS:
        raise AnalysisError(f"the set holds {len(pairs):,} pairs; at most {MAX_PAIRS} are "
                            f"analysed at once")
    grids = []
    for i, pair in enumerate(pairs, start=1):
        try:
            g = activation_patching(lm, pair.clean, pair.corrupted, correct=pair.correct,
                                    wrong=pair.wrong, granularity=granularity, metric=metric,
                                    direction=direction, position=position)
        except AnalysisError as exc:
            raise AnalysisError(f"pair {i}: {exc}") from None
        if grids and g.values.shape != grids[0].values.shape:
            raise AnalysisError(
                f"pair {i} has {len(g.clean_display)} tokens but pair 1 has "
                f"{len(grids[0].clean_display)}: a grid over positions needs pairs of one "
                f"length (head granularities over all positions accept any lengths)")
        grids.append(g)
        if progress:
            progress(i, len(pairs))
    per = np.stack([g.values for g in grids])
    per_attr = np.stack([g.attribution for g in grids])
    bases = np.array([g.base_metric for g in grids])
    shape = (-1,) + (1,) * (per.ndim - 1)
    return PairSetPatching(
        granularity=granularity, axes=GRID_AXES[granularity], per_pair=per,
        per_pair_attribution=per_attr, mean=per.mean(0), mean_attribution=per_attr.mean(0),
        base_metrics=bases, clean_metrics=np.array([g.clean_metric for g in grids]),
        corrupted_metrics=np.array([g.corrupted_metric for g in grids]),
        correlation=_correlation(per - bases.reshape(shape), per_attr - bases.reshape(shape)),
        grids=tuple(grids))


# ------------------------------------------------------------------- page defaults
#: The default example (found by measuring on attn-only-2l): the second half repeats the
#: first, and the corrupted prompt changes the earlier copy of the last token (" h" of
#: " holiday" becomes " and"), so no earlier token is followed by " h": the induction heads
#: have nothing to copy, and the model says " house" instead of " holiday".
DEFAULT_CLEAN = (" Anna gave Peter a red book about ancient Rome before the winter holiday."
                 " Anna gave Peter a red book about ancient Rome before the winter h")
DEFAULT_CORRUPTED = (" Anna gave Peter a red book about ancient Rome before the winter andoliday."
                     " Anna gave Peter a red book about ancient Rome before the winter h")
DEFAULT_CORRECT, DEFAULT_WRONG = "olid", "ouse"
#: Replacement words tried (in order) when the corrupted prompt is left to the page.
REPLACEMENTS = (" and", " the", " of", " a", " to", " in")


#: The sentence a shorter default is built from, on models the measured example does not fit.
SHORT_SENTENCE = " Anna gave Peter a red book about ancient Rome before the winter holiday."


def default_fits(lm: LoadedModel, limit: Optional[int] = None) -> bool:
    """Whether the measured default example (pair and answers) fits ``lm``: both prompts within
    its context (and ``limit`` tokens), of one length, and each answer a single token."""
    n = min(lm.cfg.n_ctx, limit or lm.cfg.n_ctx)
    try:
        a, b = pair_tokens(lm, DEFAULT_CLEAN, DEFAULT_CORRUPTED)
    except AnalysisError:
        return False
    answers = [lm.tokenizer.encode(w) for w in (DEFAULT_CORRECT, DEFAULT_WRONG)]
    return len(a) <= n and all(len(t) == 1 for t in answers)


def short_default(lm: LoadedModel, limit: Optional[int] = None) -> tuple[str, str]:
    """A (clean, corrupted) pair in ``lm``'s tokenizer that fits its context: the first k
    words of :data:`SHORT_SENTENCE`, then the same words again but the last (so the next word
    is the one an induction head would copy); the corrupted prompt changes the earlier copy of
    the last word, as the measured example does."""
    n = min(lm.cfg.n_ctx, limit or lm.cfg.n_ctx)
    words = SHORT_SENTENCE.split()
    for k in range(len(words), 2, -1):
        first, second = words[:k], words[:k - 1]
        clean = " " + " ".join(first + second)
        ids, dropped = tokenize(lm, clean)
        if dropped or len(ids) > n:
            continue
        for word in REPLACEMENTS:
            changed = list(first)
            changed[k - 2] = word.strip()
            corrupted = " " + " ".join(changed + second)
            if len(tokenize(lm, corrupted)[0]) == len(ids):
                return clean, corrupted
    raise AnalysisError("this model's context is too short for a default example; type a "
                        "clean and a corrupted prompt")


def corrupt_one_token(lm: LoadedModel, clean: str) -> tuple[str, int, int, int]:
    """The clean prompt with one token changed: the earlier copy of the last token (what an
    induction head would attend next to), else the token before the last. Returns the text,
    the position, the old and the new token id."""
    ids, dropped = tokenize(lm, clean)
    if dropped:
        raise AnalysisError(f"the clean prompt has {len(ids) + dropped} tokens, more than the "
                            f"model's context of {lm.cfg.n_ctx}")
    if len(ids) < 2:
        raise AnalysisError("the clean prompt needs at least two tokens to corrupt one")
    earlier = [i for i in range(len(ids) - 1) if ids[i] == ids[-1]]
    spots = ([earlier[-1]] if earlier else []) + [len(ids) - 2]
    for c in spots:
        for word in REPLACEMENTS:
            new = lm.tokenizer.encode(word)
            if len(new) != 1 or new[0] == ids[c]:
                continue
            cand = list(ids)
            cand[c] = new[0]
            text = lm.tokenizer.decode(cand)
            if tokenize(lm, text)[0] == cand:
                return text, c, ids[c], new[0]
    raise AnalysisError("could not change one token of the clean prompt and keep its length; "
                        "type the corrupted prompt")


def pair_predictions(lm: LoadedModel, clean: Prompt, corrupted: Prompt, position: int = -1,
                     k: int = 5) -> tuple[list[int], list[int]]:
    """The top-k next tokens of the clean and of the corrupted prompt at ``position``."""
    a, b = pair_tokens(lm, clean, corrupted)
    pos = _check_position(position, len(a))
    out = []
    for ids in (a, b):
        logits = _run(lm, ids, pos + 1).logits
        out.append([int(i) for i in logits.topk(min(k, lm.cfg.d_vocab)).indices])
    return out[0], out[1]


def default_answers(lm: LoadedModel, clean: Prompt, corrupted: Prompt, position: int = -1
                    ) -> tuple[int, int]:
    """Correct = the clean prompt's top prediction; wrong = the corrupted prompt's top
    prediction (its second when both agree)."""
    top_c, top_r = pair_predictions(lm, clean, corrupted, position, k=2)
    wrong = top_r[0] if top_r[0] != top_c[0] else top_r[1]
    return top_c[0], wrong


def strongest_cells(grid: PatchingGrid, n: int = 5) -> list[tuple[tuple[int, ...], float]]:
    """The ``n`` cells whose patch moves the metric most towards the source run, as
    (index, effect): largest effect for denoising, most negative for noising."""
    effect = grid.effect
    sign = 1.0 if grid.direction == "denoising" else -1.0
    if grid.metric == "kl":
        sign = -sign  # KL to the clean run falls as the clean run is restored
    order = np.argsort(-(sign * effect).ravel(), kind="stable")[:n]
    return [(tuple(int(i) for i in np.unravel_index(k, effect.shape)), float(effect.ravel()[k]))
            for k in order]


#: Models at most this big (layers x heads and d_model) are patched in the page's own
#: callback; bigger ones as a background job with progress.
INLINE_HEADS, INLINE_D_MODEL = 64, 1024


def runs_inline(lm: LoadedModel) -> bool:
    """Whether a patching grid of this model is quick enough to draw without a job."""
    return (lm.cfg.n_layers * lm.cfg.n_heads <= INLINE_HEADS
            and lm.cfg.d_model <= INLINE_D_MODEL)
