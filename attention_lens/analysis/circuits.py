"""OV and QK circuits of every head, kept factored (Elhage et al. 2021).

A head's OV circuit ``W_OV = W_V W_O`` and QK circuit ``W_QK = W_Q W_K^T`` are
[d_model, d_model] matrices of rank at most d_head. They are never formed: a
:class:`FactoredMatrix` keeps the two thin factors, its SVD comes from QR of the
factors and a d_head x d_head SVD, and its non-zero eigenvalues from the small
product ``B A`` (the non-zero eigenvalues of AB equal those of BA).

LayerNorm weights (``ln1.w`` before a head, ``ln_final.w`` before the unembedding) are
folded into the factors, as TransformerLens' ``fold_ln`` does; the centring and the
scale of LayerNorm are not linear maps and are left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .declare import Choice, Head, Int, Layer, ModelInt, answers_get, declare
from .errors import AnalysisError

Circuit = Literal["OV", "QK"]
CIRCUITS: tuple[str, ...] = get_args(Circuit)


def _cholesky_r(m: torch.Tensor) -> Optional[torch.Tensor]:
    """R = L^T from the Cholesky factor of m^T m, or None when that is not safe.

    Cholesky QR squares the condition number, so it is used only in float64 and only when
    the Gram matrix is well conditioned (diagonal of L within 1e4 of its largest entry).
    """
    if m.dtype != torch.float64:
        return None
    low, info = torch.linalg.cholesky_ex(m.transpose(-1, -2) @ m)
    if bool((info != 0).any()):
        return None
    diag = low.diagonal(dim1=-2, dim2=-1)
    if not bool((diag.amin(-1) > diag.amax(-1) * 1e-4).all()):
        return None
    return low.transpose(-1, -2)


def thin_r(m: torch.Tensor) -> torch.Tensor:
    """Upper-triangular R [.., e, e] with ``R^T R = m^T m`` for a tall m [.., d, e].

    Any such R keeps Frobenius norms: ``‖Y m^T‖_F = ‖Y R^T‖_F``. Cholesky of the small
    Gram matrix when safe (fast for a batch of heads), Householder QR otherwise.
    """
    r = _cholesky_r(m)
    return torch.linalg.qr(m, mode="r")[1] if r is None else r


def small_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a batch of small square matrices, through numpy's LAPACK.

    torch's batched CPU SVD with vectors can be ~50x slower when several threads compete.
    """
    u, s, vh = np.linalg.svd(m.detach().cpu().numpy())
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


def thin_qr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall m [.., d, e] (Cholesky QR when safe, Householder otherwise)."""
    r = _cholesky_r(m)
    if r is None:
        return torch.linalg.qr(m)
    return torch.linalg.solve_triangular(r, m, upper=True, left=False), r


@dataclass(frozen=True)
class FactoredMatrix:
    """A (batch of) matrix ``A @ B`` stored as its factors A [..., m, r] and B [..., r, n]."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:  # noqa: D105
        if self.A.shape[-1] != self.B.shape[-2]:
            raise ValueError(f"factor shapes {tuple(self.A.shape)} and {tuple(self.B.shape)} "
                             "do not chain")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the product [..., m, n]."""
        batch = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return (*batch, self.A.shape[-2], self.B.shape[-1])

    @property
    def T(self) -> "FactoredMatrix":  # noqa: N802
        """The transpose ``B^T A^T``, still factored."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def dense(self) -> torch.Tensor:
        """The full product (only for checks on small matrices)."""
        return self.A @ self.B

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD ``U [.., m, k], S [.., k], Vh [.., k, n]`` (k = min(m, r, n)) via QR.

        ``A B = Qa (Ra Rb^T) Qb^T``: only the small core ``Ra Rb^T`` [.., r, r] is
        decomposed; with Cholesky QR, ``Qa u = A (Ra^-1 u)`` needs only small solves.
        """
        a, bt = self.A, self.B.transpose(-1, -2)
        ra, rb = _cholesky_r(a), _cholesky_r(bt)
        if ra is not None and rb is not None:
            u, s, vh = small_svd(ra @ rb.transpose(-1, -2))
            left = a @ torch.linalg.solve_triangular(ra, u, upper=True)
            right = bt @ torch.linalg.solve_triangular(rb, vh.transpose(-1, -2), upper=True)
            return left, s, right.transpose(-1, -2)
        qa, ra = torch.linalg.qr(a)
        qb, rb = torch.linalg.qr(bt)
        u, s, vh = small_svd(ra @ rb.transpose(-1, -2))
        return qa @ u, s, vh @ qb.transpose(-1, -2)

    def singular_values(self) -> torch.Tensor:
        """Singular values [.., k], descending."""
        core = thin_r(self.A) @ thin_r(self.B.transpose(-1, -2)).transpose(-1, -2)
        return torch.from_numpy(np.linalg.svd(core.numpy(), compute_uv=False))

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``B A`` [.., r] (complex): the non-zero eigenvalues of the square AB."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise ValueError("eigenvalues need a square product")
        return torch.linalg.eigvals(self.B @ self.A)

    def frobenius_norm(self) -> torch.Tensor:
        """``||A B||_F`` via ``trace((A^T A)(B B^T))`` [..]."""
        ga = self.A.transpose(-1, -2) @ self.A
        gb = self.B @ self.B.transpose(-1, -2)
        return (ga * gb).sum((-1, -2)).clamp_min(0).sqrt()

    def __matmul__(self, other: "FactoredMatrix | torch.Tensor") -> "FactoredMatrix":
        """Product with another factored matrix or a dense one, kept thin."""
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> "FactoredMatrix":
        """Dense matrix times this one (``other @ A`` stays thin)."""
        return FactoredMatrix(other @ self.A, self.B)


# ------------------------------------------------------------------------- weights
ALL_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U")


def head_weights(lm: LoadedModel, dtype: torch.dtype = torch.float64,
                 keys: tuple[str, ...] = ALL_WEIGHTS) -> dict[str, torch.Tensor]:
    """Per-head weights with LayerNorm weights folded in, stacked [n_layers, n_heads, ...].

    Keys: ``W_Q, W_K, W_V`` [L, H, d_model, d_head], ``W_O`` [L, H, d_head, d_model],
    ``W_E`` [d_vocab, d_model], ``W_U`` [d_model, d_vocab]; only ``keys`` are converted
    (the vocabulary-sized ones are large).
    """
    if dtype not in (torch.float32, torch.float64):
        raise AnalysisError("circuits are computed in float32 or float64 only")
    m = lm.model
    with torch.no_grad():
        w = {k: getattr(m, k).detach().to("cpu", dtype) for k in keys}
        if m.cfg.normalization_type:
            ln1 = torch.stack([b.ln1.w.detach() for b in m.blocks]).to("cpu", dtype)  # [L, d]
            for k in ("W_Q", "W_K", "W_V"):
                if k in w:
                    w[k] = w[k] * ln1[:, None, :, None]
            if "W_U" in w:
                w["W_U"] = w["W_U"] * m.ln_final.w.detach().to("cpu", dtype)[:, None]
    return w


def ov_circuit(lm: LoadedModel, dtype: torch.dtype = torch.float64) -> FactoredMatrix:
    """Every head's OV circuit ``W_V W_O``, factored: [n_layers, n_heads, d_model, d_model]."""
    w = head_weights(lm, dtype, ("W_V", "W_O"))
    return FactoredMatrix(w["W_V"], w["W_O"])


def qk_circuit(lm: LoadedModel, dtype: torch.dtype = torch.float64) -> FactoredMatrix:
    """Every head's QK circuit ``W_Q W_K^T``, factored: [n_layers, n_heads, d_model, d_model]."""
    w = head_weights(lm, dtype, ("W_Q", "W_K"))
    return FactoredMatrix(w["W_Q"], w["W_K"].transpose(-1, -2))


def circuit(lm: LoadedModel, which: str, dtype: torch.dtype = torch.float64) -> FactoredMatrix:
    """The OV or QK circuit of every head."""
    if which not in CIRCUITS:
        raise AnalysisError(f"unknown circuit {which!r}; choose one of {', '.join(CIRCUITS)}")
    return ov_circuit(lm, dtype) if which == "OV" else qk_circuit(lm, dtype)


# -------------------------------------------------------------------- architecture
def rotary_note(lm: LoadedModel) -> Optional[str]:
    """Why a QK circuit of a rotary model holds at relative distance 0 only (None otherwise)."""
    cfg = lm.cfg
    if cfg.has_absolute_positions:
        return None
    r = cfg.rotary_dim or cfg.d_head
    part = (f"the first {r} of {cfg.d_head} query/key dimensions" if r < cfg.d_head
            else f"all {cfg.d_head} query/key dimensions")
    rest = (f" (the other {cfg.d_head - r} dimensions carry no position)"
            if r < cfg.d_head else "")
    return (f"Rotary positions: this model rotates {part} by each token's position, so a "
            "query at i meets a key at j through W_Q R(j - i) W_K^T. W_QK = W_Q W_K^T is that "
            f"circuit at relative distance 0 only{rest}: QK spectra, QK eigenvalues and Q/K-"
            "composition ignore the relative-position rotation, and there is no W_pos to "
            "add.")


def gqa_note(lm: LoadedModel) -> Optional[str]:
    """How grouped-query attention ties heads together (None without it)."""
    kv = int(lm.cfg.extra.get("n_key_value_heads", lm.cfg.n_heads))
    if kv >= lm.cfg.n_heads:
        return None
    return (f"Grouped-query attention: {kv} key/value heads serve {lm.cfg.n_heads} query heads "
            f"({lm.cfg.n_heads // kv} per group; heads h and h' share one when h // "
            f"{lm.cfg.n_heads // kv} = h' // {lm.cfg.n_heads // kv}). Heads of a group share "
            "W_K and W_V, so their OV circuits differ only through W_O and their QK circuits "
            "only through W_Q.")


def architecture_notes(lm: LoadedModel, topic: str = "OV") -> tuple[str, ...]:
    """Readable caveats for circuits of ``topic`` ("OV", "QK" or "all") on this model."""
    notes = []
    if topic in ("QK", "all"):
        notes.append(rotary_note(lm))
    notes.append(gqa_note(lm))
    return tuple(n for n in notes if n)


# ------------------------------------------------------------------------------ SVD
@dataclass(frozen=True)
class CircuitSVD:
    """Singular values of every head's OV or QK circuit and the tokens its directions read.

    For direction i of a head, ``W = Σ s_i u_i v_i^T``: a residual vector x is read along
    u_i (input side) and writes ``s_i (x·u_i) v_i`` (output side). The sign of each pair is
    fixed so that the output side's largest-magnitude token score is positive, so tokens
    with a high input score push the listed output tokens up.

    Attributes:
        circuit: "OV" or "QK".
        singular_values: [n_layers, n_heads, d_head] float64, descending per head.
        frobenius: [n_layers, n_heads] ``||W||_F`` (= sqrt of the sum of squared values).
        input_space: what the input-side tokens are ("W_E rows · u (source token)").
        output_space: what the output-side tokens are ("v · W_U (logits)" for OV,
            "W_E rows · v (key token)" for QK).
        input_ids: [n_layers, n_heads, n_directions, top_k] token ids with the largest
            ``W_E @ u_i``.
        input_scores: [n_layers, n_heads, n_directions, top_k] those projections.
        output_ids: [n_layers, n_heads, n_directions, top_k] token ids with the largest
            ``v_i @ W_U`` (OV) or ``W_E @ v_i`` (QK).
        output_scores: [n_layers, n_heads, n_directions, top_k] those projections.
        input_tokens: nested list [layer][head][direction][k] of display strings.
        output_tokens: nested list [layer][head][direction][k] of display strings.
        notes: what the numbers leave out for this model's architecture (rotary positions,
            shared key/value heads), from :func:`architecture_notes`; empty when nothing.
    """

    circuit: str
    singular_values: np.ndarray
    frobenius: np.ndarray
    input_space: str
    output_space: str
    input_ids: np.ndarray
    input_scores: np.ndarray
    output_ids: np.ndarray
    output_scores: np.ndarray
    input_tokens: list
    output_tokens: list
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # noqa: D105
        lh = self.singular_values.shape[:2]
        assert self.frobenius.shape == lh
        assert self.input_ids.shape == self.output_ids.shape == self.input_scores.shape
        assert self.input_ids.shape[:2] == lh

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return int(self.singular_values.shape[0])

    @property
    def n_heads(self) -> int:
        """Heads per layer."""
        return int(self.singular_values.shape[1])

    def top(self, n_directions: int, top_k: int) -> "CircuitSVD":
        """The same SVD with only the first ``n_directions`` directions and ``top_k`` tokens.

        Raises AnalysisError when more directions are asked for than were computed; ``top_k``
        is capped at the tokens computed.
        """
        have = self.input_ids.shape[2]
        if n_directions > have:
            raise AnalysisError(f"at most {have} directions (d_head is "
                                f"{self.singular_values.shape[2]})")
        k = min(top_k, self.input_ids.shape[3])

        def cut(a: np.ndarray) -> np.ndarray:
            return a[:, :, :n_directions, :k]

        def cut_nested(t: list) -> list:
            return [[[d[:k] for d in h[:n_directions]] for h in layer] for layer in t]

        return dataclasses.replace(
            self, input_ids=cut(self.input_ids), input_scores=cut(self.input_scores),
            output_ids=cut(self.output_ids), output_scores=cut(self.output_scores),
            input_tokens=cut_nested(self.input_tokens),
            output_tokens=cut_nested(self.output_tokens))

    def strongest_head(self) -> tuple[int, int]:
        """(layer, head) with the largest first singular value."""
        flat = int(np.argmax(self.singular_values[..., 0]))
        return divmod(flat, self.n_heads)


def _nested_display(lm: LoadedModel, ids: np.ndarray) -> list:
    return np.vectorize(lm.tokenizer.display, otypes=[object])(ids).tolist() if ids.size else \
        ids.tolist()


def _top_tokens(proj: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, idx = proj.topk(k, dim=-1)
    return idx.cpu().numpy().astype(np.int64), values.cpu().numpy().astype(np.float64)


def _check_top(lm: LoadedModel, top_k: int, n_directions: int) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= lm.cfg.d_vocab:
        raise AnalysisError(f"top_k must be between 1 and the vocabulary size {lm.cfg.d_vocab}")
    if not isinstance(n_directions, int) or not 0 <= n_directions <= lm.cfg.d_head:
        raise AnalysisError(f"n_directions must be between 0 and d_head = {lm.cfg.d_head}")


def circuit_svd(lm: LoadedModel, which: str = "OV", n_directions: int = 3, top_k: int = 10,
                dtype: torch.dtype = torch.float32,
                progress: Optional[Callable[[float], None]] = None) -> CircuitSVD:
    """SVD of every head's OV (or QK) circuit from its factors, with the tokens each reads.

    The top ``n_directions`` singular directions of each head are read through the
    embedding/unembedding (``dtype`` sets the precision of those vocabulary-sized
    projections; the SVD itself is always float64). ``progress(fraction)`` is called after
    each layer's projections (a background job may raise from it to stop).
    """
    _check_top(lm, top_k, n_directions)
    fm = circuit(lm, which, torch.float64)
    u, s, vh = fm.svd()  # u [L,H,d,k], s [L,H,k], vh [L,H,k,d]
    L, H = s.shape[:2]
    if progress is not None:
        progress(0.1)
    w = head_weights(lm, dtype, ("W_E", "W_U") if which == "OV" else ("W_E",))
    n = n_directions
    u_top = u[..., :n].to(dtype)  # [L,H,d,n]
    v_top = vh[..., :n, :].transpose(-1, -2).to(dtype)  # [L,H,d,n]
    read_out = w["W_U"] if which == "OV" else w["W_E"].T  # [d, d_vocab]
    parts: list[tuple[np.ndarray, ...]] = []
    with torch.no_grad():
        for layer in range(L):  # one layer at a time: bounded memory, progress, cancel
            flat_v = v_top[layer].permute(0, 2, 1).reshape(-1, v_top.shape[2])  # [H*n, d]
            flat_u = u_top[layer].permute(0, 2, 1).reshape(-1, u_top.shape[2])
            # [H*n, d_vocab], contiguous along the vocabulary so topk is fast
            out_proj = flat_v @ read_out
            # fix each direction's sign: largest |output score| positive (flip u with v)
            sign = torch.sign(out_proj.gather(1, out_proj.abs().argmax(1, keepdim=True)))
            sign[sign == 0] = 1
            out_proj.mul_(sign)
            out_ids, out_sc = _top_tokens(out_proj, top_k)
            del out_proj
            in_proj = (flat_u * sign) @ w["W_E"].T
            in_ids, in_sc = _top_tokens(in_proj, top_k)
            del in_proj
            parts.append((in_ids, in_sc, out_ids, out_sc))
            if progress is not None:
                progress(0.1 + 0.9 * (layer + 1) / L)
    in_ids, in_sc, out_ids, out_sc = (np.concatenate([p[i] for p in parts]) for i in range(4))
    shape = (L, H, n, top_k)
    in_ids, in_sc = in_ids.reshape(shape), in_sc.reshape(shape)
    out_ids, out_sc = out_ids.reshape(shape), out_sc.reshape(shape)
    return CircuitSVD(
        circuit=which,
        singular_values=s.numpy(),
        frobenius=s.pow(2).sum(-1).sqrt().numpy(),
        input_space="W_E @ u (source token read by the head)" if which == "OV"
        else "W_E @ u (query token)",
        output_space="v @ W_U (logits written)" if which == "OV" else "W_E @ v (key token)",
        input_ids=in_ids, input_scores=in_sc, output_ids=out_ids, output_scores=out_sc,
        input_tokens=_nested_display(lm, in_ids), output_tokens=_nested_display(lm, out_ids),
        notes=architecture_notes(lm, which),
    )


# ------------------------------------------------------------ declared (GET /api/...)
def weights_view(lm: LoadedModel, *, layer: Optional[int] = None, head: Optional[int] = None,
                 circuit: str = "OV", top_k: int = 10, n_directions: int = 3,
                 full: CircuitSVD) -> dict:
    """Every head's OV or QK circuit SVD with ``n_directions`` directions of ``top_k`` tokens
    (of one layer, or one head, when ``layer`` and ``head`` are given): cut from ``full``
    (the shared weight analysis) when it holds that many, else computed."""
    have = full.input_ids.shape
    if n_directions <= have[2] and top_k <= have[3]:
        res = full.top(n_directions, top_k)
    else:
        res = circuit_svd(lm, circuit, n_directions, top_k)
    data = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
    if layer is not None:
        idx = (layer,) if head is None else (layer, head)

        def sel(v: object) -> object:
            for i in idx:
                v = v[i]  # type: ignore[index]
            return v
        data = {key: (sel(v) if isinstance(v, (np.ndarray, list)) else v)
                for key, v in data.items()}
    return {"layer": layer, "head": head, "result": data}


WEIGHTS = answers_get(declare(
    "weights", weights_view, scope="weights",
    params=[Layer("layer"), Head("head"), Choice("circuit", "OV", CIRCUITS),
            Int("top_k", 10, 1, lambda cfg: min(50, cfg.d_vocab)),
            ModelInt("n_directions", 3, 0, lambda cfg: cfg.d_head,
                what=lambda cfg: f" (d_head of {cfg.name})")],
    needs={"full": "circuit_svd"}, to_json=lambda view: view, label="{circuit} circuit SVD"))
