"""The exact attribution graph of a target logit: tokens → heads → logit, patterns frozen.

Split by idea: :mod:`.build` (the graph and its exact edges, with patterns and LayerNorm
scales frozen), :mod:`.prune` (influence on the target, circuit-tracer's pruning and the kept
subgraph), :mod:`.export` (circuit-tracer's graph file) and :mod:`.budget` (how many edges a
graph may have, and where it is built by default); :mod:`.declared` its declaration.
"""

from .budget import MAX_EDGES, check_size, default_position, estimated_edges, largest_position
from .build import DTYPE, NODE_KINDS, AttributionGraph, Progress, attribution_graph
from .declared import GRAPH, ExplainedGraph, explain
from .export import GRAPH_JSON_SCHEMA_VERSION, graph_json
from .prune import (
    EDGE_THRESHOLD,
    NODE_THRESHOLD,
    GraphView,
    PrunedGraph,
    check_threshold,
    graph_view,
    prune_graph,
    subgraph,
)

__all__ = [
    "DTYPE", "EDGE_THRESHOLD", "GRAPH", "GRAPH_JSON_SCHEMA_VERSION", "NODE_THRESHOLD",
    "ExplainedGraph", "explain", "MAX_EDGES", "NODE_KINDS", "AttributionGraph",
    "GraphView", "Progress", "PrunedGraph", "attribution_graph", "check_size",
    "check_threshold", "default_position", "estimated_edges", "graph_json", "graph_view",
    "largest_position", "prune_graph", "subgraph",
]
