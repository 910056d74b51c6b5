"""A large logit lens runs as a background job: progress in the strip, the page drawn once
when it finishes, later visits served from the cache."""

from __future__ import annotations

import sys

import dash
import plotly.graph_objects as go
import pytest

from attention_lens import jobs as J
from attention_lens.analysis import logit_lens as L


@pytest.fixture
def run():
    runner = J.JobRunner(max_workers=2)
    J.set_runner(runner)
    yield runner
    runner.shutdown()
    J.set_runner(J.JobRunner())


def test_large_logit_lens_is_a_background_job_with_progress(run, monkeypatch):
    from attention_lens.app import create_app
    from attention_lens.components import jobs as JS
    from attention_lens.components import page as P
    from attention_lens.registry import DEFAULT_WEIGHTS, Registry

    reg = Registry([DEFAULT_WEIGHTS])
    app = create_app(reg)
    mod = sys.modules["attention_lens.pages.logit_lens"]
    monkeypatch.setattr(L, "BACKGROUND_LOGITS", 0)  # every lens counts as large here
    monkeypatch.setattr(JS, "GRACE_S", 0.0)
    seen: list[float] = []
    real = mod.logit_lens

    def watched(*args, progress=None, **kwargs):
        def report(f: float) -> None:
            seen.append(f)
            if progress is not None:
                progress(f)
        return real(*args, progress=report, rows_per_chunk=16, **kwargs)

    monkeypatch.setattr(mod, "logit_lens", watched)
    q, _ = P.parse_query(mod.CONTROLS, {})
    values = [q[k] for k in mod.CONTROLS]
    st = {"model": "attn-only-2l", "text": "Harry Potter and Hermione. Harry Potter and",
          "pos": None}

    def visit():
        with app.server.test_request_context():
            return mod.update(st, *values)

    grid, traj, store, alerts, _ = visit()
    if store is None:  # the job finished within the grace period on a fast machine
        assert isinstance(grid, go.Figure)
    else:
        assert grid is dash.no_update and store["labels"] == ["logit lens"]
        job = run.get(store["ids"][0])
        assert job.wait(60) and job.status == "done"
        cb = mod.JOB_CALLBACKS
        *_, finished = cb["poll"](store, 1)
        grid, traj, store2, alerts, query = cb["draw"](finished, st, *values)
        assert isinstance(grid, go.Figure) and isinstance(traj, go.Figure) and alerts == []
    assert len(seen) > 1 and seen[-1] == 1.0  # progress chunk by chunk
    n = len(seen)
    grid2, _, store3, alerts, _ = visit()  # from the cache: no job, no recomputation
    assert isinstance(grid2, go.Figure) and store3 is None and len(seen) == n
