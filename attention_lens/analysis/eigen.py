"""Eigenvalues: the attention-pattern spectrum (seed) and the circuit eigenvalues.

The seed's "Eigenvalue Analysis" took eigenvalues of each attention pattern. A causal
pattern is lower-triangular, so those eigenvalues are exactly its diagonal A[i, i] (how
much each token attends to itself). :func:`attention_spectrum` returns that diagonal and
says so. The real signal is in the circuits (Elhage et al. 2021):

- OV: non-zero eig(W_V W_O) = eig(W_O W_V)            (d_head x d_head)
- full OV: non-zero eig(W_E W_V W_O W_U) = eig(W_O (W_U W_E) W_V)
- QK: non-zero eig(W_Q W_K^T) = eig(W_K^T W_Q)
- full QK: non-zero eig(W_E W_Q W_K^T W_E^T) = eig(W_K^T (W_E^T W_E) W_Q)

The d_model x d_model Gram terms ``W_U W_E`` and ``W_E^T W_E`` are computed once per
model; no d_vocab x d_vocab matrix is ever formed. Copying score ``Re(Σλ) / Σ|λ|`` in
[-1, 1] and positive fraction ``#{Re λ > 0} / d_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..model.checkpoint import LoadedModel
from .circuits import architecture_notes, head_weights
from .declare import Head, Layer, declare
from .errors import AnalysisError
from .forward import ForwardPass


# --------------------------------------------------------------- pattern spectrum
@dataclass(frozen=True)
class AttentionSpectrum:
    """Eigenvalues of each head's causal attention pattern, i.e. its diagonal A[i, i].

    Attributes:
        eigenvalues: [n_layers, n_heads, pos] A[i, i] in position order (real, in [0, 1]).
        sorted_eigenvalues: [n_layers, n_heads, pos] the same, descending (as the seed showed).
        display: display string of each position's token.
        is_diagonal: always True: a causal (lower-triangular) pattern's eigenvalues are its
            diagonal entries, so this is the self-attention weight of each token.
        note: the sentence above, for help text and exports.
    """

    eigenvalues: np.ndarray
    sorted_eigenvalues: np.ndarray
    display: list[str]
    is_diagonal: bool = True
    note: str = ("A causal attention pattern is lower-triangular, so its eigenvalues are "
                 "exactly its diagonal A[i, i]: the weight each token puts on itself.")


def attention_spectrum(lm: LoadedModel, fp: ForwardPass) -> AttentionSpectrum:
    """The seed's attention-pattern eigenvalues: the diagonal of every head's pattern."""
    diags = []
    for layer in range(lm.cfg.n_layers):
        pattern = fp.cache[f"blocks.{layer}.attn.hook_pattern"]  # [h, q, k]
        diags.append(pattern.diagonal(dim1=-2, dim2=-1).double().numpy())
    eig = np.stack(diags)
    return AttentionSpectrum(eigenvalues=eig, sorted_eigenvalues=-np.sort(-eig, axis=-1),
                             display=list(fp.display))


# ------------------------------------------------------------------ copying scores
def copying_score(eigenvalues: np.ndarray) -> np.ndarray:
    """``Re(Σλ) / Σ|λ|`` over the last axis (0 for an all-zero spectrum)."""
    eigenvalues = np.asarray(eigenvalues)
    num = eigenvalues.sum(-1).real
    den = np.abs(eigenvalues).sum(-1)
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def positive_fraction(eigenvalues: np.ndarray) -> np.ndarray:
    """``#{Re λ > 0} / n`` over the last axis."""
    eigenvalues = np.asarray(eigenvalues)
    return (eigenvalues.real > 0).mean(-1)


def _sorted(eig: torch.Tensor) -> np.ndarray:
    """Complex eigenvalues as numpy, ordered by descending magnitude per head."""
    e = eig.to(torch.complex128).numpy()
    order = np.argsort(-np.abs(e), axis=-1, kind="stable")
    return np.take_along_axis(e, order, axis=-1)


def gram_terms(lm: LoadedModel, dtype: torch.dtype = torch.float32,
               keys: tuple[str, ...] = ("UE", "EE")) -> dict[str, torch.Tensor]:
    """The shared [d_model, d_model] terms ``W_U W_E`` ("UE") and ``W_E^T W_E`` ("EE")."""
    w = head_weights(lm, dtype, ("W_E", "W_U") if "UE" in keys else ("W_E",))
    out = {}
    with torch.no_grad():
        if "UE" in keys:
            out["UE"] = w["W_U"] @ w["W_E"]
        if "EE" in keys:
            out["EE"] = w["W_E"].T @ w["W_E"]
    return out


def _dtype(dtype: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in dtypes:
        raise AnalysisError("eigenvalues are computed in float32 or float64 only")
    return dtypes[dtype]


def full_ov_eigenvalues(lm: LoadedModel, dtype: str = "float32") -> np.ndarray:
    """Eigenvalues [n_layers, n_heads, d_head] of every head's full OV circuit W_E W_OV W_U.

    Only the shared ``W_U W_E`` and one d_head x d_head matrix per head are formed.
    Pass the result to :func:`copying_score` for the copying scores.
    """
    td = _dtype(dtype)
    ue = gram_terms(lm, td, ("UE",))["UE"]
    w = head_weights(lm, td, ("W_V", "W_O"))
    with torch.no_grad():
        return _sorted(torch.linalg.eigvals(((w["W_O"] @ ue) @ w["W_V"]).double()))


@dataclass(frozen=True)
class CircuitEigenvalues:
    """Eigenvalues of every head's OV, full OV, QK and full QK circuits, and copying scores.

    All eigenvalue arrays are complex128 [n_layers, n_heads, d_head], sorted by descending
    magnitude per head (the non-zero eigenvalues of the d_model or d_vocab sized circuit,
    computed from the d_head x d_head product of its factors in reverse order).

    Attributes:
        ov: eig(W_O W_V).
        full_ov: eig(W_O W_U W_E W_V) = non-zero eig of the full OV circuit W_E W_OV W_U.
        qk: eig(W_K^T W_Q).
        full_qk: eig(W_K^T W_E^T W_E W_Q) = non-zero eig of W_E W_QK W_E^T.
        copying: dict circuit name ("ov", "full_ov", "qk", "full_qk") -> [n_layers, n_heads]
            copying score Re(Σλ)/Σ|λ| in [-1, 1].
        positive: dict circuit name -> [n_layers, n_heads] fraction of eigenvalues with
            Re λ > 0.
        dtype: precision of the large Gram products ("float32" or "float64"); the
            d_head x d_head eigenproblems are solved in float64.
        notes: what these circuits leave out for this model's architecture (positional
            terms, rotary positions, shared key/value heads).
    """

    ov: np.ndarray
    full_ov: np.ndarray
    qk: np.ndarray
    full_qk: np.ndarray
    copying: dict[str, np.ndarray]
    positive: dict[str, np.ndarray]
    dtype: str
    notes: tuple[str, ...] = ()

    CIRCUITS = ("ov", "full_ov", "qk", "full_qk")

    @property
    def full_ov_copying(self) -> np.ndarray:
        """[n_layers, n_heads] copying score of the full OV circuit (the headline number)."""
        return self.copying["full_ov"]

    def strongest_copying_head(self, which: str = "full_ov") -> tuple[int, int]:
        """(layer, head) with the highest copying score of circuit ``which``."""
        scores = self.copying[which]
        flat = int(np.argmax(scores))
        return divmod(flat, scores.shape[1])

    def eigenvalues(self, which: str) -> np.ndarray:
        """The eigenvalue array of circuit ``which`` (one of :attr:`CIRCUITS`)."""
        if which not in self.CIRCUITS:
            raise AnalysisError(f"unknown circuit {which!r}; choose one of "
                                f"{', '.join(self.CIRCUITS)}")
        return getattr(self, which)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict: eigenvalues as [..., 2] lists of (real, imaginary)."""
        out: dict[str, Any] = {"dtype": self.dtype}
        for name in self.CIRCUITS:
            e = getattr(self, name)
            out[name] = np.stack([e.real, e.imag], -1).tolist()
        out["copying"] = {k: v.tolist() for k, v in self.copying.items()}
        out["positive"] = {k: v.tolist() for k, v in self.positive.items()}
        return out


def circuit_eigenvalues(lm: LoadedModel, dtype: str = "float32",
                        gram: Optional[dict[str, torch.Tensor]] = None,
                        progress: Optional[Callable[[float], None]] = None
                        ) -> CircuitEigenvalues:
    """Eigenvalues and copying scores of every head's OV, full OV, QK and full QK circuits.

    ``dtype`` ("float32" or "float64") is the precision of the vocabulary-sized Gram products
    (pass ``gram`` from :func:`gram_terms` to reuse them); the small eigenproblems use float64.
    ``progress(fraction)`` is called after the Gram terms and after each layer.
    """
    td = _dtype(dtype)
    if gram is None:
        gram = gram_terms(lm, td)
    if progress is not None:
        progress(0.3)
    w = head_weights(lm, td, ("W_Q", "W_K", "W_V", "W_O"))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in CircuitEigenvalues.CIRCUITS}
    n_layers = w["W_Q"].shape[0]
    with torch.no_grad():
        for layer in range(n_layers):
            W_Q, W_K, W_V, W_O = (w[k][layer] for k in ("W_Q", "W_K", "W_V", "W_O"))
            W_Kt = W_K.transpose(-1, -2)
            small = {
                "ov": W_O @ W_V,  # [H, e, e]
                "full_ov": (W_O @ gram["UE"].to(td)) @ W_V,
                "qk": W_Kt @ W_Q,
                "full_qk": (W_Kt @ gram["EE"].to(td)) @ W_Q,
            }
            for k, v in small.items():
                parts[k].append(_sorted(torch.linalg.eigvals(v.double())))
            if progress is not None:
                progress(0.3 + 0.7 * (layer + 1) / n_layers)
    eig = {k: np.stack(v) for k, v in parts.items()}
    notes = architecture_notes(lm, "all")
    if lm.cfg.has_absolute_positions:
        notes = ("The full QK circuit W_E W_QK W_E^T compares token embeddings only: the "
                 "positional terms through W_pos are left out.", *notes)
    return CircuitEigenvalues(
        **eig,
        copying={k: copying_score(v) for k, v in eig.items()},
        positive={k: positive_fraction(v) for k, v in eig.items()},
        dtype=dtype,
        notes=notes,
    )


# ------------------------------------------------------------ declared (POST /api/...)
@dataclass(frozen=True)
class EigenView:
    """What ``POST /api/eigenvalues`` answers: the prompt's attention spectrum and every
    head's circuit eigenvalues, of one layer or one head when ``layer`` (and ``head``)."""

    layer: Optional[int]
    head: Optional[int]
    attention_spectrum: dict
    circuits: dict


def eigen_view(lm: LoadedModel, fp: ForwardPass, *, layer: Optional[int] = None,
               head: Optional[int] = None, eig: CircuitEigenvalues) -> EigenView:
    """The attention spectrum of the prompt and the circuit eigenvalues ``eig`` (the weight
    analysis), cut to ``layer`` (and ``head``) when given."""
    import dataclasses

    idx = () if layer is None else (layer,) if head is None else (layer, head)

    def pick(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: pick(x) for k, x in v.items()}
        for i in idx:
            v = v[i]
        return v

    spec = attention_spectrum(lm, fp)
    spectrum = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    for key in ("eigenvalues", "sorted_eigenvalues"):
        spectrum[key] = pick(spectrum[key])
    circuits: dict[str, Any] = {"dtype": eig.dtype}
    for name in eig.CIRCUITS:
        circuits[name] = pick(getattr(eig, name))
    circuits["copying"], circuits["positive"] = pick(eig.copying), pick(eig.positive)
    return EigenView(layer, head, spectrum, circuits)


EIGENVALUES = declare(
    "eigenvalues", eigen_view, params=[Layer("layer"), Head("head")],
    needs={"eig": "circuit_eigenvalues"},
    to_json=lambda v: {"layer": v.layer, "head": v.head,
                       "attention_spectrum": v.attention_spectrum, "circuits": v.circuits},
    label="eigenvalues")
