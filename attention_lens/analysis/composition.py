"""Q-, K- and V-composition scores between heads in different layers (Elhage et al. 2021).

For a head h1 in layer l1 and h2 in layer l2 > l1, with L = W_OV(h1):

- Q-composition: ‖L W_QK(h2)‖_F / (‖L‖_F ‖W_QK(h2)‖_F)
- K-composition: ‖L W_QK(h2)^T‖_F / (‖L‖_F ‖W_QK(h2)^T‖_F)
- V-composition: ‖L W_OV(h2)‖_F / (‖L‖_F ‖W_OV(h2)‖_F)

Nothing d_model x d_model is formed. With thin QR factors ``W_V = Q_V R_V`` and
``W_K = Q_K R_K`` (orthonormal columns keep Frobenius norms), for example
``‖W_V W_O W_Q W_K^T‖_F = ‖(R_V W_O)(W_Q R_K^T)‖_F``: one [n_heads·d_head, d_model] x
[d_model, n_later_heads·d_head] product per source layer gives every pair at once.
The random baseline is the mean score of Gaussian factors of the same shapes (so the
same ranks), seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .circuits import FactoredMatrix, architecture_notes, head_weights, thin_r
from .errors import AnalysisError

Kind = Literal["Q", "K", "V"]
KINDS: tuple[str, ...] = get_args(Kind)


def composition_score(left: FactoredMatrix, right: FactoredMatrix) -> torch.Tensor:
    """``‖left · right‖_F / (‖left‖_F ‖right‖_F)`` from factors (broadcast over batch dims).

    ``‖A1 B1 A2 B2‖_F^2 = trace(X^T (A1^T A1) X (B2 B2^T))`` with X = B1 A2 (r x r).
    """
    x = left.B @ right.A
    ga = left.A.transpose(-1, -2) @ left.A
    gb = right.B @ right.B.transpose(-1, -2)
    num = ((ga @ x) * (x @ gb)).sum((-1, -2)).clamp_min(0).sqrt()
    return num / (left.frobenius_norm() * right.frobenius_norm())


@dataclass(frozen=True)
class Composition:
    """Composition scores of every (earlier head, later head) pair, with random baselines.

    Attributes:
        q: [n_layers, n_heads, n_layers, n_heads] Q-composition score of (l1, h1) -> (l2, h2);
            NaN where l2 <= l1 (no composition possible).
        k: same shape, K-composition.
        v: same shape, V-composition.
        baseline: kind ("Q", "K", "V") -> mean score of random factors of the same shapes
            (one set of random heads serves all three: the distributions are equal).
        baseline_std: kind -> standard deviation of those random scores.
        n_samples: random samples behind each baseline.
        seed: seed of the baseline.
        notes: what the scores leave out for this model's architecture (rotary positions
            for Q/K, shared key/value heads).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    baseline: dict[str, float]
    baseline_std: dict[str, float]
    n_samples: int
    seed: int
    notes: tuple[str, ...] = ()

    def scores(self, kind: str) -> np.ndarray:
        """The [n_layers, n_heads, n_layers, n_heads] array of ``kind`` ("Q", "K" or "V")."""
        if kind not in KINDS:
            raise AnalysisError(f"unknown composition {kind!r}; choose one of {', '.join(KINDS)}")
        return {"Q": self.q, "K": self.k, "V": self.v}[kind]

    def top_pairs(self, kind: str, n: int = 10) -> list[dict]:
        """The ``n`` strongest pairs as dicts (layer/head of both heads, score, / baseline)."""
        s = self.scores(kind)
        flat = np.where(np.isnan(s), -np.inf, s).ravel()
        order = np.argsort(-flat, kind="stable")[: max(0, n)]
        out = []
        for i in order:
            if not np.isfinite(flat[i]):
                break
            l1, h1, l2, h2 = np.unravel_index(i, s.shape)
            out.append({"source_layer": int(l1), "source_head": int(h1),
                        "target_layer": int(l2), "target_head": int(h2),
                        "score": float(flat[i]),
                        "ratio_to_baseline": float(flat[i] / self.baseline[kind])})
        return out


def random_baseline(d_model: int, d_head: int, n_samples: int = 32, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Mean and std of the composition score between random heads of the given shape.

    W_OV, W_QK and W_QK^T of a random head are all products of two Gaussian
    [d_model, d_head] x [d_head, d_model] factors, so Q-, K- and V-composition share
    one baseline.
    """
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal((n_samples, *shape))).to(dtype)

    left = FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))
    right = FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))
    s = composition_score(left, right)
    return float(s.mean()), float(s.std()) if n_samples > 1 else 0.0


def composition_scores(lm: LoadedModel, n_samples: int = 32, seed: int = 0,
                       dtype: str = "float32",
                       progress: Optional[Callable[[float], None]] = None) -> Composition:
    """Q-, K- and V-composition scores of every pair of heads in different layers.

    ``progress(fraction)`` is called after each source layer of each kind.
    """
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in dtypes:
        raise AnalysisError("composition is computed in float32 or float64 only")
    if not isinstance(n_samples, int) or not 1 <= n_samples <= 10_000:
        raise AnalysisError("n_samples must be between 1 and 10000")
    td = dtypes[dtype]
    # QR in float64 (small matrices); the large products in ``dtype``
    w = head_weights(lm, torch.float64, ("W_Q", "W_K", "W_V", "W_O"))
    W_Q, W_K, W_V, W_O = w["W_Q"], w["W_K"], w["W_V"], w["W_O"]
    L, H, d, e = W_Q.shape
    with torch.no_grad():
        r_q, r_k, r_v = thin_r(W_Q), thin_r(W_K), thin_r(W_V)
        r_o = thin_r(W_O.transpose(-1, -2))
        src = (r_v @ W_O).to(td)  # [L, H, e, d]: ‖W_V W_O Y‖ = ‖R_V W_O Y‖
        src_norm = src.flatten(-2).norm(dim=-1)  # ‖W_OV(h1)‖_F
        qk_norm = (r_q @ r_k.transpose(-1, -2)).flatten(-2).norm(dim=-1).to(td)
        targets = {
            "Q": ((W_Q @ r_k.transpose(-1, -2)).to(td), qk_norm),
            "K": ((W_K @ r_q.transpose(-1, -2)).to(td), qk_norm),
            "V": ((W_V @ r_o.transpose(-1, -2)).to(td), src_norm),
        }
        out = {}
        steps, done = 3 * max(1, L - 1), 0
        for kind, (tgt, tgt_norm) in targets.items():
            scores = torch.full((L, H, L, H), float("nan"), dtype=torch.float64)
            for l1 in range(L - 1):
                a = src[l1].reshape(H * e, d)
                n_later = L - l1 - 1
                b = tgt[l1 + 1:].permute(2, 0, 1, 3).reshape(d, n_later * H * e)
                y = (a @ b).reshape(H, e, n_later, H, e)
                num = y.pow(2).sum((1, 4)).sqrt()  # [H, n_later, H]
                den = src_norm[l1][:, None, None] * tgt_norm[l1 + 1:][None]
                scores[l1, :, l1 + 1:] = (num / den).double()
                done += 1
                if progress is not None:
                    progress(done / steps)
            out[kind] = scores.numpy()
    mean, std = random_baseline(d, e, n_samples, seed)
    return Composition(q=out["Q"], k=out["K"], v=out["V"], baseline={k: mean for k in KINDS},
                       baseline_std={k: std for k in KINDS},
                       n_samples=n_samples, seed=seed, notes=architecture_notes(lm, "all"))
