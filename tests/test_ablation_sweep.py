"""The per-head ablation sweep: equal to single-head ablations (ours and TransformerLens 3.9's)
on the shipped models and random LayerNorm + MLP models, computed in chunks, cached with the
forward pass, and background work with progress on a big model while the page's other
parts draw at once."""

from __future__ import annotations

import dataclasses
import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import make_tiny

from attention_lens.analysis import ablation as A
from attention_lens.analysis.defaults import repeated_positions
from attention_lens.analysis.forward import run_forward
from attention_lens.server.app import create_app
from attention_lens.components import page as P
from attention_lens.components.shell import DEFAULT_PROMPT

REPEAT = [3, 9, 1, 14, 27, 5, 3, 9, 1, 14, 27, 5, 8, 3, 9, 40]


def reference_losses(lm, fp, layer: int, head: int, method: str, pos: np.ndarray) -> float:
    """Mean -ln p(next token) over ``pos`` of the full rerun with one head ablated."""
    logits = A.ablated_logits(lm, fp, [(layer, head)], method).double()
    lp = logits.log_softmax(-1)
    nxt = torch.as_tensor(np.asarray(fp.token_ids)[pos + 1])
    return float(-lp[torch.as_tensor(pos), nxt].mean())


def _models(request, name: str):
    if name in ("attn-only-1l", "attn-only-2l"):
        lm = request.getfixturevalue("registry").get(name)
        return lm, run_forward(lm, DEFAULT_PROMPT)
    tok = request.getfixturevalue("tiny_tokenizer")
    kinds = {
        "tiny-ln": dict(attn_only=False, d_mlp=64, act_fn="gelu", normalization_type="LN"),
        "tiny-parallel": dict(attn_only=False, d_mlp=48, act_fn="gelu_new",
                              normalization_type="LN", parallel_attn_mlp=True),
        "tiny-rotary": dict(attn_only=False, d_mlp=48, act_fn="silu", gated_mlp=True,
                            normalization_type="RMS", positional_embedding_type="rotary",
                            n_layers=3),
    }
    lm = make_tiny(tok, seed=3, name=name, **kinds[name])
    return lm, run_forward(lm, "", token_ids=REPEAT)


MODELS = ["attn-only-1l", "attn-only-2l", "tiny-ln", "tiny-parallel", "tiny-rotary"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["zero", "mean"])
def test_sweep_equals_each_single_head_rerun(request, name, method):
    lm, fp = _models(request, name)
    part = repeated_positions(fp.token_ids)
    early = part[: len(part) // 2]  # a loss that stops before the last rows
    assert early.size and early[-1] < fp.n_tokens - 3
    for positions in (None, part, early):
        sweep = A.head_sweep(lm, fp, method, positions)
        pos = A.check_positions(fp, positions)
        ref = np.array([[reference_losses(lm, fp, la, h, method, pos)
                         for h in range(lm.cfg.n_heads)] for la in range(lm.cfg.n_layers)])
        np.testing.assert_allclose(sweep.loss_after, ref, rtol=0, atol=1e-5)
        full = fp.logits.double().log_softmax(-1)
        before = -full[torch.as_tensor(pos), torch.as_tensor(fp.token_ids[pos + 1])].mean()
        assert sweep.loss_before == pytest.approx(float(before), abs=1e-9)
    # and what the page's other panels report for the same single head
    one = A.ablate_heads(lm, fp, heads=[(lm.cfg.n_layers - 1, 1)], method=method, part=part)
    sweep = A.head_sweep(lm, fp, method, part)
    assert sweep.loss_after[-1, 1] == pytest.approx(one.part_loss_after, abs=1e-5)
    assert A.head_sweep(lm, fp, method).loss_after[0, 0] == pytest.approx(
        A.ablate_heads(lm, fp, heads=[(0, 0)], method=method).loss_after, abs=1e-5)


@pytest.mark.parametrize("name", ["attn-only-1l", "attn-only-2l", "tiny-ln"])
def test_sweep_equals_transformer_lens(request, name):
    pytest.importorskip("transformer_lens")
    tl_oracle = pytest.importorskip("tl_oracle")
    lm, fp = _models(request, name)
    tl = tl_oracle.to_transformer_lens(lm)
    tokens = torch.as_tensor(fp.token_ids)[None]
    part = repeated_positions(fp.token_ids)
    nxt = torch.as_tensor(fp.token_ids[part + 1])
    for method in ("zero", "mean"):
        sweep = A.head_sweep(lm, fp, method, part)
        for la in range(lm.cfg.n_layers):
            for h in range(lm.cfg.n_heads):
                def hook(z, hook, h=h):
                    z = z.clone()
                    z[:, :, h] = 0.0 if method == "zero" else z[:, :, h].mean(1, keepdim=True)
                    return z
                with torch.no_grad():
                    logits = tl.run_with_hooks(tokens, fwd_hooks=[
                        (f"blocks.{la}.attn.hook_z", hook)])
                lp = logits[0].double().log_softmax(-1)
                ref = float(-lp[torch.as_tensor(part), nxt].mean())
                assert sweep.loss_after[la, h] == pytest.approx(ref, abs=1e-5), (method, la, h)


def test_batches_and_chunks_do_not_change_the_result(tiny_ln, monkeypatch):
    fp = run_forward(tiny_ln, "", token_ids=REPEAT)
    default = A.head_sweep(tiny_ln, fp, "mean")
    calls: list[int] = []
    unembed = tiny_ln.model.unembed.forward

    def counted(x):
        calls.append(x.shape[0])
        return unembed(x)

    monkeypatch.setattr(tiny_ln.model.unembed, "forward", counted)
    monkeypatch.setattr(A, "SWEEP_ROWS", 1)  # one head per batch
    monkeypatch.setattr(A, "chunk_rows", lambda d_vocab, elements: 7)  # 7 rows of logits at a time
    small = A.head_sweep(tiny_ln, fp, "mean")
    np.testing.assert_allclose(small.loss_after, default.loss_after, rtol=0, atol=1e-6)
    # each head's 15 loss rows in chunks of at most 7: never a [rows, vocabulary] tensor
    # larger than a chunk
    assert max(calls) == 7 and len(calls) == 3 * tiny_ln.cfg.n_layers * tiny_ln.cfg.n_heads


def test_progress_reaches_one_and_can_stop_the_sweep(tiny):
    fp = run_forward(tiny, "", token_ids=REPEAT)
    seen: list[float] = []
    A.head_sweep(tiny, fp, "zero", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) >= 2

    def stop(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.head_sweep(tiny, fp, "zero", progress=stop)


def test_sweep_edge_cases(tiny):
    one = run_forward(tiny, "", token_ids=[5])
    empty = A.head_sweep(tiny, one, "zero")
    assert np.isnan(empty.loss_after).all() and np.isnan(empty.loss_before)
    fp = run_forward(tiny, "", token_ids=REPEAT)
    at0 = A.head_sweep(tiny, fp, "zero", [0])  # one row: the first position alone
    ref = reference_losses(tiny, fp, 1, 2, "zero", np.array([0]))
    assert at0.loss_after[1, 2] == pytest.approx(ref, abs=1e-6)
    with pytest.raises(A.AnalysisError, match="loss positions"):
        A.head_sweep(tiny, fp, "zero", [len(REPEAT) - 1])
    with pytest.raises(A.AnalysisError, match="ablation method"):
        A.head_sweep(tiny, fp, "resample")
    from attention_lens.analysis.declare import Shape

    key = A.HEAD_SWEEP.key({"method": "zero", "positions": [3, 1, -13]},
                           Shape(tiny.cfg, len(REPEAT)))
    assert key == ("prompt", "head-sweep", (("method", "zero"), ("positions", (1, 3))))


def test_which_sweeps_run_in_the_background(registry):
    from attention_lens.analysis.declare import runs_inline
    from attention_lens.model.shapes import random_gpt2_shape

    def inline(cfg, n):
        return runs_inline(A.HEAD_SWEEP, cfg, n, {"method": "zero", "positions": None})

    assert inline(registry.get("attn-only-2l").cfg, 128)  # shipped: at once
    big = random_gpt2_shape().cfg
    assert not inline(big, 256) and inline(big, 8)
    # a deep model with gated MLPs (SmolLM2's shape): its recomputed layers, not its logits,
    # make even a 5-token sweep long
    from attention_lens.model.config import ModelConfig

    smol = ModelConfig(n_layers=30, d_model=576, n_heads=9, d_head=64, n_ctx=8192,
                       d_vocab=49152, attn_only=False, d_mlp=1536, act_fn="silu",
                       gated_mlp=True, normalization_type="RMS")
    logits = 2 * 30 * 9 * 4 * 576 * 49152 / 1e9  # 270 heads x 4 loss positions
    assert A.sweep_gflop(smol, 5) > 3 * logits  # not by its logits
    assert not inline(smol, 5) and inline(smol, 1)
    # the estimate: each head of layer l reruns layers l.. on the 4 rows, then unembeds
    layer = 2 * 4 * 576 * (4 * 576 + 3 * 1536) + 4 * 16 * 576
    assert A.sweep_gflop(smol, 5) == pytest.approx((9 * 465 * layer) / 1e9 + logits)


# ------------------------------------------------------------------------------ the page
def _sweep_z(fig: go.Figure) -> np.ndarray:
    return np.asarray(fig.data[0].z, dtype=float)


def _same_float32_sweep(z: np.ndarray, direct: A.HeadSweep) -> None:
    """A loss change recomputed by a float32 forward pass: equal to float32 precision of the
    losses it is the difference of (not bit for bit: a float32 matrix product may round
    differently from one call, thread count or machine to the next)."""
    np.testing.assert_allclose(z, direct.loss_change, rtol=1e-6,
                               atol=1e-6 * abs(direct.loss_before))


def test_page_sweep_is_cached_with_the_forward_pass(registry, bg, monkeypatch):
    create_app(registry, background=bg)
    spec = P.spec_of("ablation")
    calls: list = []
    page = spec.panels.__globals__  # the page module as Dash imported it
    real = page["HEAD_SWEEP"]
    monkeypatch.setitem(page, "HEAD_SWEEP", dataclasses.replace(
        real, fn=lambda *a, **k: calls.append(a) or real.fn(*a, **k)))
    state = {"model": "attn-only-2l", "pos": None,
             "text": "Mr Dursley drove to work. Mr Dursley drove to work and back."}
    first = spec.render(state, compute=False)
    assert first.drew and not isinstance(first.request, dict) and len(calls) == 1
    again = spec.render(state, compute=False, k=4)  # another top k: the same sweep
    assert again.drew and len(calls) == 1
    np.testing.assert_array_equal(_sweep_z(first.figures["sweep"]),
                                  _sweep_z(again.figures["sweep"]))
    spec.render(state, compute=False, method="mean")
    assert len(calls) == 2
    fp = registry.forward(state["text"], "attn-only-2l")
    part = repeated_positions(fp.token_ids)
    direct = A.head_sweep(registry.get("attn-only-2l"), fp, "zero", part)
    _same_float32_sweep(_sweep_z(first.figures["sweep"]), direct)


def test_big_sweep_is_a_background_job_while_the_other_panels_draw(registry, bg, monkeypatch):
    create_app(registry, background=bg)
    spec = P.spec_of("ablation")
    page = spec.panels.__globals__  # now every sweep counts as large
    monkeypatch.setitem(page, "HEAD_SWEEP", dataclasses.replace(
        page["HEAD_SWEEP"], cost=lambda *a: float("inf")))
    state = {"model": "attn-only-2l", "pos": None,
             "text": "Hermione read the book. Hermione read the book twice."}
    first = spec.render(state, compute=False)
    assert first.request["labels"] == ["zero-ablation of each head"]
    for name in ("predictions", "positions"):  # drawn without waiting for the sweep
        assert isinstance(first.figures[name], go.Figure) and first.figures[name].data
    assert not first.figures["sweep"].data  # a placeholder that says what is coming
    assert "appears when the sweep" in first.figures["sweep"].layout.annotations[0].text
    assert "Ablating" in str(first.extras["choice"])
    progress: list = []
    out = spec.run_job(progress.append, first.request, state,
                       *[first.query[n] for n in spec.control_names])
    sweep_fig = out[spec.graphs.index("sweep")]
    assert isinstance(sweep_fig, go.Figure) and sweep_fig.data
    assert progress and progress[-1][0] == 100
    again = spec.render(state, compute=False)
    assert again.drew and not isinstance(again.request, dict)  # read from the store
    lm = registry.get("attn-only-2l")
    fp = registry.forward(state["text"], lm.name)
    direct = A.head_sweep(lm, fp, "zero", repeated_positions(fp.token_ids))
    _same_float32_sweep(_sweep_z(again.figures["sweep"]), direct)
    # the export (and the bench) compute it in place
    panels = P.page_panels("ablation", state, {"method": "mean"}, compute=True)
    assert {p.name for p in panels} == {"predictions", "positions", "sweep"}
    assert all(p.figure.data for p in panels)


def test_repeated_part_is_shaded_as_runs_of_positions(tiny):
    from attention_lens.figures.ablation import ablation_positions_figure

    fp = run_forward(tiny, "", token_ids=REPEAT)
    res = A.ablate_heads(tiny, fp, heads=[(1, 0)], part=[2, 3, 4, 8, 9, 12])
    shapes = ablation_positions_figure(res).layout.shapes
    assert [(s.x0, s.x1) for s in shapes] == [(1.5, 4.5), (7.5, 9.5), (11.5, 12.5)]


def test_ablation_report_in_chunks_equals_the_full_distributions(tiny_ln, monkeypatch):
    fp = run_forward(tiny_ln, "", token_ids=REPEAT)
    monkeypatch.setattr(A, "chunk_rows", lambda d_vocab, elements: 4)
    res = A.ablate_heads(tiny_ln, fp, heads=[(0, 1), (1, 3)], method="mean", part=[8, 9, 10])
    lp_b = fp.logits.double().log_softmax(-1)
    lp_a = A.ablated_logits(tiny_ln, fp, [(0, 1), (1, 3)], "mean").double().log_softmax(-1)
    kl = (lp_b.exp() * (lp_b - lp_a)).sum(-1).numpy()
    nxt = torch.as_tensor(fp.token_ids[1:])
    s_a = -lp_a[:-1].gather(-1, nxt[:, None])[:, 0].numpy()
    # the ablated logits are a second float32 forward pass: equal to float32 precision, the
    # KL's absolute error bounded by that of the log-probabilities it is made of
    scale = float(np.abs(lp_a.numpy()).max())
    np.testing.assert_allclose(res.kl_per_position, kl, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(res.surprisal_after[:-1], s_a, rtol=1e-6)
    assert np.isnan(res.surprisal_after[-1]) and np.isnan(res.surprisal_before[-1])
    assert res.part_loss_after == pytest.approx(float(s_a[[8, 9, 10]].mean()), rel=1e-6)
    assert res.loss_after == pytest.approx(float(s_a.mean()), rel=1e-6)
