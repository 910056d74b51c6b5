"""The JSON API under ``/api/``: the seed's endpoints, answered by the same analyses as the pages.

Every endpoint validates its input strictly (:mod:`.api_fields`): bad input is a 400
``{"error": "..."}`` (an oversized body is a 413, handled by the server). Results are encoded
by :mod:`.api_json`. Per-prompt endpoints run the prompt through the registry's cached
forward pass; prompts longer than the context are truncated to the first ``n_ctx`` tokens (or
``--max-tokens``) and the response's ``"truncated"`` says so.
"""

from __future__ import annotations

import logging
from functools import wraps
from typing import Any, Callable

import flask

from .. import background
from .. import weight_analyses as W
from ..analysis import declare
from ..analysis.errors import AnalysisError
from ..analysis.forward import ForwardPass
from ..analysis.predictions import MAX_GRID_K
from .api_fields import (
    ApiError,
    bool_field,
    choice_field,
    int_field,
    json_body,
    query_params,
    text_field,
    token_field,
)
from ..api_json import jsonable
from ..background import BusyError
from ..model.checkpoint import LoadedModel
from ..registry import Registry
from .guards import (ALWAYS_HEAVY, CHEAP_ENDPOINTS, HEAVY_MIN_BODY, HeavyBusy,
                     HeavyLanes)

log = logging.getLogger(__name__)

__all__ = ["ApiError", "bool_field", "choice_field", "create_api", "int_field", "json_body",
           "jsonable", "query_params", "text_field", "token_field"]


# ------------------------------------------------------------------------------ the API
def _prompt_part(fp: ForwardPass, limit: int) -> dict[str, Any]:
    truncated = None
    if fp.truncated:
        truncated = {"n_prompt_tokens": fp.n_prompt_tokens, "n_tokens_kept": fp.n_tokens,
                     "tokens_dropped": fp.truncated, "limit": limit,
                     "message": f"the prompt has {fp.n_prompt_tokens} tokens; only the first "
                                f"{fp.n_tokens} were analysed"}
    return {"model": fp.model_name, "n_tokens": fp.n_tokens,
            "token_ids": fp.token_ids.tolist(), "tokens": list(fp.tokens),
            "display": list(fp.display), "truncated": truncated}


STORE_ERRORS = background.store_errors()


def store_unreachable(exc: BaseException) -> Any:
    """503 + Retry-After: the deployment's store (Redis) does not answer. Nothing is lost; the
    same request succeeds once it is back."""
    log.warning("%s %s: the store is unreachable (%s: %s)", flask.request.method,
                flask.request.path[:200], type(exc).__name__, str(exc)[:200])
    message = str(exc) if isinstance(exc, background.StoreUnavailable) else \
        str(background.StoreUnavailable(f"Redis: {type(exc).__name__}"))
    resp = flask.jsonify(error=message)
    resp.status_code = 503
    resp.headers["Retry-After"] = str(background.RETRY_AFTER_S)
    return resp


#: Largest estimated cost of one API request, in GFLOP (``ATTENTION_LENS_API_MAX_GFLOP``):
#: a request over it is refused with a 400 naming its size. GPT-2 small's head_out_by_pos
#: patching on 40 tokens is about 57,000 GFLOP (110 s on 8 CPU cores).
API_MAX_GFLOP = background._env_seconds("ATTENTION_LENS_API_MAX_GFLOP", 20_000.0)


def forward_gflop(lm: LoadedModel, n_tokens: int) -> float:
    """Floating-point work (GFLOP) of one forward pass of ``n_tokens`` tokens through ``lm``
    (:func:`.analysis.declare.forward_gflop`)."""
    return declare.forward_gflop(lm.cfg, n_tokens)


def check_cost(what: str, runs: int, lm: LoadedModel, n_tokens: int, hint: str) -> None:
    """Refuse (400) a request whose estimated work exceeds :data:`API_MAX_GFLOP`."""
    gflop = runs * forward_gflop(lm, n_tokens)
    if gflop > API_MAX_GFLOP:
        raise ApiError(f"{what} on {lm.name} runs {runs:,} forward passes of {n_tokens} tokens "
                       f"(about {gflop:,.0f} GFLOP); this server runs at most "
                       f"{API_MAX_GFLOP:,.0f} GFLOP per API request: {hint}", 400)


def run_weight_analyses(lm: LoadedModel, *reqs: Any) -> list[Any]:
    """The results of weight analyses (``reqs``) for an API request: from the shared store,
    else computed as a job in a job slot (:class:`BusyError` when all are taken). In a lab the
    job runs on the Celery workers, under their deadline, and this thread only waits; on one
    machine it runs here."""
    st = W.store()
    try:
        return st.get(lm, *reqs)
    except W.Missing as missing:
        todo = missing.requests
    bg = background.current()
    if bg.celery_app is None:
        return st.get_or_compute(lm, *reqs)
    label = ", ".join(r.label for r in todo)
    deadline = background.CELERY_DEADLINE_S + 60
    if not bg.kv.keys("worker:*"):  # nothing would ever take the task
        raise ApiError(f"{label}: no job worker is running on this deployment; start "
                       "'attention-lens worker' (see the README's lab commands)", 503)
    with bg.slots.job(label):
        pending = [bg.celery_app.send_task(background.WEIGHT_TASK, args=(lm.name, r.as_json()))
                   for r in todo]
        try:
            for task in pending:
                task.get(timeout=deadline, propagate=True, disable_sync_subtasks=False)
        except STORE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - a worker's failure, told to the client
            name = type(exc).__name__
            if name == "TimeoutError":
                raise ApiError(f"{label}: not finished within {int(deadline)} s on the job "
                               "workers; try again later (the result is kept when it "
                               "finishes)", 504) from None
            if isinstance(exc, AnalysisError) or name == "AnalysisError":
                raise ApiError(str(exc)) from None
            log.warning("%s failed on a worker: %s: %s", label, name, exc)
            raise ApiError(f"{label} failed on the job workers ({name})", 502) from None
    return st.get(lm, *reqs)


def register_worker_tasks(celery_app: Any, registry: Registry) -> None:
    """The Celery task computing the API's heavy work on a worker (a weight analysis, into
    the shared store)."""
    if background.WEIGHT_TASK in celery_app.tasks:
        return

    @celery_app.task(name=background.WEIGHT_TASK)
    def weight_analysis(model: str, request: Any) -> bool:
        W.store().compute(registry.get(model), W.Request.from_json(request))
        return True


def create_api(registry: Registry, config: Any = None) -> flask.Blueprint:
    """The ``/api`` blueprint answering from ``registry``.

    While the deployment's store is unreachable, every request that needs it (the API's and
    the pages' callbacks alike) is answered 503 with ``Retry-After``, never 500.
    """
    bp = flask.Blueprint("attention_lens_api", __name__)
    if background.current().celery_app is not None:  # the workers run the heavy work
        register_worker_tasks(background.current().celery_app, registry)
    for error in STORE_ERRORS:  # app-wide: the pages' callbacks and job polls too
        bp.app_errorhandler(error)(store_unreachable)

    heavy_lanes = bp.heavy_lanes = HeavyLanes.from_env()  # type: ignore[attr-defined]

    def is_heavy(rule: str) -> bool:
        """Whether the request computes more than a few forward passes or a cached table."""
        name = flask.request.path.rstrip("/").rsplit("/", 1)[-1]
        if rule == "/<path:rest>" or rule == "/" or name in CHEAP_ENDPOINTS:
            return False
        if rule == "/<name>" and declare.find(name) is None:
            return False
        return name in ALWAYS_HEAVY or (flask.request.content_length or 0) >= HEAVY_MIN_BODY

    def endpoint(rule: str, methods: tuple[str, ...]) -> Callable:
        def wrap(fn: Callable[[], dict[str, Any]]) -> Callable:
            @wraps(fn)
            def view(**kwargs: Any) -> Any:
                try:
                    if is_heavy(rule):
                        with heavy_lanes:
                            result = fn()
                    else:
                        result = fn()
                except ApiError as exc:
                    return flask.jsonify(error=str(exc)), exc.status
                except (BusyError, HeavyBusy) as exc:
                    return flask.jsonify(error=str(exc)), 503, {"Retry-After": "5"}
                except STORE_ERRORS as exc:
                    return store_unreachable(exc)
                except AnalysisError as exc:
                    return flask.jsonify(error=str(exc)), 400
                return flask.jsonify(result)
            bp.add_url_rule(rule, view_func=view, methods=list(methods))
            return view
        return wrap

    def model_of(body: dict[str, Any]) -> LoadedModel:
        name = body.get("model")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ApiError(f"'model' must be a model name; available: "
                           f"{', '.join(registry.names())}")
        return registry.get(name)  # AnalysisError naming the available models

    def limit_of(lm: LoadedModel) -> int:
        mt = registry.max_tokens
        return lm.cfg.n_ctx if mt is None else min(lm.cfg.n_ctx, mt)

    def prompt(body: dict[str, Any]) -> tuple[LoadedModel, ForwardPass, dict[str, Any]]:
        text = text_field(body)
        lm = model_of(body)
        fp = registry.forward(text, lm.name)
        return lm, fp, _prompt_part(fp, limit_of(lm))

    base = {"text", "model"}

    # --------------------------------------------------------------------- models
    @endpoint("/models", ("GET",))
    def models() -> dict[str, Any]:
        query_params(set(), set())
        out, unavailable = [], []
        for e in registry.entries():
            item = {"name": e.name, "size_bytes": e.size_bytes, "kind": e.kind,
                    "default": e.name == registry.default}
            if e.detail:
                item["detail"] = e.detail
            if e.available:
                out.append(item)
            else:
                unavailable.append({**item, "reason": e.error})
        return {"models": out, "unavailable": unavailable, "default": registry.default}

    # per-position predictions are declared (analysis.predictions.TOKEN_PREDICTIONS):
    # POST /api/token-predictions

    # attention patterns and activations are declared (analysis.attention.ATTENTION,
    # ACTIVATIONS): POST /api/attention, /api/activations

    # the logit lens is declared (analysis.logit_lens.LOGIT_LENS): POST /api/logit-lens

    # every head's circuit SVD is declared (analysis.circuits.WEIGHTS): GET /api/weights

    # ---------------------------------------------------------------- embeddings
    @endpoint("/embeddings", ("GET",))
    def embeddings() -> dict[str, Any]:
        from ..analysis.embeddings import MATRICES, TOKEN_FILTERS, project_tokens

        q = query_params({"model", "matrix", "filter", "max_tokens", "n_components",
                          "n_clusters", "text"}, {"max_tokens", "n_components", "n_clusters"})
        lm = model_of(q)
        matrix = choice_field(q, "matrix", "W_E", tuple(MATRICES))
        token_filter = choice_field(q, "filter", "frequent", tuple(TOKEN_FILTERS))
        n_max = int_field(q, "max_tokens", min(2000, lm.cfg.d_vocab), 1, lm.cfg.d_vocab,
                          " (the vocabulary size)")
        n_comp = int_field(q, "n_components", 2, 1, 10)
        n_clusters = int_field(q, "n_clusters", 8, 1, 50)
        (res,) = run_weight_analyses(lm, W.embedding_pca(
            matrix, token_filter, n_max, n_clusters, centre=True, n_components=n_comp))
        out: dict[str, Any] = {"model": lm.name, "result": jsonable(res)}
        if "text" in q:
            fp = registry.forward(text_field(q), lm.name)
            out["prompt"] = {**_prompt_part(fp, limit_of(lm)),
                             "projection": jsonable(project_tokens(lm, res, fp.token_ids))}
        return out

    # analogies are declared (analysis.analogy.ANALOGY): POST /api/analogy

    # the eigenvalues of the prompt's patterns and of the circuits are declared
    # (analysis.eigen.EIGENVALUES): POST /api/eigenvalues

    # ablation is declared (analysis.ablation.ABLATION): POST /api/ablation

    # ------------------------------------------------------- further analyses
    # An analysis declared in analysis/ (analysis.declare) gets its endpoint POST /api/<name>
    # below without a route here; other endpoints go here, each as `@endpoint(rule,
    # methods)` over a function that reads its fields with the helpers of .api_fields.

    # patching, path patching and circuit discovery are declared (scope pair:
    # analysis.patching.PATCHING, PATH_PATCHING, analysis.circuit.declared.CIRCUIT)

    # QK attribution is declared (analysis.qk_attribution.QK_ATTRIBUTION):
    # POST /api/qk-attribution
    # the attribution graph is declared (analysis.graph.GRAPH): POST /api/graph

    # ------------------------------------------------- dataset heads and comparison
    # head metrics over a dataset are declared (scope dataset:
    # analysis.head_metrics.HEAD_METRICS): POST /api/head-metrics

    def windows_args(lm: LoadedModel, body: dict[str, Any], default_n: int) -> tuple:
        from ..analysis.datasets import DEFAULT_LENGTH, MAX_WINDOWS, check_window_args

        n = int_field(body, "windows", default_n, 1, MAX_WINDOWS)
        length = int_field(body, "length", min(lm.cfg.n_ctx, DEFAULT_LENGTH), 4, lm.cfg.n_ctx,
                           f" (the context of {lm.name})")
        stride = int_field(body, "stride", length, 1, 100_000)
        check_window_args(lm, length, stride, n)
        return length, stride, n

    @endpoint("/compare", ("POST",))
    def compare_api() -> dict[str, Any]:
        from ..analysis.compare import compare

        body = json_body({"text", "text_b", "model", "model_b", "layer", "head", "position",
                          "target", "top_k", "icl", "windows"})
        text_a = text_field(body)
        text_b = text_field(body, "text_b") if "text_b" in body else text_a
        lm_a = model_of(body)
        name_b = body.get("model_b", lm_a.name)
        if not isinstance(name_b, str) or not name_b.strip():
            raise ApiError("'model_b' must be a model name")
        lm_b = registry.get(name_b)
        fp_a, fp_b = registry.forward(text_a, lm_a.name), registry.forward(text_b, lm_b.name)
        n_layers = max(lm_a.cfg.n_layers, lm_b.cfg.n_layers)
        n_heads = max(lm_a.cfg.n_heads, lm_b.cfg.n_heads)
        layer = int_field(body, "layer", 0, 0, n_layers - 1)
        head = int_field(body, "head", 0, 0, n_heads - 1)
        position = int_field(body, "position", -1, -lm_a.cfg.n_ctx, lm_a.cfg.n_ctx - 1)
        k = int_field(body, "top_k", 10, 1, MAX_GRID_K)
        c = compare(lm_a, fp_a, lm_b, fp_b, layer=layer, head=head, position=position, k=k,
                    target=token_field(body, "target"))
        out = {"a": _prompt_part(fp_a, limit_of(lm_a)), "b": _prompt_part(fp_b, limit_of(lm_b)),
               "result": jsonable(c)}
        if bool_field(body, "icl", False):
            from ..analysis.compare import icl_from_curves
            from ..analysis.datasets import SHIPPED

            length, stride, n = windows_args(lm_a, {k: v for k, v in body.items()
                                                    if k == "windows"}, 64)
            ds = W.load_dataset(SHIPPED)
            req = W.loss_by_position(ds.name, ds.sha256, length, stride, n)
            models = [lm_a] if lm_b is lm_a else [lm_a, lm_b]
            probe = run_weight_analyses(lm_a, W.probe_head_scores())[0]
            curves = [run_weight_analyses(m, req, W.probe_loss()) for m in models]
            view = icl_from_curves([c[0] for c in curves], [c[1] for c in curves],
                                   probe.seq_len, probe.bos is not None)
            out["icl"] = jsonable(view)
            for item, score in zip(out["icl"]["scores"], view.scores):
                item["score"] = jsonable(score.score)
        return out

    # ------------------------------------------------------------------ the rest
    # ------------------------------------------------------- declared analyses
    def run_declared(spec: declare.Analysis) -> dict[str, Any]:
        """``POST /api/<name>`` of a declared analysis: its parameters read strictly from
        the body (400 naming the field), its result from the cache its scope names, or from
        a job when its work is over the inline threshold."""
        pair = None
        if spec.scope == "prompt":
            body = json_body(base | spec.fields)
            lm, fp, part = prompt(body)
        elif spec.scope == "pair":
            from ..analysis.patching import PAIR_FIELDS, PairInput

            body = json_body(({"model"} | PAIR_FIELDS | spec.fields) - set(spec.without))
            lm, fp = model_of(body), None
            part = {"model": lm.name}
            pair = PairInput.read(body, lm, limit_of(lm))
        elif spec.scope == "dataset":
            return run_dataset(spec)
        elif declare.method_of(spec) == "GET":
            body = query_params({"model"} | spec.fields, declare.query_ints(spec))
            lm, fp = model_of(body), None
            part = {"model": lm.name}
        else:
            body = json_body({"model"} | spec.fields)
            lm, fp = model_of(body), None
            part = {"model": lm.name}
        shape = declare.Shape(lm.cfg, None if fp is None else fp.n_tokens)
        values = spec.read(body, shape)
        if pair is not None:
            return {**part, **jsonable(spec.to_json(run_pair(spec, lm, pair, values)))}
        req = W.declared(spec, lm, fp, values)
        if req is not None:
            (res,) = run_weight_analyses(lm, req)
        elif fp is None:  # a cheap weight analysis: kept in the registry's weight cache
            res = registry.weights(lm.name, spec.key(values, shape),
                                   lambda m: spec.compute(m, None, values, {}))
        else:
            needs = dict(zip(spec.needs, run_weight_analyses(lm, *W.needs(spec, values)))) \
                if spec.needs else {}
            res = registry.per_prompt(fp, spec.key(values, shape),
                                      lambda: spec.compute(lm, fp, values, needs))
        return {**part, **jsonable(spec.to_json(res), digits=spec.digits)}

    def run_pair(spec: declare.Analysis, lm: LoadedModel, pair: Any,
                 values: dict[str, Any]) -> Any:
        """A declared analysis of scope pair: refused (400) over :data:`API_MAX_GFLOP`; from
        a job over the inline threshold, else computed in a job slot and kept in the
        registry's weight-analysis cache."""
        counts = {**values, "n_pairs": len(pair.pairs)}
        gflop = spec.gflop(lm.cfg, pair.n_tokens, counts)
        if gflop > API_MAX_GFLOP:
            passes = gflop / forward_gflop(lm, pair.n_tokens)
            raise ApiError(f"{spec.label.format(**values)} over {len(pair.pairs)} pair(s) on {lm.name} "
                           f"is about {gflop:,.0f} GFLOP ({passes:,.0f} forward passes of "
                           f"{pair.n_tokens} tokens); this server runs at most "
                           f"{API_MAX_GFLOP:,.0f} GFLOP per API request: use fewer pairs, "
                           f"fewer tokens or a coarser setting", 400)
        req = W.declared(spec, lm, pair, values)
        if req is not None:
            return run_weight_analyses(lm, req)[0]
        with background.current().slots.job(spec.label.format(**values)):
            return registry.weights(lm.name, spec.key(values, given=pair),
                                    lambda m: spec.compute(m, pair, values, {}))

    def run_dataset(spec: declare.Analysis) -> dict[str, Any]:
        """``POST /api/<name>`` of a declared analysis of scope dataset: the dataset named
        (or sent as ``text``, then kept in the shared store under its content hash) cut into
        windows; the result from the store's job over the inline threshold, else computed in
        a job slot and kept in the registry's weight-analysis cache under the declaration's
        key (the dataset's identity, never its text)."""
        from ..analysis.datasets import DATASET_FIELDS, DatasetInput, remember_upload

        body = json_body({"model"} | DATASET_FIELDS | spec.fields)
        lm = model_of(body)
        shape = declare.Shape(lm.cfg, None)
        views = spec.read_views(body, shape)
        values = spec.read(body, shape)

        def keep(ds: Any) -> None:
            remember_upload(ds)
            W.keep_upload(ds)

        data = DatasetInput.read(body, lm, W.load_dataset, keep)
        req = W.declared(spec, lm, data, values)
        if req is not None:
            (res,) = run_weight_analyses(lm, req)
        else:
            needs = dict(zip(spec.needs, run_weight_analyses(lm, *W.needs(spec)))) \
                if spec.needs else {}
            with background.current().slots.job(spec.label.format(**values)):
                res = registry.weights(lm.name, spec.key(values, given=data),
                                       lambda m: spec.compute(m, data.cut(m), values, needs))
        if spec.show is not None:
            return {"model": lm.name, **spec.show(lm, res, views, jsonable)}
        return {"model": lm.name, **jsonable(spec.to_json(res), digits=spec.digits)}

    @endpoint("/", ("GET",))
    def index() -> dict[str, Any]:
        rules = {(r.rule, m) for r in flask.current_app.url_map.iter_rules()
                 if r.endpoint.startswith(bp.name + ".") and "<" not in r.rule
                 for m in (r.methods or ()) if m in {"GET", "POST"}}
        prefix = flask.url_for(bp.name + ".index")
        rules |= {(prefix + name, declare.method_of(spec))
                  for name, spec in declare.declared().items()}
        return {"endpoints": [f"{m} {r}" for r, m in sorted(rules)]}

    @endpoint("/<name>", ("GET", "POST"))
    def declared_route() -> dict[str, Any]:
        spec = declare.find((flask.request.view_args or {}).get("name", ""))
        if spec is None:
            return no_endpoint()
        method = declare.method_of(spec)
        if flask.request.method != method:
            raise ApiError(f"method {flask.request.method} is not allowed on "
                           f"{flask.request.path}; use {method}", 405)
        return run_declared(spec)

    def no_endpoint() -> dict[str, Any]:
        """A 405 naming the methods of a path that exists, else a 404."""
        path = flask.request.path
        for rule in flask.current_app.url_map.iter_rules():
            if rule.endpoint.startswith(bp.name + ".") and rule.rule == path and \
                    rule.endpoint not in (bp.name + ".unknown", bp.name + ".declared_route"):
                allowed = sorted((rule.methods or set()) & {"GET", "POST"})
                raise ApiError(f"method {flask.request.method} is not allowed on {path}; "
                               f"use {' or '.join(allowed)}", 405)
        raise ApiError(f"no API endpoint {flask.request.path!r}; GET "
                       f"{flask.url_for(bp.name + '.index')} lists them", 404)

    @endpoint("/<path:rest>", ("GET", "POST"))
    def unknown() -> dict[str, Any]:
        return no_endpoint()

    return bp
