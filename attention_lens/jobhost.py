"""Job processes on one machine: Dash's disk-cache manager, started from a clean process.

Dash's ``DiskcacheManager`` forks each job from the web process. After torch or
scikit-learn has run there with several threads, the fork inherits a GNU OpenMP pool
whose threads do not exist in the child, and the job deadlocks at its first parallel
region. :class:`JobManager` starts jobs from a multiprocessing *forkserver* instead: a
fresh interpreter that imports this module (which builds the same app from the
deployment's recipe, so its ``func_registry`` holds the same job functions, and runs no
parallel torch work) and forks one child per job. The child looks its function up by
Dash's registry key, runs it with the web process's thread count, and dies with the
forkserver (``PR_SET_PDEATHSIG``), which exits when the web process does.

The web process watches every job it starts: a job that ends without a result (killed,
out of memory, past its deadline) gets an error record in its result slot, which the
page's error handler turns into a message with "Run again"; a poll for a job whose
process is gone and whose server is gone too gets "the server restarted". Every job kind
has a deadline; its slot is released as soon as it ends.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import pickle
import signal
import threading
import time
from multiprocessing import context as mp_context
from multiprocessing import popen_forkserver, process as mp_process, spawn
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable, Optional

from dash import DiskcacheManager

log = logging.getLogger(__name__)

#: Environment variable carrying the app recipe to the forkserver (read at its start).
RECIPE_ENV = "ATTENTION_LENS_JOB_RECIPE"
#: Caps every job's deadline, in seconds (for tests and small machines).
DEADLINE_ENV = "ATTENTION_LENS_JOB_DEADLINE"
#: A job kind's deadline when it names none (seconds).
DEFAULT_DEADLINE_S = 900.0
#: How long the error record of a stopped job waits for its page (seconds).
RECORD_S = 600.0
#: How often a job's watch looks up from waiting for its job (seconds).
WATCH_STEP_S = 0.5
#: The text an error record starts with; the page shows what follows.
STOPPED = "JOB STOPPED: "
PR_SET_PDEATHSIG = 1


def job_deadline(kind_deadline: Optional[float]) -> float:
    """The deadline of a job kind, capped by :data:`DEADLINE_ENV`."""
    d = float(kind_deadline or DEFAULT_DEADLINE_S)
    cap = os.environ.get(DEADLINE_ENV, "").strip()
    if cap:
        try:
            d = min(d, max(0.5, float(cap)))
        except ValueError:
            log.warning("%s=%r is not a number of seconds; ignored", DEADLINE_ENV, cap)
    return d


def stopped_record(reason: str, labels: Optional[list] = None) -> dict:
    """The result a page gets for a job that ended without one (``labels``: what the job
    was computing)."""
    what = json.dumps({"reason": reason, "labels": [str(x) for x in labels or []]})
    return {"background_callback_error": {"msg": STOPPED + what, "tb": ""}}


def stopped_reason(message: str) -> Optional[dict]:
    """What stopped a job (``{"reason", "labels"}``), from the text of Dash's
    background-callback error; None if the job's own code failed."""
    i = message.find(STOPPED)
    if i < 0:
        return None
    try:
        what, _ = json.JSONDecoder().raw_decode(message[i + len(STOPPED):])
    except ValueError:
        return None
    return what if isinstance(what, dict) else None


def _labels_of(args: Any) -> list:
    """The labels of a page job's request (what it computes), if any."""
    values = args.values() if isinstance(args, dict) else (
        args if isinstance(args, (list, tuple)) else [args])
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("labels"), list):
            return [str(x) for x in v["labels"]][:20]
    return []


def describe_exit(code: Optional[int]) -> str:
    """Why a job process ended, in words, from its exit code."""
    if code is None:
        return "its process vanished"
    if code == -signal.SIGKILL:
        return ("its process was killed (SIGKILL), most likely because the machine ran out "
                "of memory")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"its process was stopped by {name}"
    return f"its process exited with status {code}"


# ------------------------------------------------------------------- the forkserver side
_BUILT: dict[str, Any] = {}


def _recipe_key(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True, default=str)


def build(recipe: dict) -> Any:
    """The job manager of an app built from ``recipe`` in this process (cached). The recipe
    names the function that builds it (``module:function``, the app factory's own
    :func:`attention_lens.server.app.build_for_jobs`), so this module needs nothing above it."""
    key = _recipe_key(recipe)
    if key in _BUILT:
        return _BUILT[key]
    import importlib

    module, _, name = str(recipe["builder"]).partition(":")
    app = getattr(importlib.import_module(module), name)(recipe)
    _BUILT.clear()  # one app per process
    _BUILT[key] = app._attention_lens_background.manager
    _BUILT["app"] = app
    return _BUILT[key]


def _preload() -> None:
    """In the forkserver: build the app of the recipe in the environment and load its default
    model, on one thread (torch never starts a thread pool here, so every fork is clean)."""
    raw = os.environ.get(RECIPE_ENV)
    if mp_process.current_process().name != "MainProcess":
        return
    if not raw:
        return
    try:
        import torch

        torch.set_num_threads(1)  # nothing here may start an OpenMP pool
        build(json.loads(raw))
        from . import registry

        reg = registry.current()  # jobs on the default model find it loaded (copy on write)
        reg.get(reg.default)
    except Exception:  # noqa: BLE001 - the job builds it again and reports what fails
        log.exception("the job host could not build the app in advance")


def _die_with_parent() -> None:
    """SIGKILL this process when its parent (the forkserver) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return


def run_job(recipe: dict, fn_key: str, result_key: str, progress_key: str, args: Any,
            context: dict, threads: int, forkserver_pid: int) -> None:
    """The job process: find the job function by its key and run it."""
    _die_with_parent()
    if os.getppid() != forkserver_pid:  # the forkserver died before prctl
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    torch.set_num_threads(max(1, int(threads)))
    manager = build(recipe)
    job_fn = manager.func_registry.get(fn_key)
    if job_fn is None:
        manager.handle.set(result_key, stopped_record(
            "the job host does not know this job (the server's code changed); reload the page"),
            expire=RECORD_S)
        return
    job_fn(result_key, progress_key, args, context)


# --------------------------------------------------------------------- the web-process side
class _Popen(popen_forkserver.Popen):
    """The forkserver's ``Popen``, without re-running the web process's ``__main__`` in the
    job (``python app.py`` would build a second server there)."""

    def _launch(self, process_obj: Any) -> None:
        import io

        from multiprocessing import forkserver, reduction, util
        from multiprocessing.context import set_spawning_popen

        prep = spawn.get_preparation_data(process_obj._name)
        prep.pop("init_main_from_path", None)
        prep.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _JobProcess(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


_SERVER_LOCK = threading.Lock()


def ensure_forkserver(recipe: Optional[dict]) -> int:
    """Start the forkserver (once per process; again if it died) with ``recipe`` preloaded;
    its pid. The recipe travels in the forkserver's environment only."""
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        fs = forkserver._forkserver
        fs.set_forkserver_preload([__name__])
        old = os.environ.get(RECIPE_ENV)
        if recipe is not None:
            os.environ[RECIPE_ENV] = _recipe_key(recipe)
        try:
            fs.ensure_running()
        finally:
            if old is None:
                os.environ.pop(RECIPE_ENV, None)
            else:  # pragma: no cover - never set in a web process
                os.environ[RECIPE_ENV] = old
        return int(fs._forkserver_pid)


def _token_of(args: Any) -> Optional[str]:
    """The job-slot token in a page job's arguments (its request), if any."""
    values = args.values() if isinstance(args, dict) else (
        args if isinstance(args, (list, tuple)) else [args])
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("token"), str):
            return v["token"]
    return None


def _plain_context(context: Any) -> dict:
    """The callback context as plain picklable values (what the job reads of it)."""
    out = {}
    for k, v in dict(context).items():
        try:
            pickle.dumps(v)
        except Exception:  # noqa: BLE001 - left out: the job cannot use it anyway
            continue
        out[k] = v
    return out


def job_recipe(builder: str, reg: Any, bg: Any, **app_options: Any) -> Optional[dict]:
    """What the job host needs to build the same app: the registry's folders and limits,
    the background's stores, the app factory's options (JSON values). None when the
    registry holds models added in memory (tests, notebooks), which no other process can
    load: their jobs are forked from the web process, as Dash does (pin the threads there,
    e.g. ``torch.set_num_threads(1)``, or save the model to a folder)."""
    if any(getattr(e, "kind", "") == "memory" for e in reg.entries()):
        return None
    return {
        "builder": builder,
        "cache_dir": str(bg.cache_dir) if bg.cache_dir else None,
        "max_jobs": bg.max_jobs, "deployment": bg.deployment,
        "slot_scope": getattr(getattr(bg, "slots", None), "scope", ""),
        "registry": {"models_dirs": [str(d) for d in reg.models_dirs], "default": reg.default,
                     "max_models": reg.max_models, "max_forward": reg.max_forward,
                     "max_weights": reg.max_weights,
                     "max_forward_bytes": reg.max_forward_bytes,
                     "max_weights_bytes": reg.max_weights_bytes,
                     "max_tokens": reg.max_tokens, "device": str(reg.device),
                     "user_models": bool(getattr(reg, "user_models", False)),
                     "hf_cache": bool(getattr(reg, "hf_cache", False)),
                     "cache_dir": (str(reg.cache_dir)
                                   if getattr(reg, "cache_dir", None) else None)},
        "app": {k: (str(v) if isinstance(v, os.PathLike) else v)
                for k, v in app_options.items() if v is not None},
    }


class JobManager(DiskcacheManager):
    """Dash's disk-cache manager with jobs started from a forkserver, watched, and bounded
    by a deadline (see the module text)."""

    def __init__(self, cache: Any, *, slots: Optional[Callable[[], Any]] = None,
                 **kwargs: Any) -> None:
        self.recipe: Optional[dict] = None  # set by the app factory (see job_recipe)
        self.slots = slots  # () -> Slots, for releasing a dead job's slot
        self._deadlines: dict[str, float] = {}
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()
        super().__init__(cache, **kwargs)
        atexit.register(self.kill_all)

    # registration: remember each job kind's deadline by its key
    def make_job_fn(self, fn: Any, progress: Any, key: Any = None) -> Any:
        if key is not None:
            self._deadlines[key] = job_deadline(getattr(fn, "deadline_s", None))
        job_fn = super().make_job_fn(fn, progress, key)
        job_fn.al_key = key
        return job_fn

    def _key_of(self, job_fn: Any) -> Optional[str]:
        key = getattr(job_fn, "al_key", None)
        if key is not None:
            return key
        return next((k for k, f in self.func_registry.items() if f is job_fn), None)

    def start_host(self) -> Optional[int]:
        """Start the job host now (else the first job waits for it); its pid."""
        return ensure_forkserver(self.recipe) if self.recipe is not None else None

    def call_job_fn(self, key: str, job_fn: Any, args: Any, context: Any) -> int:
        """Start the job in a forkserver child; watch it; return its pid."""
        import psutil
        import torch

        fn_key = self._key_of(job_fn)
        if fn_key is None:
            raise RuntimeError("this job cannot be started: its function is not registered")
        token = _token_of(args)
        slots = self.slots() if self.slots is not None else None
        if token and slots is not None:
            slots.claim(token)  # a request whose reservation expired gets "busy" from the job
        deadline = self._deadlines.get(fn_key) or job_deadline(None)
        if self.recipe is not None:
            fs_pid = ensure_forkserver(self.recipe)
            proc = _JobProcess(target=run_job, daemon=True,
                               name=f"attention-lens-job-{key[:8]}",
                               args=(self.recipe, fn_key, key, self._make_progress_key(key),
                                     args, _plain_context(context), torch.get_num_threads(),
                                     fs_pid))
            proc.start()
            mp_process._children.discard(proc)  # never joined at exit: killed by kill_all
        else:  # models in memory only: forked from here, as Dash does (see job_recipe)
            from multiprocess import Process
            from multiprocess import process as mpx_process

            proc = Process(target=job_fn, daemon=True,
                           args=(key, self._make_progress_key(key), args, context))
            proc.start()
            mpx_process._children.discard(proc)
        pid = int(proc.pid)
        try:
            ct = psutil.Process(pid).create_time()
        except psutil.Error:
            ct = None
        labels = _labels_of(args)
        self.handle.set(self._job_key(pid), {"key": key, "owner": os.getpid(), "ct": ct,
                                             "token": token, "t": time.time(),
                                             "deadline": deadline, "labels": labels},
                        expire=deadline + RECORD_S)
        with self._lock:
            self._procs[pid] = proc
        threading.Thread(target=self._watch, args=(proc, key, token, deadline, labels),
                         daemon=True,
                         name=f"job-watch-{pid}").start()
        return pid

    @staticmethod
    def _job_key(pid: Any) -> str:
        return f"al-job:{int(pid)}"

    @staticmethod
    def _stop_key(pid: Any) -> str:
        return f"al-job-stopped:{int(pid)}"

    def _watch(self, proc: Any, key: str, token: Optional[str], deadline: float,
               labels: list) -> None:
        """Wait for the job's end (or deadline); report an end without a result.

        A server embedded in another program may stop its threads by raising
        ``SystemExit`` in them (Dash's threaded test runner does, in every thread started
        after it): the server is stopping, so the job stops with it, its slot is given back
        and the thread ends quietly."""
        try:
            self._watch_job(proc, key, token, deadline, labels)
        except SystemExit:
            self._stopped_with_server(proc, key, token, labels)

    def _watch_job(self, proc: Any, key: str, token: Optional[str], deadline: float,
                   labels: list) -> None:
        pid = int(proc.pid)
        reason = None
        end = time.monotonic() + deadline
        # short waits, so that a stop asked of this thread (above) is seen at once
        while not mp_wait([proc.sentinel],
                          timeout=min(WATCH_STEP_S, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end:
                reason = (f"it ran past its deadline of {deadline:g} s and was stopped "
                          "(a smaller model or input may fit)")
                self._kill(pid)
                break
        proc.join(5)
        code = proc.exitcode
        try:
            asked = self.handle.get(self._stop_key(pid)) is not None
            if (reason or code != 0) and not asked and self.handle.get(key) is None:
                reason = reason or describe_exit(code)
                self.handle.add(key, stopped_record(reason, labels), expire=RECORD_S)
                log.warning("background job %s (pid %d) ended without a result: %s",
                            key[:12], pid, reason)
            self.handle.delete(self._job_key(pid))
            self._release(token, pid)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown
            log.warning("could not record the end of job %d", pid, exc_info=True)
        finally:
            with self._lock:
                self._procs.pop(pid, None)

    def _stopped_with_server(self, proc: Any, key: str, token: Optional[str],
                             labels: list) -> None:
        """The watch was stopped with its server: stop the job, record why, free its slot."""
        pid = int(proc.pid)
        try:
            self._kill(pid)
            proc.join(1)
            if self.handle.get(self._stop_key(pid)) is None and self.handle.get(key) is None:
                self.handle.add(key, stopped_record(
                    "the server stopped before the job finished", labels), expire=RECORD_S)
            self.handle.delete(self._job_key(pid))
            self._release(token, pid)
        except Exception:  # noqa: BLE001 - the store may be gone with its server
            log.debug("could not record the stop of job %d", pid, exc_info=True)
        finally:
            with self._lock:
                self._procs.pop(pid, None)

    def _release(self, token: Optional[str], pid: int) -> None:
        slots = self.slots() if self.slots is not None else None
        if slots is None:
            return
        if token:
            slots.release(token)
        slots.release_pid(pid)

    @staticmethod
    def _kill(pid: int) -> None:
        import psutil

        try:
            p = psutil.Process(pid)
            for c in p.children(recursive=True):
                c.kill()
            p.kill()
        except psutil.Error:
            pass

    def _is_ours(self, pid: int) -> Optional[dict]:
        """The record of job ``pid`` if that pid is still the job we started."""
        import psutil

        rec = self.handle.get(self._job_key(pid))
        if not isinstance(rec, dict):
            return None
        try:
            if rec.get("ct") is not None and psutil.Process(pid).create_time() != rec["ct"]:
                return None
        except psutil.Error:
            pass
        return rec

    def terminate_job(self, job: Any) -> None:
        """Stop job ``job`` (Cancel, a newer job, or its result read): kill it now, give back
        its slot, and let nothing report it as failed."""
        if job is None:
            return
        pid = int(job)
        rec = self._is_ours(pid)
        if rec is None:  # not a job of this deployment (or long gone): never kill a stranger
            return
        self.handle.set(self._stop_key(pid), 1, expire=RECORD_S)
        import psutil

        self._kill(pid)
        try:
            psutil.Process(pid).wait(1)
        except (psutil.Error, psutil.TimeoutExpired):
            pass
        self._release(rec.get("token"), pid)

    def job_running(self, job: Any) -> bool:
        if job is None:
            return False
        return bool(super().job_running(job)) and self._is_ours(int(job)) is not None

    def get_result(self, key: str, job: Any) -> Any:
        """The job's result; for a job whose process is gone without one, the record of why."""
        if (job is not None and self.handle.get(key) is None and not self.job_running(job)
                and self.handle.get(self._stop_key(job)) is None):  # not asked to stop
            self._report_lost(key, int(job))
        return super().get_result(key, job)

    def _report_lost(self, key: str, pid: int) -> None:
        import psutil

        with self._lock:
            proc = self._procs.get(pid)
        end = time.time() + (3.0 if proc is not None else 1.5)
        while time.time() < end:  # the watcher (here or in another worker) writes it
            if self.handle.get(key) is not None:
                return
            time.sleep(0.1)
        rec = self.handle.get(self._job_key(pid))
        owner = rec.get("owner") if isinstance(rec, dict) else None
        if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
            reason = "its process vanished without a result"
        else:
            reason = ("the server restarted (or its job process vanished) before the job "
                      "finished")
        if self.handle.get(self._stop_key(pid)) is None:
            labels = rec.get("labels") if isinstance(rec, dict) else None
            self.handle.add(key, stopped_record(reason, labels), expire=RECORD_S)

    def kill_all(self) -> None:
        """Kill every job this process started (at exit)."""
        with self._lock:
            pids = list(self._procs)
        for pid in pids:
            self._kill(pid)


def _exit_with_parent(every: float = 0.2) -> None:
    """In the forkserver: exit at once when the web process is gone (its jobs follow by
    ``PR_SET_PDEATHSIG``). The forkserver's own exit on its parent's death comes only after
    a slow interpreter shutdown; this watch never touches a lock a job could inherit."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


if os.environ.get(RECIPE_ENV):
    # imported by the forkserver as its preload: the web process sets the recipe only in
    # the forkserver's environment, and the jobs forked from it must not inherit it
    _exit_with_parent()
    _preload()
    os.environ.pop(RECIPE_ENV, None)
