"""The background job runner: completion, progress, cancel, sharing, errors, retention;
weight analyses through the registry cache, and the page strip's polling callbacks."""

from __future__ import annotations

import threading

import pytest

from attention_lens import jobs as J
from attention_lens.analysis.errors import AnalysisError

TIMEOUT = 30  # generous bound on waits; the jobs below take milliseconds when not blocked


def layered(n_layers: int, gate: threading.Event, seen: list, result=42):
    """A job function that reports after each 'layer', each layer waiting for ``gate``."""
    def fn(job: J.Job):
        for layer in range(n_layers):
            assert gate.wait(TIMEOUT)
            seen.append(layer)
            job.report((layer + 1) / n_layers)
        return result
    return fn


@pytest.fixture
def run():
    runner = J.JobRunner(max_workers=2, keep=4)
    J.set_runner(runner)
    yield runner
    runner.shutdown()
    J.set_runner(J.JobRunner())


def test_job_completes_with_result(run):
    gate = threading.Event()
    gate.set()
    job = run.submit("k", layered(3, gate, []), "test")
    assert job.wait(TIMEOUT)
    assert job.status == J.DONE and job.result == 42 and job.progress == 1.0
    assert run.get(job.id) is job and run.find("k") is job


def test_progress_increases_layer_by_layer(run):
    steps = [threading.Event() for _ in range(4)]
    reported = []

    def fn(job):
        for i, step in enumerate(steps):
            assert step.wait(TIMEOUT)
            job.report((i + 1) / 4)
            reported.append(job.progress)
        return "ok"

    job = run.submit("p", fn)
    for step in steps:
        before = job.progress
        step.set()
        for _ in range(1000):
            if job.progress > before:
                break
            threading.Event().wait(0.005)
        assert job.progress > before
    assert job.wait(TIMEOUT) and reported == [0.25, 0.5, 0.75, 1.0]


def test_cancel_stops_between_layers(run):
    gate, seen = threading.Event(), []
    job = run.submit("c", layered(10, gate, seen))
    assert run.cancel(job.id)
    gate.set()
    assert job.wait(TIMEOUT)
    assert job.status == J.CANCELLED and job.result is None
    assert len(seen) <= 1  # stopped at the first report after the flag was set
    assert not run.cancel(job.id)  # already finished
    again = run.submit("c", layered(2, gate, []))  # a cancelled job is replaced
    assert again is not job and again.wait(TIMEOUT) and again.status == J.DONE


def test_identical_requests_share_one_job(run):
    gate, calls = threading.Event(), []

    def fn(job):
        calls.append(1)
        assert gate.wait(TIMEOUT)
        return "shared"

    jobs, barrier = [], threading.Barrier(6)

    def request():
        barrier.wait(TIMEOUT)
        jobs.append(run.submit(("model", "svd"), fn))

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    gate.set()
    assert len({j.id for j in jobs}) == 1
    assert jobs[0].wait(TIMEOUT) and jobs[0].result == "shared" and calls == [1]
    assert run.submit(("model", "svd"), fn) is jobs[0]  # done jobs are reused too


def test_errors_become_messages(run):
    def bad_input(job):
        raise AnalysisError("layer 9 does not exist")

    def crash(job):
        raise ZeroDivisionError("boom")

    a, b = run.submit("a", bad_input, "SVD"), run.submit("b", crash, "composition")
    assert a.wait(TIMEOUT) and b.wait(TIMEOUT)
    assert a.status == J.ERROR and a.error == "layer 9 does not exist"
    assert b.status == J.ERROR and "composition analysis failed (ZeroDivisionError" in b.error
    assert "boom" not in b.error  # details stay in the server log


def test_bounded_workers_and_retention(run):
    gate = threading.Event()
    jobs = [run.submit(i, layered(1, gate, [])) for i in range(5)]
    threading.Event().wait(0.05)
    assert sum(j.status == J.RUNNING for j in jobs) <= 2
    assert sum(j.status == J.QUEUED for j in jobs) >= 3
    gate.set()
    assert all(j.wait(TIMEOUT) for j in jobs)
    more = [run.submit(10 + i, layered(1, gate, [])) for i in range(3)]
    assert all(j.wait(TIMEOUT) for j in more)
    threading.Event().wait(0.05)  # the last job trims after it signals completion
    assert len(run.jobs()) <= 4  # keep=4 finished jobs
    assert run.get(jobs[0].id) is None


# ------------------------------------------------------------------ with the registry
class FakeRegistry:
    """The two registry methods cached_or_jobs uses."""

    def __init__(self):
        self.cache, self.computed, self.models = {}, 0, {}

    def get(self, model):  # like the registry: one loaded instance per name
        return self.models.setdefault(model, type("LM", (), {"name": model})())

    def weights(self, model, key, compute):
        if (model, key) not in self.cache:
            value = compute(self.get(model))
            self.computed += 1
            self.cache[(model, key)] = value
        return self.cache[(model, key)]


def test_cached_or_jobs_pending_then_cached(run):
    reg, gate = FakeRegistry(), threading.Event()

    def compute(lm, report):
        for i in range(3):
            assert gate.wait(TIMEOUT)
            report((i + 1) / 3)
        return f"svd of {lm.name}"

    need = J.Need("svd", compute, "circuit SVD")
    with pytest.raises(J.JobPending) as pending:
        J.cached_or_jobs(reg, "m", [need], wait=0.0)
    assert isinstance(pending.value, AnalysisError)  # exports show its message
    assert "still computing circuit SVD" in str(pending.value)
    job = pending.value.jobs[0]
    with pytest.raises(J.JobPending) as again:  # a second request joins the same job
        J.cached_or_jobs(reg, "m", [need], wait=0.0)
    assert again.value.jobs[0] is job
    gate.set()
    assert J.cached_or_jobs(reg, "m", [need], wait=None) == ["svd of m"]
    assert reg.cache[("m", "svd")] == "svd of m" and reg.computed == 1
    assert J.cached_or_jobs(reg, "m", [need], wait=0.0) == ["svd of m"]  # from the cache


def test_cached_or_jobs_error_and_cancel(run):
    reg, gate = FakeRegistry(), threading.Event()

    def failing(lm, report):
        raise AnalysisError("this model has one layer")

    with pytest.raises(AnalysisError, match="one layer"):
        J.cached_or_jobs(reg, "m", [J.Need("comp", failing, "composition")], wait=None)
    assert run.find(("m", "comp")) is None  # forgotten: the next request retries

    def slow(lm, report):
        while True:
            assert gate.wait(TIMEOUT)
            report(0.5)

    need = J.Need("eig", slow, "eigenvalues")
    with pytest.raises(J.JobPending) as pending:
        J.cached_or_jobs(reg, "m", [need], wait=0.0)
    job = pending.value.jobs[0]
    run.cancel(job.id)
    gate.set()
    assert job.wait(TIMEOUT) and job.status == J.CANCELLED
    with pytest.raises(AnalysisError, match="cancelled"):
        J.cached_or_jobs(reg, "m", [need], wait=0.0)
    assert ("m", "eig") not in reg.cache


# ------------------------------------------------------------------ a page, end to end
def test_weights_page_shows_progress_cancels_and_draws_when_done(run, monkeypatch):
    """First visit: the figures wait while the strip polls the job; Cancel stops it; Run
    again restarts it; when it finishes the main callback draws from the cache."""
    import sys

    import dash
    import plotly.graph_objects as go

    from attention_lens.app import create_app
    from attention_lens.components import jobs as JS
    from attention_lens.components import page as P
    from attention_lens.registry import DEFAULT_WEIGHTS, Registry

    reg = Registry([DEFAULT_WEIGHTS], default="attn-only-1l")
    app = create_app(reg)
    mod = sys.modules["attention_lens.pages.weights"]
    real, gate, layers_done = mod.circuit_svd, threading.Event(), []

    def slow_svd(lm, *args, progress=None, **kwargs):
        def report(fraction):
            assert gate.wait(TIMEOUT)
            layers_done.append(fraction)
            progress(fraction)
        return real(lm, *args, progress=report, **kwargs)

    monkeypatch.setattr(mod, "circuit_svd", slow_svd)
    monkeypatch.setattr(JS, "GRACE_S", 0.0)
    q, _ = P.parse_query(mod.CONTROLS, {})
    st = {"model": "attn-only-1l", "text": "Harry Potter", "pos": None}
    cb = mod.JOB_CALLBACKS

    def visit():
        with app.server.test_request_context():
            return mod.update(st, *[q[k] for k in mod.CONTROLS])

    *figs, table, note, store, alerts, _ = visit()
    assert figs == [dash.no_update] * 3 and table is dash.no_update and alerts == []
    assert store["labels"] == ["OV circuit SVD"] and len(store["ids"]) == 1
    values = [q[k] for k in mod.CONTROLS]
    n_page = len(mod.OUTPUTS)

    def poll(data, tick):
        out = cb["poll"](data, tick)
        assert len(out) == 8
        finished = out[7]
        page = ((dash.no_update,) * n_page if finished is dash.no_update
                else cb["draw"](finished, st, *values))
        return out[:7], page

    (style, value, label, text, disabled, cancel_style, rerun_style), page = poll(store, 0)
    assert style == JS.SHOWN and disabled is False and page == (dash.no_update,) * n_page
    assert "Computing OV circuit SVD" in text and rerun_style == JS.HIDDEN
    # a second visit while it runs joins the same job
    assert visit()[-3]["ids"] == store["ids"]
    # Cancel: the job stops at its next layer; the strip offers Run again
    assert cb["cancel"](1, store) == "Cancelling…"
    gate.set()
    job = run.get(store["ids"][0])
    assert job.wait(TIMEOUT) and job.status == "cancelled"
    assert layers_done == [0.1] and job.result is None  # stopped at its first report
    layers_done.clear()
    (style, *_, disabled, cancel_style, rerun_style), page = poll(store, 1)
    assert style == JS.SHOWN and disabled is True and rerun_style == JS.SHOWN
    assert cancel_style == JS.HIDDEN and page == (dash.no_update,) * n_page
    *_, alerts, _ = visit()
    assert "cancelled" in str(alerts[0].children)
    # Run again forgets the cancelled job; the main callback (through the "done" store)
    # starts it again; here it is left pending, then the poll draws the page once it is done
    assert "rerun" in cb["rerun"](1, store)
    assert run.get(store["ids"][0]) is None
    gate.clear()  # hold the new job at its first layer so this visit finds it pending
    *figs, table, note, store2, alerts, _ = visit()
    assert figs == [dash.no_update] * 3 and store2["ids"] != store["ids"]
    gate.set()
    job2 = run.get(store2["ids"][0])
    assert job2.wait(TIMEOUT) and job2.status == "done"
    assert layers_done and layers_done[-1] == 1.0
    (style, value, *_), page = poll(store2, 2)
    assert style == JS.HIDDEN and value == 100
    spectra, norms, directions, table, note, store3, alerts, query = page
    assert isinstance(spectra, go.Figure) and len(spectra.data) == 12 and store3 is None
    assert alerts == [] and query is dash.no_update  # the URL is left to the main callback
    # later visits draw straight from the cache
    spectra, *_, store4, alerts, _ = visit()
    assert isinstance(spectra, go.Figure) and store4 is None
    assert reg.cache_info()["weights"] >= 1


def test_same_name_in_another_registry_never_shares_a_result(run):
    """Two registries (or a reloaded model) with one model name get their own results."""
    a, b = FakeRegistry(), FakeRegistry()
    need = J.Need("svd", lambda lm, report: id(lm), "circuit SVD")
    (ra,) = J.cached_or_jobs(a, "m", [need], wait=None)
    (rb,) = J.cached_or_jobs(b, "m", [need], wait=None)
    assert ra == id(a.get("m")) and rb == id(b.get("m")) and ra != rb


def test_an_interrupted_job_thread_still_finishes_its_job(run):
    """A job whose thread is killed (SystemExit) ends as an error, so nobody waits forever."""
    def die(job):
        raise SystemExit

    job = run.submit("dies", die, "doomed")
    assert job.wait(TIMEOUT)
    assert job.status == J.ERROR and "interrupted" in job.error
