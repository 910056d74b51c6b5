"""The attribution graph as a declared analysis (:mod:`..declare`): ``POST /api/graph``,
the /graph page's controls, its cache key and whether it is built inline or as a job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ...model.checkpoint import LoadedModel
from ..declare import Bool, Position, Share, Token, declare, forward_gflop
from ..errors import AnalysisError
from ..forward import ForwardPass
from ..predictions import TokenLike
from .budget import MAX_EDGES, estimated_edges
from .export import graph_json
from .prune import EDGE_THRESHOLD, NODE_THRESHOLD, GraphView, graph_view


@dataclass(frozen=True)
class ExplainedGraph:
    """A pruned graph of one prompt and what its graph file names (model, prompt, tokens)."""

    view: GraphView
    model_name: str
    prompt: str
    tokens: tuple[str, ...]

    def graph_file(self) -> dict[str, Any]:
        """The pruned graph as a circuit-tracer graph file."""
        return graph_json(self.view.graph, self.view.pruned, slug=f"{self.model_name}-graph",
                          prompt=self.prompt, model_name=self.model_name,
                          tokens=list(self.tokens))


def explain(lm: LoadedModel, fp: ForwardPass, *, target: Optional[TokenLike] = None,
            contrast: Optional[TokenLike] = None, position: int = -1,
            node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD,
            truncate: bool = False,
            progress: Optional[Callable[[float], None]] = None) -> ExplainedGraph:
    """The pruned exact attribution graph (:func:`.prune.graph_view`) of the prompt; a prompt
    longer than the model reads is refused unless ``truncate`` (its first tokens)."""
    if fp.truncated and not truncate:
        raise AnalysisError(f"the prompt has {fp.n_prompt_tokens} tokens but {lm.name} reads "
                            f"at most {fp.n_tokens}: shorten it, or send \"truncate\": true to "
                            f"analyse the first {fp.n_tokens}")
    view = graph_view(lm, fp, target=target, contrast=contrast, position=position,
                      node_threshold=node_threshold, edge_threshold=edge_threshold,
                      progress=None if progress is None else
                      (lambda done, total: progress(done / max(total, 1))))
    # a job's pass may be rebuilt from the token ids alone: its text is then their pieces
    return ExplainedGraph(view, lm.name, fp.text or "".join(fp.tokens), tuple(fp.tokens))


#: Work of building and pruning one edge, as floating-point operations of a matrix product
#: taking as long (measured: about 2 µs per edge on one core, GPT-2 small's shape; a
#: matrix product runs near 30 GFLOP/s there). Graphs of up to 3 M edges run inline.
EDGE_FLOP = 60_000


def graph_cost(cfg: Any, n_tokens: int, values: dict) -> float:
    """The work of the graph at ``position`` in forward passes of the prompt; a graph over
    the edge budget costs nothing (it is refused at once, with the reach in the message)."""
    pos = values.get("position", -1)
    n = pos % n_tokens + 1 if isinstance(pos, int) and -n_tokens <= pos < n_tokens \
        else n_tokens
    edges = estimated_edges(cfg, n)
    if edges > MAX_EDGES:
        return 0.0
    return edges * EDGE_FLOP / 1e9 / forward_gflop(cfg, n_tokens)


def _graph_json(res: ExplainedGraph) -> dict[str, Any]:
    view = res.view
    g = view.graph
    return {"result": {
        "target": g.label(g.target), "position": g.position, "logit": g.logit,
        "bias": g.bias, "sum_into_target": float(g.weight[g.dst == g.target].sum()),
        "kept_target_share": view.kept_target_share, "n_nodes": g.n_nodes,
        "n_edges": len(g.weight), "n_nodes_full": view.n_nodes_full,
        "n_edges_full": view.n_edges_full, "graph": res.graph_file()}}


GRAPH = declare(
    "graph", explain,
    params=[Token("target", label="target token", placeholder="top prediction"),
            Token("contrast", label="minus token", placeholder="none"),
            Position("position", url="pos", auto=True, label="position", placeholder="last"),
            Share("node_threshold", NODE_THRESHOLD, url="node",
                  label="node threshold (share of influence kept)"),
            Share("edge_threshold", EDGE_THRESHOLD, url="edge", label="edge threshold"),
            Bool("truncate", False, page=False)],
    cost=graph_cost, to_json=_graph_json, label="attribution graph", digits=None)
