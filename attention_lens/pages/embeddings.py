"""/embeddings: PCA of W_E (or W_U^T) with k-means clusters, the prompt's tokens, token search."""

from __future__ import annotations

import dash_bootstrap_components as dbc

from .. import weight_analyses as W
from ..analysis.embeddings import MATRICES, TOKEN_FILTERS, nearest_neighbours, project_tokens
from ..components import page as P
from ..components.controls import Choice, Int, Text
from ..figures.embeddings import (
    embedding_scatter_figure,
    explained_variance_figure,
    neighbours_figure,
)

#: Most tokens in the map (scattergl handles more, but PCA and k-means get slow on CPU).
MAX_TOKENS = 20_000
FILTER_LABELS = {"frequent": "frequent (lowest BPE ids)", "whole_word": "whole words",
                 "all": "all tokens"}

HELP = r"""
Each point is a token's row of $W_E$ (how the model reads it) or of $W_U^\top$ (the
direction that raises its logit), projected onto the first two **principal components**
(scikit-learn PCA of the centred rows with its exact LAPACK solver; "centre: no" uses the
exact SVD of the raw rows).
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


def panels(ctx: P.PageContext, query: dict) -> list:
    """The map with the prompt and the search, the explained variance, the neighbours."""
    lm = ctx.model
    pca = ctx.weight(W.embedding_pca(query["matrix"], query["filter"], query["n"],
                                     query["clusters"], centre=query["centre"] == "yes"))
    prompt = project_tokens(lm, pca, [int(i) for i in ctx.forward.token_ids])
    found = None
    if query["search"].strip():
        found = nearest_neighbours(lm, query["search"], k=query["neighbours"],
                                   matrix=query["matrix"])
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


P.register_page(
    __name__, path="/embeddings", order=4, name="Embeddings", title="Embeddings · Attention Lens",
    description="PCA of the token embeddings with k-means clusters, the prompt's tokens "
                "highlighted, and a token search.",
    heading="Embedding space",
    lead="Where tokens sit in the model's embedding (or unembedding) space, which ones "
         "cluster together, and which are closest to a word you type. The page opens on a "
         "search for January: the shipped models' nearest tokens to it are the other months. "
         "The axes give the share of the variance each component explains; it is small, so "
         "the 2D map shows only a sliver of the geometry.",
    help_md=HELP, panels=panels, graphs=["map", "variance", "neighbours"],
    graph_options={"map": {"height": 620}},
    controls=[
        Choice("matrix", "W_E", MATRICES, label="matrix",
               labels={"W_E": "W_E (embedding)", "W_U": "W_U^T (unembedding)"}),
        Choice("filter", "frequent", TOKEN_FILTERS, label="tokens", labels=FILTER_LABELS),
        Int("n", 2000, 10, MAX_TOKENS, label="at most", step=100),
        Int("clusters", 8, 1, 50, label="k clusters"),
        Choice("centre", "yes", ("yes", "no"), label="centre"),
        Text("search", "January", max_len=100, label="search",
             placeholder="a word, e.g. Harry"),
        Int("neighbours", 10, 1, 100, label="neighbours"),
    ],
    body=lambda parts: [parts["map"],
                        dbc.Row([dbc.Col(parts["variance"], lg=5),
                                 dbc.Col(parts["neighbours"], lg=7)])])
