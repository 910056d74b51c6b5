"""The exact attribution graph: sums, flow conservation, a frozen forward pass, pruning, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tl_oracle import tl_tokens, to_transformer_lens

from attention_lens.analysis.errors import AnalysisError
from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.graph import attribution_graph, graph_json, prune_graph

TEXT = "Harry Potter and Hermione Granger walked. Harry Potter and Hermione"


def frozen_forward(lm, fp, position: int, direction: torch.Tensor, drop=None) -> float:
    """T = LN_final(resid)[P] · direction, patterns, LayerNorm scales and MLP outputs frozen.

    ``drop`` removes one source from the residual stream: ("token", p), ("mlp", layer, p) or
    one head's linear output ("head", layer, head, p); everything downstream is recomputed.
    """
    m, cfg, dt = lm.model, lm.cfg, torch.float64
    n = position + 1
    c = {k: v[:n].to(dt) if v.ndim and k.startswith("hook") else v for k, v in fp.cache.items()}
    resid = c["hook_embed"] + c.get("hook_pos_embed", 0)
    if drop and drop[0] == "token":
        resid[drop[1]] = 0

    def norm(x, ln, scale):
        if not cfg.normalization_type:
            return x
        x = x - x.mean(-1, keepdim=True) if cfg.normalization_type == "LN" else x
        x = x / scale.reshape(-1)[:n, None].to(dt) * ln.w.to(dt)
        return x + ln.b.to(dt) if cfg.normalization_type == "LN" else x

    for layer, block in enumerate(m.blocks):
        attn = block.attn
        x = norm(resid, getattr(block, "ln1", None),
                 fp.cache.get(f"blocks.{layer}.ln1.hook_scale"))
        a = fp.cache[f"blocks.{layer}.attn.hook_pattern"][:, :n, :n].to(dt)
        v = torch.einsum("kd,hde->hke", x, attn.W_V.to(dt)) + attn.b_V.to(dt)[:, None]
        out = torch.einsum("hqk,hke,hed->hqd", a, v, attn.W_O.to(dt))
        if drop and drop[0] == "head" and drop[1] == layer:
            h, p = drop[2], drop[3]
            lin = x - (block.ln1.b.to(dt) if cfg.normalization_type == "LN" else 0)
            out[h, p] -= a[h, p] @ lin @ attn.W_V[h].to(dt) @ attn.W_O[h].to(dt)
        resid = resid + out.sum(0) + attn.b_O.to(dt)
        if not cfg.attn_only:
            mlp = fp.cache[f"blocks.{layer}.hook_mlp_out"][:n].to(dt).clone()
            if drop and drop[0] == "mlp" and drop[1] == layer:
                mlp[drop[2]] = 0
            resid = resid + mlp
    final = norm(resid, getattr(m, "ln_final", None), fp.cache.get("ln_final.hook_scale"))
    return float(final[position] @ direction.to(dt))


def _node(graph, kind, layer=-1, head=-1, pos=0) -> int:
    hit = np.flatnonzero((graph.kind == kind) & (graph.layer == layer) & (graph.head == head)
                         & (graph.pos == pos))
    assert len(hit) == 1, (kind, layer, head, pos)
    return int(hit[0])


@pytest.mark.parametrize("which", ["tiny", "model_1l", "model_2l"])
def test_edges_into_target_sum_to_logit_minus_bias(which, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    graph = attribution_graph(lm, fp)
    into = graph.weight[graph.dst == graph.target].sum()
    assert abs(into - (graph.logit - graph.bias)) <= 1e-4
    assert abs(graph.value[graph.target] - (graph.logit - graph.bias)) <= 1e-12
    # the logit itself is TransformerLens' logit of the same weights
    with torch.no_grad():
        theirs = to_transformer_lens(lm)(tl_tokens(lm, TEXT))[0, -1, graph.target_id]
    assert abs(float(theirs) - graph.logit) <= 1e-4
    assert graph.target_id == int(fp.logits[-1].argmax())


@pytest.mark.parametrize("which", ["tiny", "tiny_ln", "model_2l"])
def test_flow_is_conserved_at_every_node(which, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    graph = attribution_graph(lm, fp, position=fp.n_tokens - 3)
    inflow, outflow = graph.inflow(), graph.outflow()
    scale = max(1.0, float(np.abs(graph.value).max()))
    heads = graph.kind == "head"
    sources = np.isin(graph.kind, ("token", "bias", "mlp", "ln_bias"))
    assert heads.any() and sources.any()
    assert np.abs(inflow[heads] - outflow[heads]).max() <= 1e-6 * scale
    assert np.abs(inflow[heads] - graph.value[heads]).max() <= 1e-4
    assert np.abs(outflow[sources] - graph.value[sources]).max() <= 1e-9 * scale
    assert (inflow[sources] == 0).all() and outflow[graph.target] == 0
    # every edge runs forward: from an earlier layer, from a key at or before the query
    later = graph.layer[graph.src] < graph.layer[graph.dst]
    assert (later | (graph.kind[graph.src] == "ln_bias")).all()
    assert (graph.pos[graph.src] <= graph.pos[graph.dst]).all()


@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
def test_graph_matches_a_frozen_forward_pass(which, request):
    """Σ edges into the target = a frozen-scale forward pass; removing a source node from that
    forward pass changes the target by exactly the node's value (the graph is linear)."""
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    p = fp.n_tokens - 2
    graph = attribution_graph(lm, fp, position=p, target=" Potter", contrast=" and")
    w_u = lm.model.W_U.detach().double()
    direction = w_u[:, graph.target_id] - w_u[:, graph.contrast_id]
    full = frozen_forward(lm, fp, p, direction)
    into = graph.weight[graph.dst == graph.target].sum()
    assert abs(full - into) <= 1e-4
    assert abs(full - (graph.logit - graph.bias)) <= 1e-4  # frozen = real on the prompt
    drops = [("token", 3), ("token", p), ("head", 0, 1, 5), ("head", 1, 2, p)]
    if not lm.cfg.attn_only:
        drops.append(("mlp", 0, 4))
    for drop in drops:
        if drop[0] == "token":
            node = _node(graph, "token", pos=drop[1])
        elif drop[0] == "head":
            node = _node(graph, "head", layer=drop[1], head=drop[2], pos=drop[3])
        else:
            node = _node(graph, "mlp", layer=drop[1], pos=drop[2])
        change = full - frozen_forward(lm, fp, p, direction, drop)
        assert abs(change - graph.value[node]) <= 1e-4, (drop, change, graph.value[node])
        assert abs(graph.value[node]) > 1e-6  # a real, non-zero contribution


def _circuit_tracer_prune(adjacency: torch.Tensor, n_features: int, n_tokens: int,
                          node_threshold: float, edge_threshold: float):
    """circuit-tracer 0.5.0's ``prune_graph`` (MIT), transcribed for a dense adjacency laid
    out [features, errors, tokens, logit] (rows: targets, columns: sources)."""
    def normalize(m):
        m = m.abs()
        return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)

    def influence(a, w):
        cur = w @ a
        total = cur
        while cur.any():
            cur = cur @ a
            total = total + cur
        return total

    def threshold(scores, t):
        s = torch.sort(scores, descending=True).values
        cum = torch.cumsum(s, dim=0) / torch.sum(s)
        return s[min(int(torch.searchsorted(cum, t).item()), len(cum) - 1)]

    w = torch.zeros(adjacency.shape[0], dtype=adjacency.dtype)
    w[-1] = 1.0
    node_inf = influence(normalize(adjacency), w)
    node_mask = node_inf >= threshold(node_inf, node_threshold)
    node_mask[-1 - n_tokens:] = True
    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm_p = normalize(pruned)
    edge_scores = norm_p * (influence(norm_p, w) + w)[:, None]
    edge_mask = edge_scores >= threshold(edge_scores.flatten(), edge_threshold)
    old = node_mask.clone()
    node_mask[: -1 - n_tokens] &= edge_mask[:, : -1 - n_tokens].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[: -1 - n_tokens] &= edge_mask[:, : -1 - n_tokens].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    return node_inf, node_mask, edge_mask


@pytest.mark.parametrize("which", ["tiny", "tiny_ln"])
def test_pruning_matches_circuit_tracer_and_keeps_everything_at_one(which, request):
    lm = request.getfixturevalue(which)
    fp = run_forward(lm, TEXT)
    graph = attribution_graph(lm, fp)
    everything = prune_graph(graph, 1.0, 1.0)
    assert everything.node_mask.all() and everything.edge_mask.all()
    # circuit-tracer's order: features (heads), errors (opaque sources), tokens, logit
    order = np.concatenate([np.flatnonzero(graph.kind == "head"),
                            np.flatnonzero(np.isin(graph.kind, ("bias", "mlp", "ln_bias"))),
                            np.flatnonzero(graph.kind == "token"), [graph.target]])
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    adjacency = torch.zeros(len(order), len(order), dtype=torch.float64)
    adjacency[where[graph.dst], where[graph.src]] = torch.as_tensor(graph.weight)
    n_features, n_tokens = int((graph.kind == "head").sum()), int((graph.kind == "token").sum())
    for node_t, edge_t in [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7)]:
        ours = prune_graph(graph, node_t, edge_t)
        inf, node_mask, edge_mask = _circuit_tracer_prune(adjacency, n_features, n_tokens,
                                                          node_t, edge_t)
        np.testing.assert_allclose(ours.influence[order], inf.numpy(), rtol=1e-9, atol=1e-12)
        assert (ours.node_mask[order] == node_mask.numpy()).all()
        dense_edges = edge_mask[where[graph.dst], where[graph.src]].numpy()
        assert (ours.edge_mask == dense_edges).all()
        assert 0 < ours.n_nodes < graph.n_nodes and 0 < ours.n_edges < len(graph.weight)
        # the definition: a kept node is a token, the target, or among the most influential
        # nodes that together make up node_t of the total influence
        ranked = np.sort(ours.influence)[::-1]
        share = np.cumsum(ranked) / ranked.sum()
        cut = ranked[np.searchsorted(share, node_t)]
        always = np.isin(graph.kind, ("token", "target"))
        assert (~ours.node_mask | always | (ours.influence >= cut)).all()
        assert ours.influence[ours.influence >= cut].sum() / ranked.sum() >= node_t - 1e-12
        assert ours.node_mask[graph.target] and ours.node_mask[graph.kind == "token"].all()


def test_circuit_tracer_graph_file_fields(tiny_ln):
    """The export carries every field of circuit-tracer 0.5.0's graph JSON (graph_models.py).

    circuit-tracer itself is not a test dependency: installing 0.5.0 next to our pins would
    replace transformer-lens 3.9.0 by 3.2.1, transformers 5.24.0 by 4.57.3, huggingface-hub
    2.4.0 by 0.36.2, tokenizers 0.23.3 by 0.22.2 (and fsspec, datasets), and add nnsight.
    Its pruning is transcribed in ``_circuit_tracer_prune`` above instead.
    """
    fp = run_forward(tiny_ln, TEXT)
    graph = attribution_graph(tiny_ln, fp)
    pruned = prune_graph(graph, 0.8, 0.98)
    data = json.loads(json.dumps(graph_json(graph, pruned, slug="tiny-graph", prompt=fp.text,
                                            model_name="tiny-ln", tokens=fp.tokens)))
    meta = data["metadata"]
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
            "schema_version"} <= set(meta)
    assert isinstance(meta["transcoder_list"], list)
    assert meta["prompt_tokens"] == list(fp.tokens)
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId",
                                    "sg_pos"}
    types = dict(node_id=str, feature=int, layer=str, ctx_idx=int, feature_type=str,
                 token_prob=float, is_target_logit=bool, run_idx=int, reverse_ctx_idx=int,
                 jsNodeId=str, clerp=str, influence=float, activation=float)
    for node in data["nodes"]:
        for key, typ in types.items():
            ok = isinstance(node[key], typ) or (typ is float and isinstance(node[key], int))
            assert ok, (key, node)
        assert node["feature_type"] in ("cross layer transcoder", "mlp reconstruction error",
                                        "embedding", "logit")
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == pruned.n_nodes
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 1 and logits[0]["is_target_logit"]
    assert logits[0]["layer"] == str(tiny_ln.cfg.n_layers + 1)
    assert "(p=" in logits[0]["clerp"] and logits[0]["clerp"].startswith('Output "')
    embeds = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert sorted(n["ctx_idx"] for n in embeds) == list(range(fp.n_tokens))
    assert all(n["node_id"] == f"E_{fp.token_ids[n['ctx_idx']]}_{n['ctx_idx']}" for n in embeds)
    heads = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert heads and all(n["node_id"] == f"{n['layer']}_{n['clerp'].split('H')[1].split()[0]}"
                         f"_{n['ctx_idx']}" for n in heads)
    assert len(data["links"]) == pruned.n_edges
    assert all(set(link) == {"source", "target", "weight"} for link in data["links"])
    assert {link["source"] for link in data["links"]} | {link["target"] for link in
                                                         data["links"]} <= set(ids)


def test_bad_input(model_2l):
    fp = run_forward(model_2l, TEXT)
    graph = attribution_graph(model_2l, fp)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(AnalysisError, match="threshold"):
            prune_graph(graph, bad, 0.9)
        with pytest.raises(AnalysisError, match="threshold"):
            prune_graph(graph, 0.8, bad)
    with pytest.raises(AnalysisError, match="not a single token"):
        attribution_graph(model_2l, fp, target=" Hermione Granger")
    with pytest.raises(AnalysisError, match="contrast token is the target"):
        attribution_graph(model_2l, fp, target=" and", contrast=" and")
    with pytest.raises(AnalysisError, match="outside the prompt"):
        attribution_graph(model_2l, fp, position=fp.n_tokens)


def test_rotary_rms_gated_parallel_model(tiny_tokenizer):
    """Rotary positions, RMSNorm, gated parallel MLPs: the graph still adds up exactly."""
    from conftest import make_tiny

    lm = make_tiny(tiny_tokenizer, seed=4, attn_only=False, d_mlp=48, act_fn="silu",
                   gated_mlp=True, parallel_attn_mlp=True, normalization_type="RMS",
                   positional_embedding_type="rotary", name="tiny-llama-like")
    fp = run_forward(lm, TEXT)
    graph = attribution_graph(lm, fp)
    assert abs(graph.weight[graph.dst == graph.target].sum() - (graph.logit - graph.bias)) <= 1e-4
    heads = graph.kind == "head"
    assert np.abs(graph.inflow()[heads] - graph.outflow()[heads]).max() <= 1e-6
    assert "ln_bias" not in set(graph.kind) and "mlp" in set(graph.kind)


def test_graphs_over_the_edge_budget_are_refused_before_any_work(model_2l, monkeypatch):
    from attention_lens.analysis.graph import budget as G
    from attention_lens.model.shapes import GPT2_SHAPE
    from attention_lens.model import ModelConfig

    # GPT-2 small: 309 M edges at position 255 (about 17 GB to build and prune) are refused
    big = ModelConfig(**GPT2_SHAPE)
    reach = G.largest_position(big, 256)
    assert G.estimated_edges(big, reach + 1) <= G.MAX_EDGES < G.estimated_edges(big, reach + 2)
    with pytest.raises(AnalysisError, match=f"reaches position {reach}"):
        G.check_size(big, 256)
    G.check_size(big, reach + 1)
    # on a shipped model a small budget refuses the late positions and the default moves
    fp = run_forward(model_2l, TEXT)
    graph = attribution_graph(model_2l, fp)
    assert G.estimated_edges(model_2l.cfg, fp.n_tokens) == len(graph.weight)
    monkeypatch.setattr(G, "MAX_EDGES", G.estimated_edges(model_2l.cfg, 10))
    assert G.largest_position(model_2l.cfg, fp.n_tokens) == 9
    with pytest.raises(AnalysisError, match="choose a position up to 9"):
        attribution_graph(model_2l, fp)
    assert G.default_position(fp, 9) <= 9
    assert attribution_graph(model_2l, fp, position=9).position == 9
