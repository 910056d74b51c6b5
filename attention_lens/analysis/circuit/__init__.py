"""Circuit discovery at edge level: the graph, edge scores (EAP, EAP-IG, exact edge patching),
circuit search and faithfulness. Split by step: :mod:`.graph` builds the edge graph and runs
the model over it, :mod:`.scores` scores the edges, :mod:`.search` keeps and evaluates
circuits, :mod:`.discovery` puts them together for the page and the API."""

from .graph import EdgeEngine, EdgeGraph, edge_graph
from .scores import (
    ABLATION_LABELS,
    ABLATIONS,
    METHOD_LABELS,
    METHODS,
    EdgeScores,
    Problem,
    check_exact_size,
    edge_scores,
)
from .search import (
    FaithfulnessCurve,
    acdc,
    circuit,
    circuit_metrics,
    faithfulness_curve,
    prune,
    top_k,
)

__all__ = ["ABLATIONS", "ABLATION_LABELS", "acdc", "METHODS", "METHOD_LABELS", "EdgeEngine",
           "EdgeGraph", "EdgeScores", "FaithfulnessCurve", "Problem", "check_exact_size",
           "circuit", "circuit_metrics", "edge_graph", "edge_scores", "faithfulness_curve",
           "prune", "top_k"]
