"""/eigenvalues: attention-pattern spectra (the diagonal) and circuit eigenvalues per head."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
import numpy as np
from dash import Output, callback, html

from ..analysis.circuits import check_head
from ..analysis.eigen import CircuitEigenvalues, attention_spectrum, circuit_eigenvalues
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..figures.eigen import (
    attention_spectrum_figure,
    circuit_eigenvalues_figure,
    copying_scores_figure,
)
from ..jobs import Need, cached_or_jobs

PAGE = "eigenvalues"
dash.register_page(__name__, path="/eigenvalues", order=6, name="Eigenvalues",
                   title="Eigenvalues · Attention Lens",
                   description="Attention-pattern spectra (the diagonal of a causal pattern) and "
                               "OV / QK circuit eigenvalues with copying scores.")

CIRCUITS = CircuitEigenvalues.CIRCUITS  # ("ov", "full_ov", "qk", "full_qk")
CIRCUIT_NAMES = {"ov": "OV  W_V W_O", "full_ov": "full OV  W_E W_OV W_U",
                 "qk": "QK  W_Q W_K^T", "full_qk": "full QK  W_E W_QK W_E^T"}
CONTROLS = {
    "layer": P.IntParam(None, 0),
    "head": P.IntParam(None, 0),
    "circuit": P.ChoiceParam("full_ov", CIRCUITS),
    "order": P.ChoiceParam("sorted", ("sorted", "position")),
}

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


NOTE = f"{PAGE}-note"


def _eigen(model: str) -> CircuitEigenvalues:
    """Every head's circuit eigenvalues (cached per model; a background job the first time)."""
    (eig,) = cached_or_jobs(registry(), model, [EIGEN_NEED])
    return eig


EIGEN_NEED = Need("circuit_eigenvalues",
                  lambda lm, report: circuit_eigenvalues(lm, progress=report),
                  "circuit eigenvalues")


def selected_head(eig: CircuitEigenvalues, layer: Optional[int], head: Optional[int]
                  ) -> tuple[int, int]:
    """The head asked for, else the one with the highest full-OV copying score."""
    if layer is None and head is None:
        flat = int(np.argmax(eig.copying["full_ov"]))
        return divmod(flat, eig.copying["full_ov"].shape[1])
    return (0 if layer is None else layer), (0 if head is None else head)


def panels(state: dict, query: dict) -> list[P.Panel]:
    """Pattern spectrum and circuit eigenvalues of one head; copying scores of every head."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    eig = _eigen(lm.name)
    layer, head = selected_head(eig, query["layer"], query["head"])
    check_head(lm, layer, head)
    spectrum = attention_spectrum(lm, fp)
    which = query["circuit"]
    return [
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


P.register_panels(PAGE, panels, CONTROLS)
GRAPHS = ["pattern-spectrum", "circuit-eigenvalues", "copying"]


def layout(**query: Any) -> html.Div:
    """Controls from the URL and the three figures."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Eigenvalues: attention spectra and circuits",
        description="The eigenvalues of an attention pattern (for a causal pattern, simply "
                    "its diagonal: how much each token attends to itself) next to the "
                    "eigenvalues of each head's circuits, which show whether a head copies.",
        controls=[
            P.number_control(PAGE, "layer", q["layer"], "layer", min=0, placeholder="auto"),
            P.number_control(PAGE, "head", q["head"], "head", min=0, placeholder="auto"),
            P.select_control(PAGE, "circuit", q["circuit"],
                             [{"label": CIRCUIT_NAMES[c], "value": c} for c in CIRCUITS],
                             "copying of"),
            P.select_control(PAGE, "order", q["order"], ("sorted", "position"),
                             "spectrum order"),
        ],
        body=[JS.job_strip(PAGE), html.Div(id=NOTE),
              dbc.Row([dbc.Col(P.graph(PAGE, "pattern-spectrum"), lg=5),
                       dbc.Col(P.graph(PAGE, "copying"), lg=7)]),
              P.graph(PAGE, "circuit-eigenvalues")],
        help_md=HELP, query=q, problems=problems)


OUTPUTS = P.main_outputs(PAGE, GRAPHS, [Output(NOTE, "children"), JS.job_output(PAGE)])


@callback(*OUTPUTS,
          *P.main_inputs(PAGE, CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=len(GRAPHS) + 2)
@JS.in_background(len(GRAPHS) + 1)
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached forward pass and eigenvalues (a background job at first), draw."""
    out = panels(state, query)
    notes = _eigen(state["model"]).notes
    return (*P.figures_of(out), [P.shell.alert(n, color="info") for n in notes] or None)


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))
