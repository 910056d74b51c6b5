"""/eigenvalues: attention-pattern spectra (the diagonal) and circuit eigenvalues per head."""

from __future__ import annotations

import dash_bootstrap_components as dbc
import numpy as np

from .. import weight_analyses as W
from ..analysis.checks import check_layer_head
from ..analysis.eigen import CircuitEigenvalues, attention_spectrum
from ..components import page as P
from ..components.controls import Choice, Int
from ..figures.eigen import (
    attention_spectrum_figure,
    circuit_eigenvalues_figure,
    copying_scores_figure,
)

CIRCUITS = CircuitEigenvalues.CIRCUITS  # ("ov", "full_ov", "qk", "full_qk")
CIRCUIT_NAMES = {"ov": "OV  W_V W_O", "full_ov": "full OV  W_E W_OV W_U",
                 "qk": "QK  W_Q W_K^T", "full_qk": "full QK  W_E W_QK W_E^T"}

HELP = r"""
**Attention-pattern spectrum.** A head's pattern $A$ on the prompt is
causal, i.e. lower-triangular, so its eigenvalues are **exactly its diagonal** $A[i, i]$:
the weight each token puts on itself. The first chart shows that diagonal for the selected
head (sorted from largest to smallest, as tools that compute "attention eigenvalues"
show them, or in token order); it is a self-attention profile, not a hidden structure.

**Circuit eigenvalues** carry the real signal (Elhage et al. 2021). For the OV circuit
$W_{OV} = W_V W_O$, the full OV circuit $W_E W_{OV} W_U$ (token → logit), the QK circuit
$W_Q W_K^\top$ and the full QK circuit $W_E W_{QK} W_E^\top$, the non-zero eigenvalues
come from the $d_\text{head} \times d_\text{head}$ product of the factors in reverse order
(the non-zero eigenvalues of $AB$ equal those of $BA$); the $d_\text{model}$ Gram terms
$W_U W_E$ and $W_E^\top W_E$ are computed once per model. Each panel plots one circuit's
$\lambda$ in the complex plane for the selected head.

**Copying score** $= \mathrm{Re}(\sum \lambda) / \sum |\lambda| \in [-1, 1]$: near 1, a
head that attends to token X raises the logit of X (for full OV). The heatmaps give it and
the positive fraction $\#\{\mathrm{Re}\,\lambda > 0\} / d_\text{head}$ for every head, for
the circuit chosen above. Empty layer/head boxes select the head with the highest full-OV
copying score.
"""


def panels(ctx: P.PageContext, query: dict) -> list:
    """Pattern spectrum and circuit eigenvalues of one head; copying scores of every head."""
    lm = ctx.model
    eig = ctx.weight(W.circuit_eigenvalues())
    if query["layer"] is None and query["head"] is None:
        layer, head = eig.strongest_copying_head("full_ov")
    else:
        layer, head = query["layer"] or 0, query["head"] or 0
    check_layer_head(lm, layer, head)
    spectrum = attention_spectrum(lm, ctx.forward)
    which = query["circuit"]
    return [
        *[P.Notice(n) for n in eig.notes],
        P.Panel("pattern-spectrum",
                attention_spectrum_figure(spectrum, layer, head,
                                          sort=query["order"] == "sorted"),
                {"layer": layer, "head": head, "note": spectrum.note,
                 "eigenvalues": spectrum.eigenvalues[layer, head], "display": spectrum.display}),
        P.Panel("circuit-eigenvalues", circuit_eigenvalues_figure(eig, layer, head),
                {"layer": layer, "head": head, "dtype": eig.dtype, "notes": list(eig.notes),
                 **{c: np.stack([eig.eigenvalues(c)[layer, head].real,
                                 eig.eigenvalues(c)[layer, head].imag], -1) for c in CIRCUITS}}),
        P.Panel("copying", copying_scores_figure(eig, which),
                {"circuit": which, "copying": eig.copying[which],
                 "positive_fraction": eig.positive[which]}),
    ]


P.register_page(
    __name__, path="/eigenvalues", order=9, name="Eigenvalues",
    title="Eigenvalues · Attention Lens",
    description="Attention-pattern spectra (the diagonal of a causal pattern) and OV / QK "
                "circuit eigenvalues with copying scores.",
    heading="Eigenvalues: attention spectra and circuits",
    lead="The eigenvalues of an attention pattern (for a causal pattern, simply its diagonal: "
         "how much each token attends to itself) next to the eigenvalues of each head's "
         "circuits, which show whether a head copies.",
    help_md=HELP, panels=panels,
    graphs=["pattern-spectrum", "circuit-eigenvalues", "copying"],
    controls=[
        Int("layer", None, 0, hi=lambda cfg: cfg.n_layers - 1, label="layer",
            placeholder="auto"),
        Int("head", None, 0, hi=lambda cfg: cfg.n_heads - 1, label="head", placeholder="auto"),
        Choice("circuit", "full_ov", CIRCUITS, label="copying of", labels=CIRCUIT_NAMES),
        Choice("order", "sorted", ("sorted", "position"), label="spectrum order"),
    ],
    body=lambda parts: [dbc.Row([dbc.Col(parts["pattern-spectrum"], lg=5),
                                 dbc.Col(parts["copying"], lg=7)]),
                        parts["circuit-eigenvalues"]])
