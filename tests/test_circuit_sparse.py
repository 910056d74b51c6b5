"""Sparse masked runs (analysis/circuit/sparse.py): only the components a circuit's kept edges
reach are computed, the others read from the run with every edge ablated. They must equal the
full masked run of the edge engine: to float64 rounding on float64 copies of the models, and
within float32 rounding on the models themselves, on the shipped attention-only model, a
LayerNorm/GELU model, a Llama-style model (grouped-query attention, rotary, RMSNorm, SwiGLU)
and a NeoX-style one (parallel attention and MLP, partial rotary)."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from conftest import make_tiny

from attention_lens.analysis import patching as PT
from attention_lens.analysis.circuit import ABLATIONS, Problem, circuit, circuit_metrics
from attention_lens.analysis.circuit.sparse import SparseRuns, one_thread, plan
from attention_lens.model import LoadedModel

FAMILIES = {
    "gpt2-like": dict(seed=1, attn_only=False, d_mlp=64, act_fn="gelu",
                      normalization_type="LN"),
    "llama-gqa": dict(seed=2, n_layers=3, attn_only=False, d_mlp=48, act_fn="silu",
                      gated_mlp=True, normalization_type="RMS",
                      positional_embedding_type="rotary"),
    "neox": dict(seed=3, n_layers=3, attn_only=False, d_mlp=64, act_fn="gelu",
                 normalization_type="LN", parallel_attn_mlp=True,
                 positional_embedding_type="rotary", rotary_dim=4),
}


def _pair(vocab: int, seed: int = 0, n: int = 12) -> PT.PromptPair:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, n).tolist()
    corrupted = list(clean)
    for p in (3, n - 4):
        corrupted[p] = (corrupted[p] + 7 + seed) % vocab
    return PT.PromptPair(clean, corrupted, 5, 9)


def _model(which: str, tiny_tokenizer, model_2l) -> LoadedModel:
    if which == "attn-only-2l":
        return model_2l
    lm = make_tiny(tiny_tokenizer, name=which, **FAMILIES[which])
    if which == "llama-gqa":  # 4 query heads sharing 2 key/value heads, as a GGUF Llama
        with torch.no_grad():
            for blk in lm.model.blocks:
                a = blk.attn
                for w in (a.W_K, a.W_V, a.b_K, a.b_V):
                    w[1], w[3] = w[0].clone(), w[2].clone()
    return lm


def _double(lm: LoadedModel) -> LoadedModel:
    return LoadedModel(name=lm.name + "-f64", model=copy.deepcopy(lm.model).double(),
                       tokenizer=lm.tokenizer)


def _masks(prob: Problem, seed: int = 0) -> np.ndarray:
    """Empty, full, random circuits from very sparse to dense, and top-k circuits."""
    E = prob.graph.n_edges
    rng = np.random.default_rng(seed)
    dens = np.array([0.002, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9])[:, None]
    rand = rng.random((len(dens), E)) < dens
    scores = rng.normal(size=E)
    tops = np.stack([circuit(prob.graph, scores, k) for k in (3, 30, E // 3)])
    return np.concatenate([np.zeros((1, E), bool), np.ones((1, E), bool), rand, tops])


def _rows(prob: Problem, ablation: str, masks: np.ndarray) -> tuple[torch.Tensor, ...]:
    p = prob.pairs[0]
    abl = prob.ablated(p, ablation)
    x = p.clean_acts[0]
    with torch.no_grad():
        dense = p.engine.run(x.expand(len(masks), -1, -1), abl,
                             torch.as_tensor(masks, dtype=x.dtype))
    runs = SparseRuns(p.engine, x, abl)
    sparse = torch.stack([runs.run(m) for m in masks])
    return dense, sparse


@pytest.mark.parametrize("which", ["attn-only-2l", *FAMILIES])
def test_sparse_runs_equal_full_masked_runs(which, tiny_tokenizer, model_2l):
    lm = _model(which, tiny_tokenizer, model_2l)
    pairs = [_pair(lm.cfg.d_vocab), _pair(lm.cfg.d_vocab, seed=4)]
    # float32: each path sums a receiver's U sender terms in its own order, a rounding of
    # about U * 2^-24 of the largest term (U <= 25 here), taken 4 times over
    for model, rel in ((_double(lm), 1e-10), (lm, 4 * 25 * 2 ** -24)):
        prob = Problem(model, pairs[:1], "logit_diff", -1, "resample")
        masks = _masks(prob)
        with one_thread():  # many small runs (as circuit_metrics makes them)
            for ablation in ABLATIONS:
                dense, sparse = _rows(prob, ablation, masks)
                err = float((dense - sparse).abs().max()) / float(dense.abs().max())
                assert err <= rel, (which, model.name, ablation, err)
    # the metric through circuit_metrics either way, over two pairs (float64)
    prob = Problem(_double(lm), pairs, "logit_diff", -1, "mean")
    masks = _masks(prob, seed=1)
    both = [circuit_metrics(prob, masks, sparse=s) for s in (True, False)]
    assert np.abs(both[0] - both[1]).max() <= 1e-9 * max(1.0, float(np.abs(both[1]).max()))


def test_only_reached_components_are_computed(tiny_tokenizer, model_2l):
    """A circuit computes a head or MLP only when it keeps an edge into it and a path of kept
    edges leads from it to the logits; the full circuit computes every component."""
    lm = _model("llama-gqa", tiny_tokenizer, model_2l)
    prob = Problem(lm, [_pair(lm.cfg.d_vocab)], "logit_diff", -1, "zero")
    g, eng = prob.graph, prob.pairs[0].engine
    E = g.n_edges
    full = plan(eng, np.ones(E, bool))
    assert full.n_heads == g.n_layers * g.n_heads and full.n_mlps == g.n_layers
    assert plan(eng, np.zeros(E, bool)).n_heads == 0
    first, U = g.logits_block()
    keep = np.zeros(E, bool)
    keep[first:first + U] = True  # every edge into the logits only
    pl = plan(eng, keep)
    assert pl.n_heads == 0 and pl.n_mlps == 0
    # an edge into L1H2's query from the input, but nothing from L1H2 onwards: not computed
    a_first, U1 = g.attn_block(1)
    keep = np.zeros(E, bool)
    keep[a_first + 2 * U1 + 0] = True
    assert plan(eng, keep).n_heads == 0
    # ... and once L1H2 -> logits is kept, it is computed (and only it)
    keep[first + g.head_sender(1, 2)] = True
    pl = plan(eng, keep)
    assert [list(h) for h in pl.heads] == [[], [2], []] and pl.n_mlps == 0
    # with zero ablation, a kept edge from a component not computed still carries its output
    # in the ablated run (not zero): both paths agree
    keep[first + g.mlp_sender(0)] = True
    both = [circuit_metrics(prob, keep[None], sparse=s)[0] for s in (True, False)]
    assert abs(both[0] - both[1]) <= 1e-5 * max(1.0, abs(both[1]))


def test_the_same_circuit_twice_is_run_once(tiny_tokenizer, model_2l):
    lm = _model("gpt2-like", tiny_tokenizer, model_2l)
    prob = Problem(lm, [_pair(lm.cfg.d_vocab)], "logit_diff", -1, "mean")
    E = prob.graph.n_edges
    rng = np.random.default_rng(1)
    a, b = rng.random(E) < 0.3, rng.random(E) < 0.5
    calls = []
    out = circuit_metrics(prob, np.stack([a, b, a, a, b]),
                          progress=lambda done, total: calls.append((done, total)))
    assert out[0] == out[2] == out[3] and out[1] == out[4]
    assert calls[-1] == (2, 2)


@pytest.mark.parametrize("which", ["attn-only-2l", "llama-gqa"])
def test_answered_pair_reads_the_models_last_logits(which, tiny_tokenizer, model_2l,
                                                   monkeypatch):
    """answered_pair unembeds only the last row: the same logits as the model's forward
    pass, and the same choice as the full logits give, on a pair the model answers (its own
    top answer on the clean prompt; on the corrupted one, the answer it puts above it)."""
    from attention_lens.analysis import defaults as D

    lm = _model(which, tiny_tokenizer, model_2l)
    tok = lm.tokenizer
    clean, corrupted = "Harry Potter went to the shop, and Harry", \
        "Harry Potter went to the shop, and Dursley"
    a, b = tok.encode(clean), tok.encode(corrupted)
    if len(a) != len(b):  # one length in this tokenizer
        corrupted = clean[:-5] + "Harry"
        b = list(a)
        b[-3] = (b[-3] + 1) % lm.cfg.d_vocab
        corrupted = tok.decode(b)
        b = tok.encode(corrupted)
    assert len(a) == len(b)
    mine = D._last_logits(lm, [a, b])
    with torch.no_grad():
        full = lm.model(torch.tensor([a, b]))[:, -1].double()
    assert float((mine - full).abs().max()) <= 1e-5 * float(full.abs().max())
    # answers of one token each that round-trip through the tokenizer
    order = torch.argsort(full[0], descending=True).tolist()
    ok = [t for t in order if tok.encode(tok.decode([t])) == [t]]
    c = ok[0]
    beats = [t for t in ok[1:] if full[1, t] > full[1, c]]
    if which != "attn-only-2l":
        return  # a random model: its logits only
    assert int(full[0].argmax()) == c and beats
    w = beats[0]
    example = ("a test pair", clean, corrupted, tok.decode([c]), tok.decode([w]))
    monkeypatch.setattr(D, "PAIR_EXAMPLES", (example,))
    monkeypatch.setattr(D, "_ANSWERED", weakref.WeakKeyDictionary())  # no earlier answer
    pair = D.answered_pair(lm)
    assert pair is not None and (pair.correct, pair.wrong) == example[3:]
    probs = full.softmax(-1)
    assert f"p = {float(probs[0, c]):.2f} on the clean" in pair.reason
    # a pair the model does not answer (the wrong answer on top) is passed over
    monkeypatch.setattr(D, "PAIR_EXAMPLES", ((*example[:3], example[4], example[3]),))
    monkeypatch.setattr(D, "_ANSWERED", weakref.WeakKeyDictionary())
    assert D.answered_pair(lm) is None


def test_the_curve_is_sized_from_sparse_costs(model_2l):
    """The curve's estimated work counts each circuit at what its sparse run computes: a
    SmolLM2-shaped model (30 layers of 9 heads, rotary, RMSNorm, SwiGLU; 123,211 edges) at 14
    tokens gets a curve within the budget, larger than the 6 x 4 the full-run estimate
    allowed, stated with its work; the shipped model keeps the default 20 x 20."""
    from attention_lens.analysis.circuit.discovery import (
        CURVE_FLOP,
        DEFAULT_RANDOM,
        DEFAULT_SIZES,
        curve_runs,
        curve_size,
        curve_work,
    )
    from attention_lens.analysis.circuit.sparse import masked_run_flop
    from attention_lens.model import ModelConfig

    smol = ModelConfig(n_layers=30, d_model=576, n_heads=9, d_head=64, n_ctx=2048,
                       d_vocab=49152, attn_only=False, d_mlp=1536, act_fn="silu",
                       gated_mlp=True, normalization_type="RMS",
                       positional_embedding_type="rotary", rotary_base=100000.0)
    assert edge_graph_edges(smol) == 123_211
    sizes, rand, work = curve_size(smol, [14])
    assert work <= CURVE_FLOP and (sizes, rand) != (DEFAULT_SIZES, DEFAULT_RANDOM)
    assert sizes * (1 + rand) > 6 * (1 + 4)
    # every circuit costs at most a full run: never above the old estimate
    for s, r in ((6, 4), (sizes, rand), (20, 20)):
        assert curve_work(smol, 14, s, r) <= curve_runs(s, r) * masked_run_flop(smol, 14)
    assert curve_work(smol, 14, 20, 20) > curve_work(smol, 14, 20, 10) > \
        curve_work(smol, 14, 10, 10)
    assert curve_size(model_2l.cfg, [128])[:2] == (DEFAULT_SIZES, DEFAULT_RANDOM)


def edge_graph_edges(cfg) -> int:
    from attention_lens.analysis.circuit import edge_graph

    return edge_graph(cfg).n_edges
