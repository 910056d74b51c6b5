"""The chunked logit lens equals the full stages × positions × vocabulary computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_lens.analysis.forward import run_forward
from attention_lens.analysis.logit_lens import chunk_rows, lens_stages, logit_lens, stage_logits

from .conftest import TINY_TEXT

PROMPT = ("Mr and Mrs Dursley, of number four, Privet Drive, were proud to say that they were "
          "perfectly normal, thank you very much. Mr and Mrs Dursley, of number four, Privet")


def full_lens(lm, fp, k, target_id, granularity):
    """Every stage's full logits at once, in float64 (the definition, without chunks)."""
    stages = lens_stages(lm, granularity)
    logits = torch.stack([stage_logits(lm, fp.cache[hook]) for _, hook in stages]).double()
    log_probs = logits.log_softmax(-1)  # [S, P, V]
    top = torch.topk(logits, k, dim=-1)
    nxt = torch.as_tensor(fp.token_ids[1:])[None, :, None].expand(len(stages), -1, 1)
    chosen = logits[:, :-1].gather(-1, nxt)
    tcol = logits[..., target_id:target_id + 1]
    return {
        "logits": logits,
        "top_ids": top.indices.numpy(),
        "top_probs": log_probs.gather(-1, top.indices).exp().numpy(),
        "entropy": -(log_probs.exp() * log_probs).sum(-1).numpy(),
        "next_probs": log_probs[:, :-1].gather(-1, nxt)[..., 0].exp().numpy(),
        "next_ranks": ((logits[:, :-1] > chosen).sum(-1) + 1).numpy(),
        "target_probs": log_probs[..., target_id].exp().numpy(),
        "target_ranks": ((logits > tcol).sum(-1) + 1).numpy(),
        "target_logits": logits[..., target_id].numpy(),
    }


@pytest.fixture(scope="module")
def shipped_passes(registry):
    out = []
    for name in ("attn-only-1l", "attn-only-2l"):
        lm = registry.get(name)
        out.append((lm, run_forward(lm, PROMPT)))
    return out


def check_equal(res, ref, atol=1e-5):
    np.testing.assert_array_equal(res.top_ids, ref["top_ids"])
    np.testing.assert_allclose(res.top_probs, ref["top_probs"], atol=atol, rtol=0)
    np.testing.assert_allclose(res.entropy, ref["entropy"], atol=10 * atol, rtol=0)
    np.testing.assert_allclose(res.next_probs[:, :-1], ref["next_probs"], atol=atol, rtol=0)
    np.testing.assert_array_equal(res.next_ranks[:, :-1], ref["next_ranks"])
    assert np.isnan(res.next_probs[:, -1]).all() and (res.next_ranks[:, -1] == -1).all()
    np.testing.assert_allclose(res.target_probs, ref["target_probs"], atol=atol, rtol=0)
    np.testing.assert_array_equal(res.target_ranks, ref["target_ranks"])
    np.testing.assert_allclose(res.target_logits, ref["target_logits"], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("rows", [None, 1, 7, 64])
@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_chunked_lens_equals_full_computation_on_shipped_models(shipped_passes, rows,
                                                                 granularity):
    for lm, fp in shipped_passes:
        tid = int(fp.logits[-1].argmax())
        ref = full_lens(lm, fp, 5, tid, granularity)
        res = logit_lens(lm, fp, k=5, target=tid, granularity=granularity,
                         rows_per_chunk=rows)
        check_equal(res, ref)
        # the last stage is the model itself
        torch.testing.assert_close(ref["logits"][-1].float(), fp.logits, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(res.top_ids[-1], torch.topk(fp.logits, 5).indices.numpy())
        probs = torch.softmax(fp.logits.double(), -1)
        np.testing.assert_allclose(res.target_probs[-1], probs[:, tid].numpy(), atol=1e-5)


def test_chunked_lens_equals_full_computation_with_layernorm(tiny_ln):
    fp = run_forward(tiny_ln, TINY_TEXT[:200])
    tid = int(fp.logits[-1].argmax())
    for rows in (None, 3, 10):
        check_equal(logit_lens(tiny_ln, fp, k=3, target=tid, rows_per_chunk=rows),
                    full_lens(tiny_ln, fp, 3, tid, "sublayer"))


def test_chunks_bound_the_logits_held_at_once():
    from attention_lens.analysis.logit_lens import CHUNK_ELEMENTS

    assert chunk_rows(50257) * 50257 <= CHUNK_ELEMENTS < (chunk_rows(50257) + 1) * 50257
    assert CHUNK_ELEMENTS * 4 <= 32 * 2 ** 20  # at most 32 MiB of logits at a time
    assert chunk_rows(4096) == CHUNK_ELEMENTS // 4096 and chunk_rows(10 ** 9) == 1


def test_progress_reports_every_chunk_and_can_stop(shipped_passes):
    lm, fp = shipped_passes[1]
    seen: list[float] = []
    logit_lens(lm, fp, k=2, rows_per_chunk=16, progress=seen.append)
    n = len(lens_stages(lm)) * fp.n_tokens
    assert len(seen) == -(-n // 16) and seen == sorted(seen) and seen[-1] == 1.0

    class Stop(Exception):
        pass

    def stop(fraction: float) -> None:
        if fraction > 0.3:
            raise Stop

    with pytest.raises(Stop):
        logit_lens(lm, fp, k=2, rows_per_chunk=16, progress=stop)


def test_logit_lens_as_a_background_request_matches_the_direct_computation(shipped_passes,
                                                                            monkeypatch):
    from attention_lens import weight_analyses as W
    from attention_lens.analysis import declare
    from attention_lens.analysis.logit_lens import LOGIT_LENS

    lm, fp = shipped_passes[1]
    tid = int(fp.logits[-1].argmax())
    values = LOGIT_LENS.values({"top_k": 3, "target": tid, "granularity": "layer"})
    assert W.declared(LOGIT_LENS, lm, fp, values) is None  # small: computed inline
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)
    req = W.declared(LOGIT_LENS, lm, fp, values)
    assert W.Request.from_json(req.as_json()) == req  # travels through the browser intact
    assert req.label == "logit lens"
    seen: list[float] = []
    res = W.ANALYSES[req.name].compute(lm, seen.append, **dict(req.params))
    ref = logit_lens(lm, fp, k=3, target=tid, granularity="layer")
    np.testing.assert_array_equal(res.top_ids, ref.top_ids)
    np.testing.assert_allclose(res.target_probs, ref.target_probs, atol=1e-6)
    assert seen and seen[-1] == 1.0
    assert W.declared(LOGIT_LENS, lm, fp, LOGIT_LENS.values({"top_k": 3})) != req


def test_only_big_lenses_are_background_work(shipped_passes):
    from attention_lens.analysis.declare import runs_inline
    from attention_lens.analysis.logit_lens import LOGIT_LENS
    from attention_lens.model.shapes import random_gpt2_shape

    lm, fp = shipped_passes[1]
    every, layer = LOGIT_LENS.values({}), LOGIT_LENS.values({"granularity": "layer"})
    assert runs_inline(LOGIT_LENS, lm.cfg, lm.cfg.n_ctx, every)  # the shipped models: at once
    big = random_gpt2_shape().cfg
    assert runs_inline(LOGIT_LENS, big, 64, layer)
    assert not runs_inline(LOGIT_LENS, big, 256, every)
    assert not runs_inline(LOGIT_LENS, big, 256, layer)
    # the estimate: two floating-point operations per logit and d_model, every stage and
    # computed position (GPT-2 small: 13 per-layer stages, 50,257 tokens, d_model 768)
    assert LOGIT_LENS.gflop(big, 64, layer) == pytest.approx(13 * 64 * 50257 * 2 * 768 / 1e9)
    # the window a long prompt's page draws first is cheap
    window = {**every, "positions": list(range(-16, 0))}
    assert LOGIT_LENS.gflop(big, 256, window) == pytest.approx(
        LOGIT_LENS.gflop(big, 256, every) * 16 / 256)
    assert runs_inline(LOGIT_LENS, big, 256, window)


@pytest.mark.parametrize("rows", [None, 5])
def test_a_window_of_positions_equals_those_columns_of_the_full_lens(shipped_passes, rows):
    for lm, fp in shipped_passes:
        tid = int(fp.logits[-1].argmax())
        full = logit_lens(lm, fp, k=4, target=tid)
        window = [fp.n_tokens - 3, 2, -1, 2]  # unordered, repeated and negative positions
        part = logit_lens(lm, fp, k=4, target=tid, positions=window, rows_per_chunk=rows)
        cols = [2, fp.n_tokens - 3, fp.n_tokens - 1]
        assert part.positions == tuple(cols) and full.positions is None
        rest = np.setdiff1d(np.arange(fp.n_tokens), cols)
        for name in ("top_probs", "entropy", "next_probs", "target_probs", "target_logits"):
            a, b = getattr(part, name), getattr(full, name)
            np.testing.assert_allclose(a[:, cols], b[:, cols], atol=1e-5, rtol=0,
                                       equal_nan=True)
            assert np.isnan(a[:, rest]).all(), name
        for name in ("top_ids", "next_ranks", "target_ranks"):
            a, b = getattr(part, name), getattr(full, name)
            np.testing.assert_array_equal(a[:, cols], b[:, cols])
            assert (a[:, rest] == -1).all(), name
        assert (part.top_display[:, rest] == "").all()
        assert (part.top_display[:, cols] == full.top_display[:, cols]).all()


@pytest.mark.parametrize("bad", [[], [10 ** 6], [-10 ** 6], [1.5], ["3"], [True]])
def test_bad_windows_are_refused_with_a_message(shipped_passes, bad):
    from attention_lens.analysis.errors import AnalysisError

    lm, fp = shipped_passes[0]
    with pytest.raises(AnalysisError, match="position"):
        logit_lens(lm, fp, positions=bad)
