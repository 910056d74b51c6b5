"""A large logit lens runs as background work: the page asks for a job, the job computes it
with progress chunk by chunk, and later visits read it without recomputing."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from attention_lens.analysis import declare
from attention_lens.server.app import create_app
from attention_lens.components import page as P
from attention_lens.figures.logit_lens import WINDOW


def test_large_logit_lens_is_a_background_job_with_progress(registry, bg, monkeypatch):
    create_app(registry, background=bg)
    spec = P.spec_of("logit-lens")
    state = {"model": "attn-only-2l", "text": "Harry Potter and Hermione. Harry Potter and",
             "pos": None}
    small = spec.render(state, compute=False)
    assert small.drew and not isinstance(small.request, dict)  # a small lens draws at once
    monkeypatch.setattr(declare, "INLINE_MAX_GFLOP", -1.0)  # now every lens counts as large
    long_state = {**state, "text": " ".join([state["text"]] * 4)}
    n = registry.forward(long_state["text"], "attn-only-2l").n_tokens
    assert n > WINDOW + 1
    first = spec.render(long_state, compute=False, k=4)
    # the positions in view are drawn at once, and the whole lens is asked of a job
    assert first.drew and first.request["labels"] == ["logit lens"]
    z = np.asarray(first.figures["logit-lens"].data[0].z, dtype=float)
    drawn = np.flatnonzero(~np.isnan(z).all(0))
    assert list(drawn) == list(range(n - WINDOW, n)) and np.isnan(z[:, :n - WINDOW]).all()
    assert "being computed" in first.figures["logit-lens"].layout.title.text
    state = long_state
    progress: list = []
    out = spec.run_job(progress.append, first.request, state,
                       *[first.query[n] for n in spec.control_names])
    assert isinstance(out[0], go.Figure) and isinstance(out[1], go.Figure)
    assert progress and progress[-1][0] == 100  # the strip reached 100%
    again = spec.render(state, compute=False, k=4)
    assert again.drew and not isinstance(again.request, dict)  # read from the store
    lens = again.figures["logit-lens"]
    assert len(lens.data[0].x) == n and not np.isnan(np.asarray(lens.data[0].z, float)).any()
    assert "being computed" not in lens.layout.title.text
