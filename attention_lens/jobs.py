"""Background jobs for heavy weight-only analyses: threads in this process, progress, cancel.

A job runs ``fn(job)`` on a worker thread; ``fn`` calls ``job.report(fraction)`` between
layers, which records the progress and raises :class:`JobCancelled` once the job was
cancelled, so a cancelled analysis stops at the next layer. Threads (not processes) are
used because the results land in the process-wide ``Registry.weights`` cache that page
callbacks read.

Jobs are keyed by ``(model, analysis key)``: concurrent identical requests share one job.
At most ``max_workers`` jobs run at once (the others wait, "queued"), and at most
``keep`` finished jobs are remembered (the oldest finished ones are forgotten first).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

from .analysis.errors import AnalysisError

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)


class JobCancelled(Exception):
    """Raised inside a job's function by :meth:`Job.report` once the job was cancelled."""


@dataclass
class Job:
    """One background computation and what is known about it."""

    id: str
    key: Hashable
    label: str
    status: str = QUEUED
    progress: float = 0.0
    result: Any = None
    error: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def report(self, fraction: float) -> None:
        """Record progress in [0, 1]; raise :class:`JobCancelled` if the job was cancelled."""
        if self._cancel.is_set():
            raise JobCancelled(self.label)
        self.progress = max(self.progress, min(1.0, max(0.0, float(fraction))))

    @property
    def cancelled(self) -> bool:
        """True once cancellation was asked for (the job may still be finishing a layer)."""
        return self._cancel.is_set()

    @property
    def finished_ok(self) -> bool:
        """True when the job finished with a result."""
        return self.status == DONE

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job finished (or ``timeout`` seconds passed); True if it finished."""
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready status (no result)."""
        return {"id": self.id, "label": self.label, "status": self.status,
                "progress": round(self.progress, 4), "error": self.error}


class JobRunner:
    """A bounded pool of worker threads running keyed jobs."""

    def __init__(self, max_workers: int = 2, keep: int = 32) -> None:
        if max_workers < 1 or keep < 0:
            raise ValueError("max_workers must be at least 1 and keep at least 0")
        self.max_workers, self.keep = max_workers, keep
        # one daemon thread per job, at most max_workers computing at once: a thread that
        # dies abnormally takes only its own job with it (never a pool worker others wait on)
        self._slots = threading.BoundedSemaphore(max_workers)
        self._closed = False
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # id -> job, oldest first
        self._by_key: dict[Hashable, str] = {}
        self._ids = itertools.count(1)

    def submit(self, key: Hashable, fn: Callable[[Job], Any], label: str = "") -> Job:
        """The job for ``key``: the one running, queued or done already, else a new one.

        A job that failed or was cancelled is replaced by a new one.
        """
        with self._lock:
            old = self._jobs.get(self._by_key.get(key, ""))
            if old is not None and old.status in (QUEUED, RUNNING, DONE):
                return old
            job = Job(id=f"job-{next(self._ids)}", key=key, label=label or str(key))
            if old is not None:
                self._forget(old)
            self._jobs[job.id] = job
            self._by_key[key] = job.id
        if self._closed:
            raise RuntimeError("the job runner was shut down")
        threading.Thread(target=self._run, args=(job, fn), daemon=True,
                         name=f"attention-lens-{job.id}").start()
        return job

    def _run(self, job: Job, fn: Callable[[Job], Any]) -> None:
        try:
            with self._slots:
                if job.cancelled:
                    raise JobCancelled(job.label)
                job.status, job.started = RUNNING, time.monotonic()
                job.result = fn(job)
                job.progress, job.status = 1.0, DONE
        except JobCancelled:
            job.status = CANCELLED
        except (SystemExit, KeyboardInterrupt):  # the thread was killed: fail this job only
            job.status, job.error = ERROR, f"the {job.label} analysis was interrupted"
        except AnalysisError as exc:
            job.status, job.error = ERROR, str(exc)
        except Exception as exc:  # noqa: BLE001 - a worker thread must never die silently
            log.exception("background job %s failed", job.label)
            job.status = ERROR
            job.error = f"the {job.label} analysis failed ({type(exc).__name__}; details in " \
                        "the server log)"
        finally:
            if job.status not in FINISHED:  # the thread was interrupted (e.g. SystemExit)
                job.status, job.error = ERROR, f"the {job.label} analysis was interrupted"
            job.finished = time.monotonic()
            job._done.set()
            with self._lock:
                self._trim()

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if self._by_key.get(job.key) == job.id:
            del self._by_key[job.key]

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for job in finished[: max(0, len(finished) - self.keep)]:
            self._forget(job)

    def get(self, job_id: str) -> Optional[Job]:
        """The job with this id, or None when it is unknown or was forgotten."""
        with self._lock:
            return self._jobs.get(job_id)

    def find(self, key: Hashable) -> Optional[Job]:
        """The job for ``key``, or None."""
        with self._lock:
            return self._jobs.get(self._by_key.get(key, ""))

    def cancel(self, job_id: str) -> bool:
        """Ask a queued or running job to stop at its next progress report."""
        job = self.get(job_id)
        if job is None or job.status in FINISHED:
            return False
        job._cancel.set()
        return True

    def forget(self, job_id: str) -> None:
        """Drop a finished job (its key starts afresh next time); running jobs stay."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.status in FINISHED:
                self._forget(job)

    def jobs(self) -> list[Job]:
        """Every job remembered, oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def shutdown(self, cancel: bool = True, timeout: Optional[float] = 30.0) -> None:
        """Refuse new jobs and wait for running ones (cancelling them first when ``cancel``)."""
        self._closed = True
        jobs = self.jobs()
        if cancel:
            for job in jobs:
                job._cancel.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in jobs:
            job.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))


_RUNNER: Optional[JobRunner] = None
_RUNNER_LOCK = threading.Lock()


def runner() -> JobRunner:
    """The process-wide job runner."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = JobRunner()
        return _RUNNER


def set_runner(new: JobRunner) -> None:
    """Install the process-wide job runner (tests, servers with other limits)."""
    global _RUNNER
    with _RUNNER_LOCK:
        _RUNNER = new


# ------------------------------------------------------------ cached weight analyses
class JobPending(AnalysisError):
    """Weight analyses still running in the background (an AnalysisError, so exports and
    other callers that cannot wait show its message)."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)
        done = sum(j.progress for j in self.jobs) / max(1, len(self.jobs))
        names = ", ".join(j.label for j in self.jobs)
        super().__init__(f"still computing {names} ({done:.0%}); try again when it has "
                         "finished")

    @property
    def progress(self) -> float:
        """Mean progress of the pending jobs."""
        return sum(j.progress for j in self.jobs) / max(1, len(self.jobs))


class _NotCached(Exception):
    pass


def _not_cached(_: Any) -> Any:
    raise _NotCached


@dataclass(frozen=True)
class Need:
    """A weight-only analysis a page needs: its cache key, how to compute it, a label.

    ``compute(lm, report)`` receives a progress callback taking a fraction in [0, 1].
    """

    key: Hashable
    compute: Callable[[Any, Callable[[float], None]], Any]
    label: str


#: How long :func:`cached_or_jobs` waits for new jobs by default (None: until they finish).
#: Page callbacks set it for the duration of a request (see ``components.jobs``).
WAIT: ContextVar[Optional[float]] = ContextVar("attention_lens_job_wait", default=None)
_DEFAULT = object()


def cached_or_jobs(reg: Any, model: str, needs: Sequence[Need],
                   wait: Any = _DEFAULT) -> list[Any]:
    """The cached results of ``needs`` for ``model``; missing ones start as background jobs.

    Waits up to ``wait`` seconds (None: until they finish; default: :data:`WAIT`) for the
    jobs, then raises
    :class:`JobPending` listing those still running. A job that failed re-raises its
    message as an :class:`AnalysisError` (and is forgotten, so the next request retries);
    a cancelled one says so until it is forgotten.
    """
    lm = reg.get(model)
    run = runner()
    values: list[Any] = [None] * len(needs)
    pending: list[tuple[int, Job]] = []
    for i, need in enumerate(needs):
        try:
            values[i] = reg.weights(lm.name, need.key, _not_cached)
            continue
        except _NotCached:
            pass
        # keyed by this registry and this loaded instance too: a model of the same name in
        # another registry (or reloaded from another folder) never shares a result
        job_key = (id(reg), lm.name, id(lm), need.key)
        job = run.find(job_key)
        if job is not None and job.status == CANCELLED:
            raise AnalysisError(f"the {job.label} analysis was cancelled; press \"Run again\" "
                                "to start it")

        def fn(job: Job, need: Need = need) -> Any:
            return reg.weights(lm.name, need.key, lambda m: need.compute(m, job.report))

        pending.append((i, run.submit(job_key, fn, need.label)))
    if wait is _DEFAULT:
        wait = WAIT.get()
    deadline = None if wait is None else time.monotonic() + wait
    for i, job in pending:
        job.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    still = [job for _, job in pending if job.status not in FINISHED]
    if still:
        raise JobPending(still)
    for i, job in pending:
        if job.status == ERROR:
            run.forget(job.id)
            raise AnalysisError(job.error or f"the {job.label} analysis failed")
        if job.status == CANCELLED:
            raise AnalysisError(f"the {job.label} analysis was cancelled; press \"Run again\" "
                                "to start it")
        values[i] = job.result
    return values
