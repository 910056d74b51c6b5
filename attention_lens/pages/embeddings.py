"""/embeddings: PCA of W_E (or W_U^T) with k-means clusters, the prompt's tokens, token search."""

from __future__ import annotations

from typing import Any, Optional

import dash
import dash_bootstrap_components as dbc
from dash import callback, html

from ..analysis.embeddings import (
    MATRICES,
    TOKEN_FILTERS,
    EmbeddingPCA,
    Neighbours,
    embedding_pca,
    nearest_neighbours,
    project_tokens,
)
from ..app import registry
from ..components import jobs as JS
from ..components import page as P
from ..figures.embeddings import (
    embedding_scatter_figure,
    explained_variance_figure,
    neighbours_figure,
)
from ..jobs import Need, cached_or_jobs

PAGE = "embeddings"
dash.register_page(__name__, path="/embeddings", order=4, name="Embeddings",
                   title="Embeddings · Attention Lens",
                   description="PCA of the token embeddings with k-means clusters, the prompt's "
                               "tokens highlighted, and a token search.")

#: Components computed (the scatter shows the first two; the bars show them all).
N_COMPONENTS = 10
#: Most tokens in the map (scattergl handles more, but PCA and k-means get slow on CPU).
MAX_TOKENS = 20_000
CONTROLS = {
    "matrix": P.ChoiceParam("W_E", MATRICES),
    "filter": P.ChoiceParam("frequent", TOKEN_FILTERS),
    "n": P.IntParam(2000, 10, MAX_TOKENS),
    "clusters": P.IntParam(8, 1, 50),
    "centre": P.ChoiceParam("yes", ("yes", "no")),
    "search": P.TextParam("January", max_len=100),
    "neighbours": P.IntParam(10, 1, 100),
}
FILTER_LABELS = {"frequent": "frequent (lowest BPE ids)", "whole_word": "whole words",
                 "all": "all tokens"}

HELP = r"""
Each point is a token's row of $W_E$ (how the model reads it) or of $W_U^\top$ (the
direction that raises its logit), projected onto the first two **principal components**
(scikit-learn PCA of the centred rows; "centre: no" uses a truncated SVD of the raw rows).
The bars give the **explained variance ratio** of each component, $\lambda_j / \sum_i
\lambda_i$: small values mean the 2D map shows only a sliver of the geometry, so read
distances with care.

Colours are **k-means clusters** computed on the full $d_\text{model}$-dimensional rows,
not on the 2D projection, so one colour can be spread over the map. Ringed points are the
prompt's tokens (placed in the same projection). **Filters**: "frequent" keeps ordinary
printable tokens with the lowest BPE ids (the earliest, most frequent merges), "whole
words" keeps tokens that are a space followed by letters.

**Search** a word to highlight it and list its nearest tokens by cosine similarity
$\cos(x, y) = x \cdot y / (\lVert x \rVert \lVert y \rVert)$ over the whole vocabulary; a
word of several tokens uses the normalised mean of their unit rows (and says so).
"""


def _pca(model: str, query: dict) -> EmbeddingPCA:
    """PCA and clusters of the chosen rows, computed once per model and setting."""
    key = ("embedding_pca", query["matrix"], query["filter"], query["n"], query["clusters"],
           query["centre"])
    (pca,) = cached_or_jobs(registry(), model, [Need(key, lambda lm, report: embedding_pca(
        lm, matrix=query["matrix"], token_filter=query["filter"], max_tokens=query["n"],
        n_components=min(N_COMPONENTS, lm.cfg.d_model, query["n"]),
        n_clusters=query["clusters"], centre=query["centre"] == "yes"),
        f"PCA and k-means of {query['matrix']}")])
    return pca


def search_result(model: str, query: dict) -> Optional[Neighbours]:
    """Nearest neighbours of the searched word, or None when the box is empty."""
    if not query["search"].strip():
        return None
    return nearest_neighbours(registry().get(model), query["search"], k=query["neighbours"],
                              matrix=query["matrix"])


def panels(state: dict, query: dict) -> list[P.Panel]:
    """The map with the prompt and the search, the explained variance, the neighbours."""
    lm = registry().get(state["model"])
    fp = registry().forward(state["text"], state["model"])
    pca = _pca(lm.name, query)
    prompt = project_tokens(lm, pca, [int(i) for i in fp.token_ids])
    found = search_result(lm.name, query)
    highlight = None
    if found is not None:
        highlight = project_tokens(lm, pca, list(found.query_ids) + [int(i) for i in
                                                                      found.token_ids])
    return [
        P.Panel("map", embedding_scatter_figure(pca, prompt=prompt, search=highlight,
                                                n_query=len(found.query_ids) if found else 0),
                {"matrix": pca.matrix, "token_filter": pca.token_filter,
                 "token_ids": pca.token_ids, "display": pca.display, "coords": pca.coords[:, :2],
                 "cluster": pca.cluster, "prompt_token_ids": prompt.token_ids,
                 "prompt_coords": prompt.coords[:, :2]}),
        P.Panel("variance", explained_variance_figure(pca),
                {"explained_variance": pca.explained_variance,
                 "explained_variance_ratio": pca.explained_variance_ratio,
                 "centred": pca.centred}),
        P.Panel("neighbours", neighbours_figure(found), found),
    ]


P.register_panels(PAGE, panels, CONTROLS)
GRAPHS = ["map", "variance", "neighbours"]


def layout(**query: Any) -> html.Div:
    """Controls from the URL, the map, the variance bars and the neighbours."""
    q, problems = P.parse_query(CONTROLS, query)
    return P.page_layout(
        PAGE, "Embedding space",
        description="Where tokens sit in the model's embedding (or unembedding) space, which "
                    "ones cluster together, and which are closest to a word you type. The "
                    "page opens on a search for January: the shipped models' nearest "
                    "tokens to it are the other months. The axes give the share of the "
                    "variance each component explains; it is small, so the 2D map shows "
                    "only a sliver of the geometry.",
        controls=[
            P.select_control(PAGE, "matrix", q["matrix"],
                             [{"label": "W_E (embedding)", "value": "W_E"},
                              {"label": "W_U^T (unembedding)", "value": "W_U"}], "matrix"),
            P.select_control(PAGE, "filter", q["filter"],
                             [{"label": FILTER_LABELS[f], "value": f} for f in TOKEN_FILTERS],
                             "tokens"),
            P.number_control(PAGE, "n", q["n"], "at most", min=10, max=MAX_TOKENS, step=100),
            P.number_control(PAGE, "clusters", q["clusters"], "k clusters", min=1, max=50),
            P.select_control(PAGE, "centre", q["centre"], ("yes", "no"), "centre"),
            P.text_control(PAGE, "search", q["search"], "search",
                           placeholder="a word, e.g. Harry"),
            P.number_control(PAGE, "neighbours", q["neighbours"], "neighbours", min=1,
                             max=100),
        ],
        body=[JS.job_strip(PAGE), P.graph(PAGE, "map", height=620),
              dbc.Row([dbc.Col(P.graph(PAGE, "variance"), lg=5),
                       dbc.Col(P.graph(PAGE, "neighbours"), lg=7)])],
        help_md=HELP, query=q, problems=problems)


OUTPUTS = P.main_outputs(PAGE, GRAPHS, [JS.job_output(PAGE)])


@callback(*OUTPUTS,
          *P.main_inputs(PAGE, CONTROLS), JS.job_input(PAGE))
@P.analysis_callback(PAGE, CONTROLS, n_outputs=len(GRAPHS) + 1)
@JS.in_background(len(GRAPHS))
def update(state: dict, query: dict) -> tuple:
    """Fetch the cached PCA (a background job at first) and forward pass, project, draw."""
    return P.figures_of(panels(state, query))


JOB_CALLBACKS = JS.register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))
