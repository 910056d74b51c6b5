"""An attribution graph as a circuit-tracer graph file."""

from __future__ import annotations

import numpy as np

from .build import AttributionGraph
from .prune import PrunedGraph

#: Fields of circuit-tracer's graph JSON (``frontend/graph_models.py`` of circuit-tracer 0.5.0).
GRAPH_JSON_SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    """circuit-tracer's feature number of (layer, index): Cantor pairing."""
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(graph: AttributionGraph, pruned: PrunedGraph, *, slug: str, prompt: str,
               model_name: str, tokens: tuple[str, ...]) -> dict:
    """The pruned graph as a circuit-tracer graph file (metadata, qParams, nodes, links).

    Heads are feature nodes (feature index = head); the opaque sources (each layer's
    attention biases, each MLP's output, the final LayerNorm bias) are error-type nodes, as
    circuit-tracer draws what its replacement model does not explain; tokens are embedding
    nodes and the target is the logit node. ``activation`` is what flows through a node (its
    exact contribution to the target); ``influence`` is the cumulative influence.
    ``tokens`` are the raw token strings (up to the target position).
    """
    L, P = graph.n_layers, graph.position  # noqa: N806
    nodes: dict[int, dict] = {}
    for i in np.flatnonzero(pruned.node_mask):
        kind, layer, pos = graph.kind[i], int(graph.layer[i]), int(graph.pos[i])
        base = dict(ctx_idx=pos, token_prob=0.0, is_target_logit=False, run_idx=0,
                    reverse_ctx_idx=0, influence=float(pruned.cumulative[i]),
                    activation=float(graph.value[i]))
        where = f"at {graph.display[pos]!r} ({pos})"
        if kind == "head":
            head = int(graph.head[i])
            node = dict(node_id=f"{layer}_{head}_{pos}", feature=_cantor(layer, head),
                        layer=str(layer), feature_type="cross layer transcoder",
                        jsNodeId=f"{layer}_{head}-0",
                        clerp=f"attention head L{layer}H{head} {where}")
        elif kind == "token":
            vocab = int(graph.token_ids[pos])
            node = dict(node_id=f"E_{vocab}_{pos}", feature=pos, layer="E",
                        feature_type="embedding", jsNodeId=f"E_{vocab}-{pos}",
                        clerp=f"Emb: {graph.display[pos]!r} + position {pos}")
        elif kind == "target":
            u = graph.target_id
            name = graph.target_display if graph.contrast_id is None else \
                f'{graph.target_display}" − "{graph.contrast_display}'
            node = dict(node_id=f"{L + 1}_{u}_{pos}", feature=u, layer=str(L + 1),
                        feature_type="logit", jsNodeId=f"L_{u}-{pos}",
                        clerp=f'Output "{name}" (p={graph.probability:.3f})')
            node.update(token_prob=graph.probability, is_target_logit=True)
        else:  # opaque sources: attention biases, MLP outputs, final LN bias
            suffix, feature, clerp = {
                "mlp": ("_mlp", -1, f"MLP L{layer} output (opaque) {where}"),
                "bias": ("_bias", -2, f"L{layer} attention biases (b_O + b_V W_O) {where}"),
                "ln_bias": ("_lnf", -3, "final LayerNorm bias"),
            }[kind]
            node = dict(node_id=f"0_{layer}_{pos}{suffix}", feature=feature, layer=str(layer),
                        feature_type="mlp reconstruction error",
                        jsNodeId=f"{layer}_{pos}{suffix}-0", clerp=clerp)
        nodes[int(i)] = {**base, **node}
    links = [{"source": nodes[int(s)]["node_id"], "target": nodes[int(d)]["node_id"],
              "weight": float(w)}
             for s, d, w in zip(graph.src[pruned.edge_mask], graph.dst[pruned.edge_mask],
                                graph.weight[pruned.edge_mask])]
    return {
        "metadata": {
            "slug": slug, "scan": model_name, "transcoder_list": [],
            "prompt_tokens": list(tokens[: P + 1]), "prompt": prompt,
            "node_threshold": pruned.node_threshold,
            "schema_version": GRAPH_JSON_SCHEMA_VERSION,
            "info": {"exact": True, "edge_threshold": pruned.edge_threshold,
                     "target": graph.label(graph.target), "logit": graph.logit,
                     "bias": graph.bias, "normalization": graph.normalization,
                     "frozen": "attention patterns and LayerNorm scales"},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": list(nodes.values()),
        "links": links,
    }

