"""A page's background-job strip: progress, Cancel, Run again, on a Dash background callback.

A page's main callback draws from cached results. When a weight analysis it needs is not
computed yet (:class:`attention_lens.weight_analyses.Missing`), it takes a job slot and
writes a job request into the page's request store; the page's background callback (one
per page, ``background=True``) then runs in a job process (forked from the job host on
one machine, a Celery worker in a lab): it computes what is missing with progress shown in
the strip and Cancel beside it, and returns the page's outputs drawn from the results.
Over the job bound the main callback says the server is busy and offers "Run again". A job
that ends without a result (killed, out of memory, past its deadline, its server restarted)
is reported in the page's alerts with "Run again", and its bar goes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import dash_bootstrap_components as dbc
from dash import Input, Output, State, callback, dcc, html, no_update
from dash.exceptions import PreventUpdate

log = logging.getLogger(__name__)
HIDDEN, SHOWN = {"display": "none"}, {"display": "flex"}
#: Milliseconds between the browser's looks at a running job.
POLL_MS = 400
#: Seconds a page's job may run before it is stopped and reported (weight analyses of a
#: GPT-2-sized model take a few minutes on two cores).
DEADLINE_S = 900.0


def ids(page: str) -> dict[str, str]:
    """Component ids of ``page``'s strip."""
    return {k: f"{page}-job-{k}" for k in ("request", "strip", "bar", "text", "cancel",
                                          "after", "note", "rerun")}


def strip(page: str) -> html.Div:
    """The request store, the progress strip (shown while a job runs) and the Run again row."""
    i = ids(page)
    return html.Div([
        dcc.Store(id=i["request"]),
        html.Div([
            html.Span(id=i["text"], className="al-job-text me-2 small"),
            dbc.Progress(id=i["bar"], value=0, striped=True, animated=True,
                         style={"flex": "1 1 auto", "minWidth": "10rem"}, className="me-2"),
            dbc.Button("Cancel", id=i["cancel"], size="sm", color="warning", outline=True,
                       n_clicks=0),
        ], id=i["strip"], style=HIDDEN, className="al-job align-items-center my-2",
            **{"aria-live": "polite"}),
        html.Div([
            html.Span(id=i["note"], className="al-job-text me-2 small"),
            dbc.Button("Run again", id=i["rerun"], size="sm", color="info", outline=True,
                       n_clicks=0),
        ], id=i["after"], style=HIDDEN, className="al-job align-items-center my-2"),
    ])


def main_outputs(page: str) -> list[Output]:
    """What a main callback writes into the strip: the job request, the Run again row."""
    i = ids(page)
    return [Output(i["request"], "data"), Output(i["after"], "style"),
            Output(i["note"], "children")]


def rerun_input(page: str) -> Input:
    """The main callback's input that starts a cancelled or refused job again."""
    return Input(ids(page)["rerun"], "n_clicks")


def stopped_message(reason: str, labels: str) -> str:
    """What the page says when its job ended without a result."""
    return f"The job computing {labels} stopped unexpectedly: {reason}."


def register(page: str, outputs: Sequence[Output], states: Sequence[State],
             run: Callable[..., tuple], deadline_s: float = DEADLINE_S
             ) -> dict[str, Callable[..., Any]]:
    """The page's background callback and its Cancel note.

    ``run(set_progress, request, *state_values)`` returns the values of ``outputs``
    (duplicates of the main callback's drawing outputs; the last one is the page's alerts)
    followed by the Run again row's style and note. A job that ends without a result
    (killed, out of memory, past ``deadline_s``, its server restarted) is reported in the
    alerts with "Run again".
    """
    i = ids(page)
    dup = [Output(o.component_id, o.component_property, allow_duplicate=True)
           for o in outputs]
    after = [Output(i["after"], "style", allow_duplicate=True),
             Output(i["note"], "children", allow_duplicate=True)]

    def stopped(exc: Exception) -> tuple:
        """A job that ended without a result (or whose own code raised): say what stopped it."""
        from .. import background
        from ..jobhost import stopped_reason
        from . import shell

        if isinstance(exc, background.store_errors()):
            # the job store is unreachable as the job starts or is polled: nothing started
            # or lost; the server answers 503 + Retry-After and the page tries again
            raise exc
        what = stopped_reason(str(exc))
        if what is None:
            log.error("%s background job raised: %s", page, exc)
            text = f"The {page} job failed (details in the server log)."
        else:
            labels = ", ".join(what.get("labels") or []) or "the analysis"
            text = stopped_message(str(what.get("reason") or "it ended without a result"),
                                   labels)
        keep = [no_update] * (len(dup) - 1)
        return (*keep, [shell.alert(text)], SHOWN, "Stopped.")

    def job(set_progress: Callable[[Any], None], request: Any, *values: Any) -> tuple:
        """Compute the missing weight analyses (progress, Cancel), then draw the page."""
        if not request or not isinstance(request, dict):
            raise PreventUpdate
        return run(set_progress, request, *values)

    job.deadline_s = deadline_s  # read by the job manager (before Dash registers it)
    job = callback(*dup, *after, Input(i["request"], "data"), *states,
                   background=True, prevent_initial_call=True, interval=POLL_MS, on_error=stopped,
                   progress=[Output(i["bar"], "value"), Output(i["bar"], "label"),
                             Output(i["text"], "children")],
                   progress_default=[0, "", ""],
                   running=[(Output(i["strip"], "style"), SHOWN, HIDDEN),
                            (Output(i["cancel"], "disabled"), False, True)],
                   cancel=[Input(i["cancel"], "n_clicks")])(job)

    @callback(*after, Output(i["strip"], "style", allow_duplicate=True),
              Input(i["cancel"], "n_clicks"), State(i["request"], "data"),
              prevent_initial_call=True)
    def cancelled(n: Any, request: Any) -> tuple:
        """After Cancel: say so, offer Run again, and hide the bar at once."""
        if not n or not request:
            raise PreventUpdate
        labels = ", ".join(request.get("labels") or []) or "the analysis"
        return SHOWN, f"Cancelled {labels}.", HIDDEN

    return {"job": job, "cancelled": cancelled}


def progress_value(label: str, done: float, index: int, count: int) -> list[Any]:
    """The progress outputs (bar value, bar label, text) for analysis ``index`` of ``count``."""
    overall = (index + max(0.0, min(1.0, done))) / max(1, count)
    pct = round(100 * overall)
    return [pct, f"{pct}%", f"Computing {label} (first time for this model)…"]


__all__ = ["HIDDEN", "SHOWN", "ids", "strip", "main_outputs", "rerun_input", "register",
           "progress_value", "no_update"]
