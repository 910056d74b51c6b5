"""Edge-level circuit discovery: the edge engine, EAP / EAP-IG / exact edge patching, circuit
search and faithfulness, checked against TransformerLens 3.9 hooks and identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from tl_oracle import to_transformer_lens

from attention_lens.analysis import patching as PT
from attention_lens.analysis.circuit import (
    ABLATIONS,
    Problem,
    circuit,
    circuit_metrics,
    edge_graph,
    edge_scores,
    faithfulness_curve,
    prune,
    top_k,
)
from attention_lens.analysis.errors import AnalysisError


def _pair(seed: int = 0, n: int = 12, vocab: int = 300) -> PT.PromptPair:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, n).tolist()
    corrupted = list(clean)
    for p in (3, n - 4):
        corrupted[p] = (corrupted[p] + 7 + seed) % vocab
    return PT.PromptPair(clean, corrupted, 5, 9)


@pytest.fixture
def tiny_mlp(tiny_tokenizer):
    """Two layers with LayerNorm and GELU MLPs."""
    return make_tiny(tiny_tokenizer, seed=1, attn_only=False, d_mlp=64, act_fn="gelu",
                     normalization_type="LN", name="tiny-ln")


# ------------------------------------------------------------------ TransformerLens oracle
def _tl_model(lm):
    tl = to_transformer_lens(lm)
    tl.set_use_split_qkv_input(True)
    tl.set_use_attn_result(True)
    if not lm.cfg.attn_only:
        tl.set_use_hook_mlp_in(True)
    return tl


def _tl_senders(tl, tokens, fwd_hooks=()):
    """Every sender's activation [S, n, d] in our order, with TransformerLens hooks."""
    cfg = tl.cfg
    store = {}

    def save(x, hook):
        store[hook.name] = x.detach()[0]

    names = ["hook_embed", "hook_pos_embed"] + [
        f"blocks.{l}.{h}" for l in range(cfg.n_layers)
        for h in ("attn.hook_result", "hook_mlp_out")[:1 if cfg.attn_only else 2]]
    with torch.no_grad():
        tl.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, *[(n, save) for n in names]])
    out = [store["hook_embed"] + store["hook_pos_embed"]]
    for l in range(cfg.n_layers):
        out += list(store[f"blocks.{l}.attn.hook_result"].unbind(1))
        if not cfg.attn_only:
            out.append(store[f"blocks.{l}.hook_mlp_out"])
    return torch.stack(out)


def tl_eap(lm, pair: PT.PromptPair, metric, by_position: bool = False) -> np.ndarray:
    """EAP written with TransformerLens hooks: (a_s(corrupted) − a_s(clean)) · ∂m/∂(input of
    r) on the clean run, for every edge in our graph's order ([E]; [E, n] by position: the
    product summed over the model dimension only)."""
    tl = _tl_model(lm)
    cfg, g = tl.cfg, edge_graph(lm.cfg)
    clean = torch.tensor([pair.clean])
    diff = _tl_senders(tl, torch.tensor([pair.corrupted])) - _tl_senders(tl, clean)
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.detach()[0]

    bwd = [f"blocks.{l}.hook_{c}_input" for l in range(cfg.n_layers) for c in "qkv"]
    if not cfg.attn_only:
        bwd += [f"blocks.{l}.hook_mlp_in" for l in range(cfg.n_layers)]
    bwd.append(f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    for name in bwd:
        tl.add_hook(name, keep, dir="bwd")
    try:
        logits = tl(clean)
        metric(logits[0, -1]).backward()
    finally:
        tl.reset_hooks()
    out = np.zeros((g.n_edges, len(pair.clean)))
    for e in range(g.n_edges):
        s, name = int(g.src[e]), g.receivers[g.dst[e]]
        if name == "logits":
            grad = grads[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
        elif name.startswith("MLP"):
            grad = grads[f"blocks.{name[3:]}.hook_mlp_in"]
        else:
            layer, rest = name[1:].split("H")
            head, c = rest.split(".")
            grad = grads[f"blocks.{layer}.hook_{c}_input"][:, int(head)]
        out[e] = (diff[s].double() * grad.double()).sum(-1).numpy()
    return out if by_position else out.sum(1)


def tl_circuit_metric(lm, pair: PT.PromptPair, keep: np.ndarray, ablated: torch.Tensor,
                      metric, tl=None) -> float:
    """The clean run with every edge outside ``keep`` ablated, written with explicit
    TransformerLens hooks on each receiver's own input."""
    tl = tl or _tl_model(lm)
    cfg, g = tl.cfg, edge_graph(lm.cfg)
    acts: dict[int, torch.Tensor] = {}
    b_O = [tl.blocks[l].attn.b_O.detach() for l in range(cfg.n_layers)]
    per = cfg.n_heads + (0 if cfg.attn_only else 1)

    def record_embed(x, hook):
        acts[0] = x[0] if 0 not in acts else acts[0] + x[0]

    def record_result(x, hook):
        layer = int(hook.name.split(".")[1])
        for h in range(cfg.n_heads):
            acts[1 + layer * per + h] = x[0, :, h]

    def record_mlp(x, hook):
        acts[1 + int(hook.name.split(".")[1]) * per + cfg.n_heads] = x[0]

    def mixed(r: int, bias: torch.Tensor) -> torch.Tensor:
        into = np.nonzero(g.dst == r)[0]
        total = bias.clone()
        for e in into:
            s = int(g.src[e])
            total = total + (acts[s] if keep[e] else ablated[s])
        return total

    def qkv_input(x, hook):
        layer, c = int(hook.name.split(".")[1]), hook.name.split("_")[-2]
        bias = sum(b_O[:layer], torch.zeros(cfg.d_model))
        out = x.clone()
        for h in range(cfg.n_heads):
            r = g.receivers.index(f"L{layer}H{h}.{c}")
            out[0, :, h] = mixed(r, bias)
        return out

    def mlp_input(x, hook):
        layer = int(hook.name.split(".")[1])
        return mixed(g.receivers.index(f"MLP{layer}"), sum(b_O[:layer + 1]))[None]

    def final(x, hook):
        return mixed(len(g.receivers) - 1, sum(b_O))[None]

    hooks = [("hook_embed", record_embed), ("hook_pos_embed", record_embed)]
    for layer in range(cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_{c}_input", qkv_input) for c in "qkv"]
        hooks.append((f"blocks.{layer}.attn.hook_result", record_result))
        if not cfg.attn_only:
            hooks += [(f"blocks.{layer}.hook_mlp_in", mlp_input),
                      (f"blocks.{layer}.hook_mlp_out", record_mlp)]
    hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", final))
    with torch.no_grad():
        logits = tl.run_with_hooks(torch.tensor([pair.clean]), fwd_hooks=hooks)
    return float(metric(logits[0, -1]))


# ------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("which", ["tiny", "tiny_mlp", "model_2l"])
def test_engine_is_the_model(which, request):
    """Every edge kept (unmasked, or a mask of ones) reproduces the model's logits, and the
    sender activations equal TransformerLens' hook_embed + hook_pos_embed, hook_result and
    hook_mlp_out."""
    lm = request.getfixturevalue(which)
    pair = _pair(vocab=lm.cfg.d_vocab)
    prob = Problem(lm, [pair], "logit_diff", -1, "resample")
    p = prob.pairs[0]
    eng = p.engine
    with torch.no_grad():
        ref = lm.model(torch.tensor([pair.clean]))[0, -1]
        plain = eng.logits(eng.run(p.clean_acts[:1], p.corrupted_acts))[0]
        ones = torch.ones(1, prob.graph.n_edges)
        masked = eng.logits(eng.run(p.clean_acts[:1], p.corrupted_acts, ones))[0]
    scale = max(1.0, float(ref.abs().max()))
    assert float((plain - ref).abs().max()) <= 1e-5 * scale
    assert float((masked - ref).abs().max()) <= 1e-5 * scale
    theirs = _tl_senders(_tl_model(lm), torch.tensor([pair.clean]))
    assert theirs.shape == p.clean_acts.shape
    assert float((theirs - p.clean_acts).abs().max()) <= 1e-5 * max(
        1.0, float(theirs.abs().max()))


def test_graph_counts(tiny_mlp, model_2l):
    """Edges: every sender into every later receiver (heads' q, k, v; MLPs; logits)."""
    g = edge_graph(model_2l.cfg)
    H = 12
    assert g.n_senders == 1 + 2 * H
    assert g.n_edges == 3 * H * 1 + 3 * H * (1 + H) + (1 + 2 * H)
    g2 = edge_graph(tiny_mlp.cfg)
    H, per = 4, 5
    # layer 0: qkv from the input, MLP0 from input + heads; layer 1: from all of layer 0
    assert g2.n_edges == 3 * H * 1 + (1 + H) + 3 * H * (1 + per) + (1 + per + H) + (1 + 2 * per)
    for e in range(g2.n_edges):  # every edge goes forwards
        assert g2.sender_layer[g2.src[e]] <= g2.receiver_layer[g2.dst[e]]


# -------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("which", ["tiny", "tiny_mlp", "model_2l"])
def test_eap_equals_transformer_lens(which, request):
    """EAP equals gradient × difference computed independently with TransformerLens hooks
    (split q/k/v inputs, hook_result, hook_mlp_in), within 1e-4."""
    lm = request.getfixturevalue(which)
    pair = _pair(seed=2, vocab=lm.cfg.d_vocab)
    res = edge_scores(lm, [pair], method="eap")
    metric = Problem(lm, [pair], "logit_diff", -1, "resample").pairs[0].metric
    theirs_by_pos = tl_eap(lm, pair, metric, by_position=True)
    theirs = theirs_by_pos.sum(1)
    assert np.abs(theirs).max() > 1e-3  # something to compare
    np.testing.assert_allclose(res.scores, theirs, atol=1e-4 * max(1, np.abs(theirs).max()))
    # per position (gradient × difference without the sum over positions), and those add
    # up to the summed scores
    assert res.by_position.shape == theirs_by_pos.shape
    np.testing.assert_allclose(res.by_position, theirs_by_pos,
                               atol=1e-4 * max(1, np.abs(theirs_by_pos).max()))
    assert (np.abs(theirs_by_pos) > 1e-3).sum(1).max() > 1  # edges spread over positions
    np.testing.assert_allclose(res.by_position.sum(1), res.scores, atol=1e-9)


@pytest.mark.parametrize("which", ["tiny", "model_2l"])
def test_eap_is_exact_where_the_metric_is_linear(which, request):
    """Attention-only, no LayerNorm: the logit difference is linear in the logits' input and,
    with the last layer's patterns fixed, in its heads' value inputs: there EAP equals exact
    edge patching. Elsewhere it does not (the check could fail)."""
    lm = request.getfixturevalue(which)
    pair = _pair(seed=3, vocab=lm.cfg.d_vocab)
    prob = Problem(lm, [pair], "logit_diff", -1, "resample")
    eap = edge_scores(lm, [pair], method="eap", problem=prob).scores
    exact = edge_scores(lm, [pair], method="exact", problem=prob).scores
    g = prob.graph
    names = np.array([g.receivers[r] for r in g.dst])
    last = g.n_layers - 1
    linear = (names == "logits") | np.array([n.startswith(f"L{last}H") and n.endswith(".v")
                                            for n in names])
    scale = max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(eap[linear], exact[linear], atol=2e-5 * scale)
    assert np.abs(exact[linear]).max() > 1e-3
    # elsewhere the metric is not linear, and the check could fail
    assert np.abs(eap[~linear] - exact[~linear]).max() > 10 * np.abs(
        eap[linear] - exact[linear]).max()


def test_exact_edge_patching_by_hand(tiny_mlp):
    """One edge patched alone equals that circuit (every other edge kept) evaluated with
    explicit TransformerLens hooks, minus the clean metric."""
    pair = _pair(seed=4)
    prob = Problem(tiny_mlp, [pair], "logit_diff", -1, "resample")
    exact = edge_scores(tiny_mlp, [pair], method="exact", problem=prob).scores
    p = prob.pairs[0]
    g = prob.graph
    for e in [int(np.argmax(np.abs(exact))), 0, g.n_edges - 1, g.n_edges // 2]:
        keep = np.ones(g.n_edges, bool)
        keep[e] = False
        want = tl_circuit_metric(tiny_mlp, pair, keep, p.corrupted_acts, p.metric)
        assert abs(exact[e] - (want - p.clean_metric)) <= 1e-4 * max(1, abs(want))


def test_eap_ig(tiny_mlp):
    """EAP-IG: one step is EAP; the input node's edges are complete (they add up to
    m(ablated input) − m(clean)) up to a Riemann error that shrinks as the steps grow."""
    pair = _pair(seed=1)
    prob = Problem(tiny_mlp, [pair], "logit_diff", -1, "resample")
    eap = edge_scores(tiny_mlp, [pair], method="eap", problem=prob).scores
    one = edge_scores(tiny_mlp, [pair], method="eap_ig", steps=1, problem=prob).scores
    np.testing.assert_allclose(one, eap, atol=1e-9)
    p = prob.pairs[0]
    target = p.corrupted_metric - p.clean_metric
    inp = prob.graph.src == 0
    errors = []
    for steps in (1, 4, 16, 64):
        res = edge_scores(tiny_mlp, [pair], method="eap_ig", steps=steps, problem=prob)
        ig = res.scores
        np.testing.assert_allclose(res.by_position.sum(1), ig, atol=1e-9)
        errors.append(abs(ig[inp].sum() - target))
    assert errors[0] > 0.05 * abs(target)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 * abs(target)


def test_exact_refuses_big_models(tiny_tokenizer):
    """A GPT-2-small shape is refused for exact edge patching, with the size it would take,
    before any forward pass (its weights are never initialised)."""
    from attention_lens.model import HookedTransformer, LoadedModel, ModelConfig

    cfg = ModelConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, n_ctx=64,
                      d_vocab=tiny_tokenizer.vocab_size, attn_only=False, d_mlp=3072,
                      act_fn="gelu", normalization_type="LN", name="big")
    lm = LoadedModel(name="big", model=HookedTransformer(cfg), tokenizer=tiny_tokenizer)
    with pytest.raises(AnalysisError, match=r"32,\d{3} edges.*TFLOP.*use EAP"):
        edge_scores(lm, [_pair(n=60)], method="exact")


# ------------------------------------------------------------------ circuits, faithfulness
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_circuit_equals_explicit_hooks(tiny_mlp, ablation):
    """A circuit evaluated by the engine equals the same circuit with TransformerLens hooks
    that rebuild each receiver's input from its kept edges and ablated values."""
    pairs = [_pair(seed=5), _pair(seed=6)]
    prob = Problem(tiny_mlp, pairs, "logit_diff", -1, ablation)
    g = prob.graph
    rng = np.random.default_rng(0)
    masks = rng.random((3, g.n_edges)) < np.array([[0.2], [0.6], [0.9]])
    ours = circuit_metrics(prob, masks)
    for i, keep in enumerate(masks):
        want = np.mean([tl_circuit_metric(tiny_mlp, pair, keep, prob.ablated(p), p.metric)
                        for pair, p in zip(pairs, prob.pairs)])
        assert abs(ours[i] - want) <= 1e-4 * max(1, abs(want))


@pytest.mark.parametrize("which", ["tiny", "tiny_mlp"])
def test_faithfulness_bounds(which, request):
    """Every edge kept: faithfulness 1 (the clean metric); none kept: 0 and the ablated
    baseline (resample: the corrupted run exactly), on every ablation."""
    lm = request.getfixturevalue(which)
    pair = _pair(seed=7, vocab=lm.cfg.d_vocab)
    prob = Problem(lm, [pair], "logit_diff", -1, "resample")
    scores = edge_scores(lm, [pair], method="eap", problem=prob).scores
    curve = faithfulness_curve(prob, scores, n_sizes=6, n_random=3)
    p = prob.pairs[0]
    E = prob.graph.n_edges
    assert curve.k[-1] == E and curve.sizes[-1] == E
    for a, ablation in enumerate(curve.ablations):
        assert abs(curve.full_metric[a] - p.clean_metric) <= 1e-5 * max(1, abs(p.clean_metric))
        assert abs(curve.faithfulness[a, -1] - 1) <= 1e-6
        assert abs(curve.ratio[a, -1] - 1) <= 1e-6
        # the same edges in another row of the batch (float32: 1e-5 of a normalised ratio)
        np.testing.assert_allclose(curve.random[a, -1], 1, atol=1e-5)
        empty = circuit_metrics(prob, np.zeros((1, E), bool), ablation)[0]
        assert abs(curve.empty_metric[a] - empty) <= 1e-9
        assert abs(curve.faithfulness[a][curve.sizes == 0] - 0).max(initial=0) <= 1e-9
    res = curve.ablations.index("resample")
    assert abs(curve.empty_metric[res] - p.corrupted_metric) <= 1e-4 * max(
        1, abs(p.corrupted_metric))


def test_prune_keeps_paths_only(tiny_mlp):
    """Pruning keeps exactly the edges on a path input -> ... -> logits."""
    g = edge_graph(tiny_mlp.cfg)
    name = {lab: e for e, lab in enumerate(g.edge_labels())}
    keep = np.zeros(g.n_edges, bool)
    path = ["input -> L0H1.k", "L0H1 -> L1H2.q", "L1H2 -> logits"]
    dead = ["L0H3 -> L1H0.v", "input -> L1H1.q", "L0H0 -> MLP0"]
    for lab in path + dead:
        keep[name[lab]] = True
    kept = prune(g, keep)
    assert sorted(g.edge_label(e) for e in np.nonzero(kept)[0]) == sorted(path)
    assert prune(g, kept).tolist() == kept.tolist()  # idempotent
    assert prune(g, np.ones(g.n_edges, bool)).all()


def test_top_k_and_bad_input(tiny_mlp):
    """Top-k by |score|; bad input is an AnalysisError that says what is wrong."""
    scores = np.array([0.1, -3.0, 2.0, 0.0])
    assert top_k(scores, 2).tolist() == [False, True, True, False]
    g = edge_graph(tiny_mlp.cfg)
    with pytest.raises(AnalysisError, match=f"from 0 to {g.n_edges}"):
        circuit(g, np.zeros(g.n_edges), g.n_edges + 1)
    with pytest.raises(AnalysisError, match="from 0 to"):
        circuit(g, np.zeros(g.n_edges), -1)
    short = PT.PromptPair([1, 2, 3, 4], [1, 2, 3], 5, 9)
    with pytest.raises(AnalysisError, match="same token length"):
        edge_scores(tiny_mlp, [short])
    with pytest.raises(AnalysisError, match="ablation must be one of resample, mean, zero"):
        edge_scores(tiny_mlp, [_pair()], ablation="half")
    with pytest.raises(AnalysisError, match="method must be one of"):
        edge_scores(tiny_mlp, [_pair()], method="acdc++")
    with pytest.raises(AnalysisError, match="steps must be a whole number from 1"):
        edge_scores(tiny_mlp, [_pair()], method="eap_ig", steps=0)
    with pytest.raises(AnalysisError, match="pair 2: .*same token length"):
        edge_scores(tiny_mlp, [_pair(), short])
    with pytest.raises(AnalysisError, match="mean ablation .* same position"):
        Problem(tiny_mlp, [_pair(n=12), _pair(n=10)], "logit_diff", -1, "mean")


def test_induction_circuit_on_the_shipped_model(model_2l):
    """On the default /patching pair, the top edges are the induction circuit: the
    previous-token head L0H2 feeding layer-1 induction heads' keys, those heads into the
    logits; and a few edges already reach 80 % faithfulness, far fewer than random ones."""
    pair = PT.PromptPair(PT.DEFAULT_CLEAN, PT.DEFAULT_CORRUPTED, PT.DEFAULT_CORRECT,
                         PT.DEFAULT_WRONG)
    prob = Problem(model_2l, [pair], "logit_diff", -1, "resample")
    res = edge_scores(model_2l, [pair], method="eap", problem=prob)
    g = prob.graph
    kept = circuit(g, res.scores, 12)
    labels = {g.edge_label(e) for e in np.nonzero(kept)[0]}
    assert "L0H2 -> L1H5.k" in labels and "L0H2 -> L1H6.k" in labels
    assert {"L1H5 -> logits", "L1H6 -> logits"} <= labels
    curve = faithfulness_curve(prob, res.scores, ablations=("resample",), n_sizes=12,
                               n_random=5)
    reach = curve.edges_to_reach(0.8)
    assert reach is not None and reach <= 20
    rand = curve.edges_to_reach(0.8, random=True)
    assert rand is None or rand > 5 * reach


@pytest.mark.parametrize("method", ["eap", "exact"])
def test_progress_reaches_the_end(tiny_mlp, method):
    """Progress is reported in steps that grow to the total (per layer for EAP, per batch of
    patched runs for exact edge patching)."""
    seen = []
    edge_scores(tiny_mlp, [_pair(seed=1), _pair(seed=2)], method=method,
                progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 4
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1


def test_acdc_matches_a_hook_replay(tiny):
    """Greedy removal equals the same greedy loop replayed with TransformerLens hooks
    (each trial circuit evaluated by explicit receiver-input hooks); a threshold of 0 keeps
    every edge that matters, an infinite one keeps none."""
    from attention_lens.analysis.circuit import acdc

    pair = _pair(seed=8, vocab=tiny.cfg.d_vocab)
    prob = Problem(tiny, [pair], "logit_diff", -1, "resample")
    p, g = prob.pairs[0], prob.graph
    tl = _tl_model(tiny)

    def replay(threshold: float) -> tuple[np.ndarray, float]:
        keep = np.ones(g.n_edges, bool)
        current = tl_circuit_metric(tiny, pair, keep, p.corrupted_acts, p.metric, tl)
        margin = np.inf
        for e in sorted(range(g.n_edges), key=lambda e: (-g.dst[e], -g.src[e])):
            keep[e] = False
            trial = tl_circuit_metric(tiny, pair, keep, p.corrupted_acts, p.metric, tl)
            margin = min(margin, abs(abs(trial - current) - threshold))
            if abs(trial - current) < threshold:
                current = trial
            else:
                keep[e] = True
        return keep, margin

    # a threshold where no decision sits within float32 noise (~1e-6) of it
    for share in (0.02, 0.03, 0.05, 0.08):
        threshold = share * abs(p.clean_metric - p.corrupted_metric)
        keep, margin = replay(threshold)
        if margin > 2e-5:
            break
    assert margin > 2e-5  # 20x the float32 difference between the two evaluations
    kept, metric = acdc(prob, threshold)
    assert 0 < kept.sum() < g.n_edges
    assert kept.tolist() == prune(g, keep).tolist()
    assert abs(metric - circuit_metrics(prob, kept[None])[0]) <= 1e-9
    none, m_none = acdc(prob, float("inf"))
    assert not none.any() and abs(m_none - p.corrupted_metric) <= 1e-4 * max(
        1, abs(p.corrupted_metric))
    with pytest.raises(AnalysisError, match="threshold must be a number >= 0"):
        acdc(prob, -1.0)


# -------------------------------------------------------------------------------- drawing
def test_the_drawing_is_per_position_where_the_scores_are(tiny_mlp):
    """EAP's circuit is drawn position by position: the drawn cells are the circuit's edges'
    per-position scores, strongest first, every cell of at least 2 % of the strongest and no
    other; exact edge patching (no split by position) is drawn on the component grid."""
    from attention_lens.analysis.circuit.discovery import discover_circuit
    from attention_lens.figures.circuit import MIN_CELL_SHARE, circuit_cells, circuit_figure

    pair = _pair(seed=5)
    disc = discover_circuit(tiny_mlp, [pair], method="eap", k=30, curve=False)
    bp = disc.scores.by_position
    cells = circuit_cells(disc)
    sub = np.abs(bp[disc.kept])
    want = int((sub >= MIN_CELL_SHARE * sub.max()).sum())
    assert 1 < len(cells) == want
    assert len({p for _, p, _ in cells}) > 1  # more than one position drawn
    for e, p, v in cells:
        assert disc.kept[e] and v == bp[e, p]
    assert [abs(v) for *_, v in cells] == sorted((abs(v) for *_, v in cells), reverse=True)
    fig = circuit_figure(disc)
    drawn = {c for t in fig.data if t.customdata is not None for c in t.customdata
             if isinstance(c, str)}
    g = disc.scores.graph
    assert drawn == {f"{g.edge_label(e)} @ {p}" for e, p, _ in cells}
    assert "position" in fig.layout.xaxis.title.text
    exact = discover_circuit(tiny_mlp, [pair], method="exact", k=30, curve=False)
    assert exact.scores.by_position is None
    fig = circuit_figure(exact)
    assert fig.layout.xaxis.title.text.startswith("head")
    labels = {c for t in fig.data if t.customdata is not None for c in t.customdata
              if isinstance(c, str)}
    assert labels == {g.edge_label(e) for e in np.nonzero(exact.kept)[0]}


@pytest.mark.parametrize("search", ["top_k", "acdc"])
def test_discovery_progress_rises_to_the_end(tiny, search):
    """A discovery's progress (scores, ACDC's removals, the curve) only rises and ends at
    the whole."""
    from attention_lens.analysis.circuit.discovery import discover_circuit

    seen = []
    disc = discover_circuit(tiny, [_pair(seed=8, vocab=tiny.cfg.d_vocab)], search=search,
                            threshold=0.05, n_sizes=3, n_random=1,
                            progress=lambda done, total: seen.append(done / total))
    assert disc.settings["search"] == search
    assert len(seen) > 3 and seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 1
