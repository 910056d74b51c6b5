"""Head ablation: rerun the prompt with chosen heads' outputs removed and compare predictions.

Zero-ablation sets a head's ``hook_z`` to 0 (its output ``z W_O`` vanishes; the layer's
``b_O`` stays). Mean-ablation replaces a head's ``z`` at every position by its mean over the
positions of the prompt in the original (unablated) forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .checks import check_head, check_k, check_layer, check_position
from .declare import (
    Choice,
    Heads,
    Int,
    Position,
    Positions,
    Token,
    declare,
    fields_of,
    forward_gflop,
)
from .errors import AnalysisError
from .forward import ForwardPass
from .logit_lens import chunk_rows
from .predictions import TokenLike, token_id

AblationMethod = Literal["zero", "mean"]
METHODS: tuple[str, ...] = ("zero", "mean")


@dataclass(frozen=True)
class Ablation:
    """Predictions before and after ablating a set of heads.

    Attributes:
        heads: the ablated (layer, head) pairs, sorted.
        method: "zero" or "mean".
        position: the position whose next-token prediction is compared.
        context: display string of the token at ``position``.
        display: [pos] display strings of the prompt tokens.
        before_ids: [k] top-k token ids before ablation.
        before_display: [k] their display strings.
        before_probs: [k] their probabilities before ablation.
        after_ids: [k] top-k token ids after ablation.
        after_display: [k] their display strings.
        after_probs: [k] their probabilities after ablation.
        union_ids: [m] ids in either top-k (before's order, then after's new ones).
        union_display: [m] their display strings.
        union_before: [m] probability of each before ablation.
        union_after: [m] probability of each after ablation.
        target_id: the token whose logit and probability are tracked.
        target_display: its display string.
        target_logit_before: its logit before ablation.
        target_logit_after: its logit after ablation.
        target_prob_before: its probability before ablation.
        target_prob_after: its probability after ablation.
        loss_before: mean next-token loss of the prompt before (nats; NaN for one token).
        loss_after: the same after ablation.
        kl: KL(before || after) of the next-token distributions at ``position`` (nats).
        kl_per_position: [pos] KL(before || after) at every position (nats).
        surprisal_before: [pos] -ln p(actual next token) before (NaN at the last position).
        surprisal_after: [pos] the same after ablation.
        part: positions whose next-token loss is also reported on its own (e.g. the
            repeated part of the prompt); empty when none was asked for.
        part_loss_before: mean next-token loss over ``part`` before (nats; NaN if empty).
        part_loss_after: the same after ablation.
    """

    heads: tuple[tuple[int, int], ...]
    method: str
    position: int
    context: str
    display: tuple[str, ...]
    before_ids: np.ndarray
    before_display: tuple[str, ...]
    before_probs: np.ndarray
    after_ids: np.ndarray
    after_display: tuple[str, ...]
    after_probs: np.ndarray
    union_ids: np.ndarray
    union_display: tuple[str, ...]
    union_before: np.ndarray
    union_after: np.ndarray
    target_id: int
    target_display: str
    target_logit_before: float
    target_logit_after: float
    target_prob_before: float
    target_prob_after: float
    loss_before: float
    loss_after: float
    kl: float
    kl_per_position: np.ndarray
    surprisal_before: np.ndarray
    surprisal_after: np.ndarray
    part: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    part_loss_before: float = float("nan")
    part_loss_after: float = float("nan")

    def __post_init__(self) -> None:  # noqa: D105
        assert self.before_ids.shape == self.before_probs.shape == self.after_probs.shape
        assert self.union_ids.shape == self.union_before.shape == self.union_after.shape
        assert self.kl_per_position.shape == self.surprisal_before.shape == (len(self.display),)

    @property
    def target_logit_change(self) -> float:
        """Logit after minus before."""
        return self.target_logit_after - self.target_logit_before

    @property
    def target_prob_change(self) -> float:
        """Probability after minus before."""
        return self.target_prob_after - self.target_prob_before

    @property
    def loss_change(self) -> float:
        """Loss after minus before (positive: the heads helped predict the prompt)."""
        return self.loss_after - self.loss_before

    @property
    def part_loss_change(self) -> float:
        """Loss over :attr:`part` after minus before."""
        return self.part_loss_after - self.part_loss_before


@dataclass(frozen=True)
class HeadSweep:
    """The change in loss when each head alone is ablated.

    Attributes:
        method: "zero" or "mean".
        positions: the positions whose next-token loss is averaged.
        loss_before: the mean loss over ``positions`` with no head ablated (nats).
        loss_after: [n_layers, n_heads] the same with that one head ablated.
    """

    method: str
    positions: np.ndarray
    loss_before: float
    loss_after: np.ndarray

    @property
    def loss_change(self) -> np.ndarray:
        """[n_layers, n_heads] loss after minus before (positive: the head helped)."""
        return self.loss_after - self.loss_before


def check_heads(lm: LoadedModel, heads: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Validate and sort a set of (layer, head) pairs; at least one is required."""
    try:
        pairs = [tuple(pair) for pair in heads]
    except TypeError:
        raise AnalysisError("heads must be a list of (layer, head) pairs") from None
    if any(len(pair) != 2 for pair in pairs):
        raise AnalysisError("heads must be a list of (layer, head) pairs")
    if not pairs:
        raise AnalysisError("choose at least one head to ablate")
    return tuple(sorted({(check_layer(lm, lay), check_head(lm, h)) for lay, h in pairs}))


def _z_means(fp: ForwardPass, layer: int) -> torch.Tensor:
    """[n_heads, d_head] each head's z averaged over the prompt's positions."""
    return fp.cache[f"blocks.{layer}.attn.hook_z"].mean(0)


def ablated_logits(lm: LoadedModel, fp: ForwardPass, heads: Iterable[tuple[int, int]],
                   method: AblationMethod = "zero") -> torch.Tensor:
    """Logits [pos, d_vocab] of the prompt rerun with ``heads`` zero- or mean-ablated."""
    if method not in METHODS:
        raise AnalysisError(f"ablation method must be one of {METHODS}, got {method!r}")
    pairs = check_heads(lm, heads)
    by_layer: dict[int, list[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    model = lm.model

    def hook_for(layer: int, hs: list[int]):
        mean = fp.cache[f"blocks.{layer}.attn.hook_z"][:, hs].mean(0)  # [len(hs), e]

        def fn(z: torch.Tensor, hook) -> torch.Tensor:  # z [b, p, h, e]
            z = z.clone()
            z[:, :, hs] = 0.0 if method == "zero" else mean.to(z)
            return z
        return fn

    hooks = [(f"blocks.{layer}.attn.hook_z", hook_for(layer, hs)) for layer, hs in by_layer.items()]
    tokens = torch.as_tensor(fp.token_ids, dtype=torch.long, device=model.device)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return logits[0].float().cpu()


def check_positions(fp: ForwardPass, positions: Optional[Iterable[int]]) -> np.ndarray:
    """Sorted distinct positions with a next token (0 <= p < n - 1); all of them if None."""
    n = fp.n_tokens
    if positions is None:
        return np.arange(max(n - 1, 0), dtype=np.int64)
    out = sorted({int(p) for p in positions})
    if any(not 0 <= p < n - 1 for p in out):
        raise AnalysisError(f"loss positions must be between 0 and {n - 2} (each needs a "
                            "next token)")
    return np.asarray(out, dtype=np.int64)


#: Rows (heads × positions) recomputed at once by the sweep: GPT-2 small at 256 tokens runs
#: a layer's 12 heads in one batch (its attention scores and MLP activations near 300 MB;
#: smaller batches run markedly slower per head on two cores).
SWEEP_ROWS = 3072
#: Logits of the sweep held at once: rows × d_vocab stays under this many numbers (16 MiB
#: of float32, 32 MiB as float64 for the log-sum-exp).
LOSS_CHUNK_ELEMENTS = 2 ** 22
def _token_losses(lm: LoadedModel, final: torch.Tensor, targets: torch.Tensor,
                  normalise: bool = True) -> torch.Tensor:
    """``-ln p(target)`` [r] (float64) of rows [r, d] of the final residual stream (or of
    logits [r, d_vocab] when not ``normalise``), the logits computed a chunk of rows at a
    time, so no [rows, vocabulary] tensor larger than a chunk is held."""
    model = lm.model
    rows = chunk_rows(lm.cfg.d_vocab, LOSS_CHUNK_ELEMENTS)
    out = torch.empty(final.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, final.shape[0], rows):
            x = final[start:start + rows]
            if normalise:
                if lm.cfg.normalization_type:
                    x = model.ln_final(x)
                x = model.unembed(x)
            logits = x.float().cpu().double()
            t = targets[start:start + rows, None]
            out[start:start + rows] = logits.logsumexp(-1) - logits.gather(-1, t)[:, 0]
            del logits, x
    return out


def head_sweep(lm: LoadedModel, fp: ForwardPass, method: AblationMethod = "zero",
               positions: Optional[Iterable[int]] = None,
               progress: Optional[Callable[[float], None]] = None) -> HeadSweep:
    """Loss over ``positions`` with each head ablated alone.

    Equals :func:`ablated_logits` with that one head, computed with less work: ablating a
    head of layer ``l`` changes nothing before layer ``l`` and nothing at positions after
    the last one the loss reads, so each batch of heads of one layer starts from the cached
    residual stream before layer ``l``, runs layers ``l``.. on rows ``0..max(positions)``
    only, and computes logits only at ``positions``, a chunk of rows at a time (each
    chunk reduced to its losses before the next). ``progress(fraction)`` is called after
    each batch (it may raise to stop the computation).
    """
    if method not in METHODS:
        raise AnalysisError(f"ablation method must be one of {METHODS}, got {method!r}")
    pos = check_positions(fp, positions)
    cfg, model = lm.cfg, lm.model
    L, H = cfg.n_layers, cfg.n_heads
    after = np.full((L, H), np.nan)
    if not pos.size:
        return HeadSweep(method=method, positions=pos, loss_before=float("nan"),
                         loss_after=after)
    targets = torch.as_tensor(np.asarray(fp.token_ids)[pos + 1], dtype=torch.long)
    idx = torch.as_tensor(pos, dtype=torch.long)
    before = float(_token_losses(lm, fp.logits[idx], targets, normalise=False).mean())
    m = int(pos[-1]) + 1  # rows after the last loss position never matter (causal)
    per_batch = max(1, SWEEP_ROWS // m)
    n_batches = -(-H // per_batch)
    size = -(-H // n_batches)  # the layer's heads split evenly over its batches
    batches = [(la, list(range(h0, min(H, h0 + size))))
               for la in range(L) for h0 in range(0, H, size)]
    # work of a batch: its heads × (layers it recomputes + the unembedding)
    unembed = len(pos) * cfg.d_vocab
    layer = m * (4 * cfg.d_model + (0 if cfg.attn_only else 2 * (cfg.d_mlp or 0)) + 2 * m)
    work = [len(hs) * ((L - la) * layer + unembed) for la, hs in batches]
    total, done = float(sum(work)), 0.0
    dtype = model.W_U.dtype
    with torch.no_grad():
        for (la, hs), w in zip(batches, work):
            b = len(hs)
            rows = torch.arange(b)
            heads = torch.as_tensor(hs, dtype=torch.long)
            mean = _z_means(fp, la)

            def ablate(z: torch.Tensor, hook) -> torch.Tensor:  # z [b, p, h, e]
                z = z.clone()
                z[rows, :, heads] = 0.0 if method == "zero" else mean[heads][:, None].to(z)
                return z

            hook_z = model.blocks[la].attn.hook_z
            x = fp.cache[f"blocks.{la}.hook_resid_pre"][:m]
            x = x.to(model.device, dtype)[None].expand(b, m, -1)
            try:
                hook_z.add_hook(ablate)
                x = model.blocks[la](x)
            finally:
                hook_z.remove_hooks()
            for block in model.blocks[la + 1:]:
                x = block(x)
            final = x[:, idx].reshape(b * len(pos), -1)
            del x
            losses = _token_losses(lm, final, targets.repeat(b)).reshape(b, len(pos))
            after[la, hs] = losses.mean(1).numpy()
            done += w
            if progress is not None:
                progress(done / total)
    return HeadSweep(method=method, positions=pos, loss_before=before, loss_after=after)


def ablate_heads(lm: LoadedModel, fp: ForwardPass, *, heads: Iterable[tuple[int, int]],
                 method: AblationMethod = "zero", k: int = 10, position: int = -1,
                 target: Optional[TokenLike] = None,
                 part: Optional[Iterable[int]] = None) -> Ablation:
    """Compare predictions, a token's logit and probability, loss and KL before/after ablation.

    Without ``target`` the model's top prediction before ablation is tracked; ``part``
    names positions whose next-token loss is also reported on its own. The distributions
    of every position (for the loss and the KL) are computed a chunk of rows at a time.
    """
    k = check_k(lm, k)
    pos = check_position(fp, position)
    tid = int(fp.logits[pos].argmax()) if target is None else token_id(lm, target)
    pairs = check_heads(lm, heads)
    before = fp.logits
    after = ablated_logits(lm, fp, pairs, method)
    n = fp.n_tokens
    kl_all = torch.empty(n, dtype=torch.float64)
    s_b, s_a = np.full(n, np.nan), np.full(n, np.nan)
    nxt = torch.as_tensor(np.append(np.asarray(fp.token_ids)[1:], 0), dtype=torch.long)
    rows = chunk_rows(lm.cfg.d_vocab, LOSS_CHUNK_ELEMENTS)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            lp_b = before[start:stop].double().log_softmax(-1)
            lp_a = after[start:stop].double().log_softmax(-1)
            kl_all[start:stop] = (lp_b.exp() * (lp_b - lp_a)).sum(-1).clamp_min(0.0)
            t = nxt[start:stop, None]
            s_b[start:stop] = (-lp_b.gather(-1, t)[:, 0]).numpy()
            s_a[start:stop] = (-lp_a.gather(-1, t)[:, 0]).numpy()
            del lp_b, lp_a
    s_b[-1] = s_a[-1] = np.nan  # the last position has no next token
    top_b = torch.topk(before[pos], k).indices.numpy()
    top_a = torch.topk(after[pos], k).indices.numpy()
    union = list(top_b) + [i for i in top_a if i not in set(top_b.tolist())]
    union_ids = np.asarray(union, dtype=np.int64)
    probs_b = before[pos].double().softmax(-1).numpy()
    probs_a = after[pos].double().softmax(-1).numpy()
    nan = float("nan")
    part_pos = check_positions(fp, part) if part is not None else np.zeros(0, dtype=np.int64)
    disp = lm.tokenizer.display
    return Ablation(
        heads=pairs, method=method, position=pos, context=fp.display[pos], display=fp.display,
        before_ids=top_b.astype(np.int64), before_display=tuple(disp(int(i)) for i in top_b),
        before_probs=probs_b[top_b],
        after_ids=top_a.astype(np.int64), after_display=tuple(disp(int(i)) for i in top_a),
        after_probs=probs_a[top_a],
        union_ids=union_ids, union_display=tuple(disp(int(i)) for i in union_ids),
        union_before=probs_b[union_ids], union_after=probs_a[union_ids],
        target_id=tid, target_display=disp(tid),
        target_logit_before=float(before[pos, tid]), target_logit_after=float(after[pos, tid]),
        target_prob_before=float(probs_b[tid]), target_prob_after=float(probs_a[tid]),
        loss_before=float(np.nanmean(s_b)) if fp.n_tokens > 1 else nan,
        loss_after=float(np.nanmean(s_a)) if fp.n_tokens > 1 else nan,
        kl=float(kl_all[pos]), kl_per_position=kl_all.numpy(),
        surprisal_before=s_b, surprisal_after=s_a, part=part_pos,
        part_loss_before=float(s_b[part_pos].mean()) if part_pos.size else nan,
        part_loss_after=float(s_a[part_pos].mean()) if part_pos.size else nan,
    )


# ------------------------------------------------------------------ the declarations
def sweep_gflop(cfg: Any, n_tokens: int, positions: Optional[Iterable[int]] = None) -> float:
    """Floating-point work (GFLOP) of :func:`head_sweep`: each head of layer l reruns layers
    l.. on the rows up to the last loss position, then the unembedding at the loss
    positions (a deep model with MLPs spends its time in the first, a big vocabulary in
    the second)."""
    L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    pos = sorted({int(p) % max(1, n_tokens) for p in positions}) if positions is not None \
        else list(range(max(n_tokens - 1, 0)))
    if not pos:
        return 0.0
    m = pos[-1] + 1
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * (cfg.d_mlp or 0)
    layer = 2 * m * d * (4 * d + mlp) + 4 * m * m * d  # one layer on m rows
    runs = H * (L * (L + 1) // 2)  # heads × the layers each reruns
    return (runs * layer + 2 * L * H * len(pos) * d * cfg.d_vocab) / 1e9


def _sweep_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    return sweep_gflop(cfg, n_tokens, values.get("positions")) / forward_gflop(cfg, n_tokens)


def _ablation_json(res: Ablation) -> dict:
    extra = {"target_logit_change": res.target_logit_change,
             "target_prob_change": res.target_prob_change, "loss_change": res.loss_change}
    return {"result": {**fields_of(res), **extra}}


#: Zero- or mean-ablation of chosen heads: one rerun of the prompt.
ABLATION = declare(
    "ablation", ablate_heads,
    params=[Heads("heads", what=" to ablate"),
            Choice("method", "zero", METHODS, label="ablation",
                   labels={"zero": "zero", "mean": "mean over positions"}),
            Int("top_k", 10, 1, lambda cfg: min(50, cfg.d_vocab), url="k", arg="k",
                label="top k"),
            Position("position", url="pos", auto=True, label="position",
                     placeholder="auto (-1 = last)"),
            Token("target", label="target token", placeholder="the actual next token"),
            Positions("part")],
    cost=lambda cfg, n_tokens, values: 1.0, to_json=_ablation_json)

#: Every head ablated alone: the loss over some positions (all with a next token: None).
HEAD_SWEEP = declare(
    "head-sweep", head_sweep,
    params=[Choice("method", "zero", METHODS, label="ablation",
                   labels={"zero": "zero", "mean": "mean over positions"}),
            Positions("positions")],
    cost=_sweep_cost, label="{method}-ablation of each head",
    to_json=lambda res: {"result": {**fields_of(res), "loss_change": res.loss_change}})
