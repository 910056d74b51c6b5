"""A page's background-job strip: progress bar, Cancel, Run again, and the polling behind it.

A page whose main callback needs a heavy weight analysis:

1. puts ``job_strip(PAGE)`` in its layout, appends ``job_output(PAGE)`` to the main
   callback's outputs (keep that list as ``OUTPUTS``) and ``job_input(PAGE)`` to its inputs
   (the main callback ignores its value: "Run again" uses it to restart the jobs);
2. wraps its body with ``@in_background(n)`` (below ``P.analysis_callback``), where ``n``
   is the number of outputs before the job store. Inside, it fetches weight analyses with
   :func:`attention_lens.jobs.cached_or_jobs`;
3. calls ``register_job_callbacks(PAGE, update, OUTPUTS, list(CONTROLS))`` once.

A cached result is drawn at once; a missing one starts a job, and if it is not done
within ``GRACE_S`` the figures keep their content while the strip shows the progress
(polled by a ``dcc.Interval``) with a Cancel button; when the job finishes the poll
stops and signals a draw callback, which runs the page's main callback body once and draws
from the cache.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional, Sequence

import dash_bootstrap_components as dbc
import flask
from dash import Input, Output, State, callback, dcc, html, no_update
from dash.exceptions import PreventUpdate

from .. import jobs as J
from . import page as P
from . import shell

#: Seconds a main callback waits for a new job before showing the progress strip (short
#: analyses then draw without a flash of progress bar).
GRACE_S = 0.4
#: Polling period of the progress bar (ms).
POLL_MS = 500
HIDDEN, SHOWN = {"display": "none"}, {"display": "flex"}


def _ids(page: str) -> dict[str, str]:
    return {k: f"{page}-job-{k}" for k in ("store", "done", "finished", "tick", "strip",
                                          "bar", "text", "cancel", "rerun")}


def job_output(page: str) -> Output:
    """The main callback's extra output: the store naming the pending jobs (or None)."""
    return Output(_ids(page)["store"], "data")


def job_input(page: str) -> Input:
    """The main callback's extra input: changes when a job finished or is to run again."""
    return Input(_ids(page)["done"], "data")


def job_strip(page: str) -> html.Div:
    """Progress bar, status text, Cancel and Run again buttons (hidden until needed)."""
    i = _ids(page)
    return html.Div([
        dcc.Store(id=i["store"]), dcc.Store(id=i["done"]), dcc.Store(id=i["finished"]),
        dcc.Interval(id=i["tick"], interval=POLL_MS, disabled=True),
        html.Div([
            html.Span(id=i["text"], className="al-job-text me-2 small"),
            dbc.Progress(id=i["bar"], value=0, striped=True, animated=True,
                         style={"flex": "1 1 auto", "minWidth": "10rem"}, className="me-2"),
            dbc.Button("Cancel", id=i["cancel"], size="sm", color="warning", outline=True,
                       n_clicks=0),
            dbc.Button("Run again", id=i["rerun"], size="sm", color="info", outline=True,
                       n_clicks=0, style=HIDDEN),
        ], id=i["strip"], style=HIDDEN, className="al-job align-items-center my-2",
            **{"aria-live": "polite"}),
    ])


def in_background(n_outputs: int, grace: Optional[float] = None
                  ) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """Append the job store to a main callback body's outputs; pending jobs keep figures.

    Inside a request the body waits ``grace`` seconds (default :data:`GRACE_S`) for new
    jobs; called directly (tests, notebooks) it waits until they finish.
    """

    def deco(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        @functools.wraps(fn)
        def inner(state: dict, query: dict) -> tuple:
            wait = (GRACE_S if grace is None else grace) if flask.has_request_context() else None
            token = J.WAIT.set(wait)
            try:
                return (*fn(state, query), None)
            except J.JobPending as pending:
                return (*(no_update,) * n_outputs,
                        {"ids": [j.id for j in pending.jobs],
                         "labels": [j.label for j in pending.jobs]})
            finally:
                J.WAIT.reset(token)

        return inner

    return deco


def job_status(ids: list[str]) -> tuple[str, float, str]:
    """(overall status, mean progress, text) of the jobs with these ids."""
    run = J.runner()
    jobs = [run.get(i) for i in ids]
    known = [j for j in jobs if j is not None]
    if not known:
        return "gone", 1.0, ""
    progress = sum(j.progress for j in known) / len(known)
    names = ", ".join(j.label for j in known)
    if any(j.status == J.CANCELLED or (j.cancelled and j.status not in J.FINISHED)
           for j in known):
        finishing = any(j.status not in J.FINISHED for j in known)
        return ("cancelling" if finishing else "cancelled", progress,
                f"Cancelling {names}…" if finishing else f"Cancelled {names}.")
    if all(j.status in J.FINISHED for j in known):
        return "finished", 1.0, ""
    queued = all(j.status == J.QUEUED for j in known if j.status not in J.FINISHED)
    return "running", progress, (f"Waiting for a free worker: {names}" if queued
                                 else f"Computing {names} (first visit for this model)…")


def register_job_callbacks(page: str, update: Optional[Callable[..., tuple]] = None,
                           outputs: Sequence[Output] = (),
                           controls: Sequence[str] = ()) -> dict[str, Callable[..., Any]]:
    """The polling, Cancel and Run again callbacks of ``page``'s job strip.

    When the pending jobs finish, the poll stops the timer and writes the "finished" store;
    the draw callback then calls the page's main callback body
    ``update(state, *control_values)`` once and writes its ``outputs`` (duplicates of the
    main callback's, the URL query store left alone). Signalling the main callback through
    one of its inputs instead would close a dependency cycle (main -> store -> poll ->
    main), which the browser refuses to run.
    """
    i = _ids(page)
    dup = [Output(o.component_id, o.component_property, allow_duplicate=True)
           for o in outputs]
    n = len(dup)
    states = [State(shell.STATE, "data")] + [State(P.control_id(page, c), "value")
                                             for c in controls]

    @callback(Output(i["strip"], "style"), Output(i["bar"], "value"), Output(i["bar"], "label"),
              Output(i["text"], "children"), Output(i["tick"], "disabled"),
              Output(i["cancel"], "style"), Output(i["rerun"], "style"),
              Output(i["finished"], "data"),
              Input(i["store"], "data"), Input(i["tick"], "n_intervals"),
              prevent_initial_call=True)
    def poll(data: Optional[dict], _: Any) -> tuple:
        """Show the pending jobs' progress; stop polling and signal once they finish.

        The poll answers at once and never draws: a drawing slower than the polling period
        would be overtaken by the next poll, whose reply the browser prefers, forever.
        """
        if not data or not data.get("ids"):
            return (HIDDEN, 0, "", "", True, SHOWN, HIDDEN, no_update)
        status, progress, text = job_status(data["ids"])
        pct = round(100 * progress)
        if status in ("finished", "gone"):
            return (HIDDEN, 100, "", "", True, SHOWN, HIDDEN, {"ids": data["ids"]})
        if status == "cancelled":
            return (SHOWN, pct, f"{pct}%", text, True, HIDDEN, SHOWN, no_update)
        return (SHOWN, pct, f"{pct}%", text, False, SHOWN, HIDDEN, no_update)

    @callback(*dup, Input(i["finished"], "data"), *states, prevent_initial_call=True)
    def draw(finished: Optional[dict], state: Optional[dict] = None, *values: Any) -> tuple:
        """Draw the page from the finished jobs' cached results (once per finish)."""
        if not finished or update is None or not state:
            raise PreventUpdate
        outs = tuple(update(state, *values))
        if len(outs) != n:
            raise PreventUpdate
        return (*outs[:-1], no_update)

    @callback(Output(i["text"], "children", allow_duplicate=True),
              Input(i["cancel"], "n_clicks"), State(i["store"], "data"),
              prevent_initial_call=True)
    def cancel(n: Optional[int], data: Optional[dict]) -> str:
        """Ask the pending jobs to stop after the layer they are on."""
        if not n or not data:
            raise PreventUpdate
        stopped = [J.runner().cancel(job_id) for job_id in data.get("ids", [])]
        return "Cancelling…" if any(stopped) else no_update

    @callback(Output(i["done"], "data", allow_duplicate=True),
              Input(i["rerun"], "n_clicks"), State(i["store"], "data"),
              prevent_initial_call=True)
    def rerun(n: Optional[int], data: Optional[dict]) -> dict:
        """Forget the cancelled jobs and let the main callback start them again."""
        if not n or not data:
            raise PreventUpdate
        for job_id in data.get("ids", []):
            J.runner().forget(job_id)
        return {"ids": data.get("ids", []), "rerun": time.time()}

    return {"poll": poll, "draw": draw, "cancel": cancel, "rerun": rerun}
