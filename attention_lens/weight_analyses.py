"""Weight analyses of a model, computed once per deployment and shared by pages and the API.

A weight analysis (circuit SVD, circuit eigenvalues, composition scores, the repeated-token
probe, the embedding PCA) depends only on a model's weights and a few parameters. Each is
named here once, with its cache key: the model's weight hash, the analysis and its
parameters. Results live in the background's shared store (a disk cache on one machine,
Redis in a lab), so every web worker and every job process reads the one computed copy, and
a restart does not recompute it. A computation holds a lock in that store, so two processes
asking for the same analysis at once compute it once; how often each was computed, and by
which process, is counted there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .analysis.errors import AnalysisError
from .model.checkpoint import LoadedModel
from .cache import ByteLRU, store_lock, timed
from .registry import DEFAULT_WEIGHTS_BYTES

Progress = Callable[[float], None]

#: Singular directions and tokens per direction computed once for the circuit SVD (pages
#: and the API cut what they show from it).
SVD_DIRECTIONS, SVD_TOP_K = 8, 30
#: Principal components computed for the embedding map.
PCA_COMPONENTS = 10
#: Seconds the store keeps a count of computations and reads of an analysis after its last
#: change (the counts are for monitoring and tests; they must not grow without limit, and
#: the process ids they are kept for come and go).
COUNTER_TTL_S = 24 * 3600


# ------------------------------------------------------------------------- the analyses
@dataclass(frozen=True)
class Request:
    """One weight analysis with its parameters (JSON-ready, hashable)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """What the progress strip calls it (a declared analysis: its label, filled with its
        parameters where the label names them)."""
        params = dict(self.params)
        if self.name == "declared":
            import json

            from .analysis import declare

            spec = declare.find(params["analysis"])
            if spec is not None:  # its label may name parameters: "{method}-ablation"
                return spec.label.format(**json.loads(params["params"]))
        return ANALYSES[self.name].label.format(**params)

    def as_json(self) -> list[Any]:
        """``[name, {param: value}]`` (what a job request carries through the browser)."""
        return [self.name, dict(self.params)]

    @classmethod
    def from_json(cls, value: Any) -> "Request":
        """The request of :meth:`as_json`'s output; AnalysisError for anything else."""
        try:
            name, params = value
            if name not in ANALYSES or not isinstance(params, dict):
                raise ValueError
            return request(name, **params)
        except (TypeError, ValueError):
            raise AnalysisError(f"not a weight analysis: {str(value)[:80]!r}") from None


@dataclass(frozen=True)
class Analysis:
    """How to compute a weight analysis: ``compute(lm, progress, **params)``."""

    label: str
    compute: Callable[..., Any]
    params: tuple[str, ...] = ()


def _svd(lm: LoadedModel, progress: Progress, circuit: str) -> Any:
    from .analysis.circuits import circuit_svd

    return circuit_svd(lm, circuit, min(SVD_DIRECTIONS, lm.cfg.d_head),
                       min(SVD_TOP_K, lm.cfg.d_vocab), progress=progress)


def _eigen(lm: LoadedModel, progress: Progress) -> Any:
    from .analysis.eigen import circuit_eigenvalues

    return circuit_eigenvalues(lm, progress=progress)


def _composition(lm: LoadedModel, progress: Progress) -> Any:
    from .analysis.composition import composition_scores

    return composition_scores(lm, progress=progress)


def _probe(lm: LoadedModel, progress: Progress) -> Any:
    from .analysis.heads import probe_head_scores

    return probe_head_scores(lm)


def _pca(lm: LoadedModel, progress: Progress, matrix: str, token_filter: str,
         max_tokens: int, n_components: int, n_clusters: int, centre: bool) -> Any:
    from .analysis.embeddings import embedding_pca

    return embedding_pca(lm, matrix=matrix, token_filter=token_filter, max_tokens=max_tokens,
                         n_components=min(n_components, lm.cfg.d_model, max_tokens),
                         n_clusters=n_clusters, centre=centre)


def _prompt_pass(lm: LoadedModel, tokens: str) -> Any:
    """The forward pass of a prompt given as comma-separated token ids (cached if it is)."""
    from .analysis.forward import run_forward
    from .registry import current

    ids = [int(t) for t in tokens.split(",")]
    return current().cached_forward(lm.name, ids) or run_forward(lm, "", token_ids=ids)


def _declared(lm: LoadedModel, progress: Progress, analysis: str, tokens: str,
              params: str) -> Any:
    """A declared analysis (:mod:`.analysis.declare`) of a prompt given by its token ids
    (scope prompt), of a pair given by its JSON (scope pair) or of the weights (``tokens``
    empty), run as a job."""
    import json

    from .analysis import declare

    spec = declare.find(analysis)
    if spec is None:
        raise AnalysisError(f"no analysis is declared as {analysis!r}")
    if spec.scope == "pair":
        from .analysis.patching import PairInput

        fp = PairInput.from_json(tokens, load=stored_pair_set)
    elif spec.scope == "dataset":  # the dataset by its name, checked against its hash
        from .analysis.datasets import DatasetInput

        data = DatasetInput.from_json(tokens)
        fp = data.cut(lm, load_dataset(data.name))
    else:
        fp = _prompt_pass(lm, tokens) if tokens else None
    values = json.loads(params)
    reads = dict(zip(spec.needs, store().get_or_compute(lm, *needs(spec, values)))) \
        if spec.needs else {}
    return spec.compute(lm, fp, values, reads, progress=progress)


def pair_set_key(digest: str) -> str:
    """Where an uploaded set of pairs is kept in the shared store (by its content hash)."""
    return f"pairs:{digest}"


def keep_pair_set(raw: bytes) -> str:
    """Keep an uploaded set of pairs (UTF-8 text) in the shared store; returns the name the
    page's URL carries (its content hash). Raises one of :func:`store_errors` when the store
    cannot keep it."""
    import hashlib

    from . import background

    digest = hashlib.sha256(raw).hexdigest()[:32]
    background.current().results.set(pair_set_key(digest), raw.decode("utf-8"))
    return digest


def stored_pair_set(digest: str) -> str:
    """The text of the uploaded set of pairs kept under ``digest`` (its content hash);
    AnalysisError when the store no longer holds it."""
    from . import background

    text = background.current().results.get(pair_set_key(digest))
    if not isinstance(text, str):
        raise AnalysisError("the uploaded set of pairs is no longer on this server: upload "
                            "it again")
    return text


def _circuit_curve(lm: LoadedModel, progress: Progress, pair: str, params: str,
                   n_sizes: int, n_random: int) -> Any:
    """The declared circuit discovery (:data:`.analysis.circuit.declared.CIRCUIT`) of this
    pair (its JSON) and these parameters, without its curve (from the store, or computed),
    then with its faithfulness curve of ``n_sizes`` x ``n_random``."""
    from .analysis.circuit.declared import CIRCUIT
    from .analysis.circuit.discovery import add_curve
    from .analysis.patching import PairInput

    first = {**json.loads(params), "curve": False}
    disc = store().compute(lm, request("declared", analysis=CIRCUIT.name, tokens=pair,
                                       params=CIRCUIT.stored_params(first)))
    return add_curve(lm, list(PairInput.from_json(pair, load=stored_pair_set).pairs), disc,
                     n_sizes=n_sizes,
                     n_random=n_random,
                     progress=lambda done, total: progress(done / max(total, 1)))


ANALYSES: dict[str, Analysis] = {
    # on big models the page draws the declared circuit first, then computes its curve
    "circuit_curve": Analysis("faithfulness curve ({n_sizes} sizes x {n_random} random)",
                              _circuit_curve, ("pair", "params", "n_sizes", "n_random")),
    # an analysis declared in analysis/ whose estimated work is over the inline threshold
    "declared": Analysis("{analysis}", _declared, ("analysis", "tokens", "params")),
    "circuit_svd": Analysis("{circuit} circuit SVD", _svd, ("circuit",)),
    "circuit_eigenvalues": Analysis("circuit eigenvalues", _eigen),
    "composition_scores": Analysis("composition scores", _composition),
    "probe_head_scores": Analysis("repeated-token probe", _probe),
    "embedding_pca": Analysis("PCA and k-means of {matrix}", _pca,
                              ("matrix", "token_filter", "max_tokens", "n_components",
                               "n_clusters", "centre")),
}


def request(name: str, **params: Any) -> Request:
    """The request for analysis ``name`` with exactly its parameters."""
    spec = ANALYSES.get(name)
    if spec is None:
        raise AnalysisError(f"unknown weight analysis {name!r}")
    if set(params) != set(spec.params):
        raise AnalysisError(f"{name} takes {', '.join(spec.params) or 'no parameters'}")
    for key, value in params.items():
        if not isinstance(value, (str, int, float, bool)) or value is None:
            raise AnalysisError(f"{name}: parameter {key} must be a plain value")
    return Request(name, tuple(sorted(params.items())))


def declared(spec: Any, lm: LoadedModel, fp: Any, values: dict[str, Any]) -> Optional[Request]:
    """The store's request for a declared analysis (:mod:`.analysis.declare`) that runs as a
    job: scope weights unless it estimates its work (its ``cost``, in passes of one token)
    under the inline threshold, scope prompt when its estimated work on this prompt is over
    the inline threshold; None when it runs inline (its result then kept with the forward
    pass). For scope pair, ``fp`` is the pair (its JSON is the job's input); for scope
    dataset, the dataset's identity and windows (their JSON: the name and hash, never the
    text)."""
    from .analysis.declare import Shape, has_cost, runs_inline

    if spec.scope in ("pair", "dataset"):
        counts = {"n_pairs": len(fp.pairs)} if spec.scope == "pair" else \
            {"n_windows": fp.windows}
        if runs_inline(spec, lm.cfg, fp.n_tokens, {**values, **counts}):
            return None
        return request("declared", analysis=spec.name, tokens=fp.to_json(),
                       params=spec.stored_params(values))
    if spec.scope == "prompt" and runs_inline(spec, lm.cfg, fp.n_tokens, values):
        return None
    if spec.scope == "weights" and has_cost(spec) and runs_inline(spec, lm.cfg, 1, values):
        return None  # a cheap weight analysis (its cost per one-token pass): inline
    tokens = "" if spec.scope == "weights" else ",".join(str(int(t)) for t in fp.token_ids)
    shape = Shape(lm.cfg, None if fp is None else fp.n_tokens)
    return request("declared", analysis=spec.name, tokens=tokens,
                   params=spec.stored_params(values, shape))


def needs(spec: Any, values: Optional[dict[str, Any]] = None) -> list[Request]:
    """The weight analyses a declared analysis reads (its ``needs``), in order; a need's
    parameters are the declared analysis's ``values`` of the same names (the circuit of a
    circuit SVD)."""
    values = values or {}
    return [request(kind, **{p: values[p] for p in ANALYSES[kind].params if p in values})
            for kind in spec.needs.values()]


def circuit_svd(circuit: str = "OV") -> Request:
    """Every head's OV or QK circuit SVD (``SVD_DIRECTIONS`` x ``SVD_TOP_K`` tokens)."""
    return request("circuit_svd", circuit=circuit)


def circuit_eigenvalues() -> Request:
    """Every head's OV / full-OV / QK / full-QK eigenvalues and copying scores."""
    return request("circuit_eigenvalues")


def composition_scores() -> Request:
    """Q-, K- and V-composition of every pair of heads."""
    return request("composition_scores")


def probe_head_scores() -> Request:
    """Induction and previous-token scores on the repeated-random-token probe."""
    return request("probe_head_scores")


def embedding_pca(matrix: str = "W_E", token_filter: str = "frequent", max_tokens: int = 2000,
                  n_clusters: int = 8, centre: bool = True,
                  n_components: int = PCA_COMPONENTS) -> Request:
    """PCA (at most ``n_components`` components) and k-means clusters of embedding rows."""
    return request("embedding_pca", matrix=matrix, token_filter=token_filter,
                   max_tokens=int(max_tokens), n_components=int(n_components),
                   n_clusters=int(n_clusters), centre=bool(centre))


# ------------------------------------------------------------------------ dataset runs
# Runs over a dataset's windows (head metrics, loss by position) depend on the weights and
# the dataset's content: the dataset's sha256 is a parameter, so each is cached per weights
# and dataset. Uploaded documents are kept in the shared store, where a job process finds
# them by that hash.
#: Seconds an uploaded dataset stays in the shared store.
UPLOAD_TTL_S = 7 * 24 * 3600
#: Uploaded datasets the shared store keeps (each at most 512 KiB; the oldest goes first).
MAX_STORED_UPLOADS = 64
_UPLOAD_INDEX = "datasets:uploaded"


def store_errors() -> tuple[type[BaseException], ...]:
    """What the shared store raises while it is unreachable (Redis stopped, the cache folder
    full or read-only): an upload that cannot be kept is reported, not a refused callback."""
    import sqlite3

    errors: tuple[type[BaseException], ...] = (OSError, sqlite3.Error)
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis comes with the lab extra
        return errors
    return (*errors, RedisError)


def upload_key(sha256: str) -> str:
    """The shared store's key of the uploaded documents whose sha256 is ``sha256``."""
    return f"dataset:{sha256}"


def keep_upload(dataset: Any) -> str:
    """Put an uploaded dataset's documents in the shared store, where every web worker and
    job process finds them by the name returned (``upload:<sha256>``); the store keeps the
    last ``MAX_STORED_UPLOADS`` for ``UPLOAD_TTL_S`` seconds."""
    results = store().results
    results.set(upload_key(dataset.sha256), list(dataset.documents), expire=UPLOAD_TTL_S)
    index = [h for h in results.get(_UPLOAD_INDEX, None) or [] if h != dataset.sha256]
    index.append(dataset.sha256)
    for old in index[:-MAX_STORED_UPLOADS]:
        results.delete(upload_key(old))
    results.set(_UPLOAD_INDEX, index[-MAX_STORED_UPLOADS:], expire=UPLOAD_TTL_S)
    return dataset.name


def load_dataset(name: str) -> Any:
    """A dataset by name: shipped, in a datasets folder, or uploaded (from the shared store)."""
    from .analysis import datasets as D

    if isinstance(name, str) and name.startswith("upload:"):
        digest = name[len("upload:"):]
        if not D.is_upload_digest(digest):
            raise AnalysisError("that uploaded file's name is not one this server gives: "
                                "upload the file again")
        docs = store().results.get(upload_key(digest), None)
        if docs is None:
            return D.load_dataset(name)  # this process may still hold it; else it says so
        ds = D.Dataset(name=name, documents=tuple(docs), sha256=D.documents_sha256(docs),
                       title="uploaded file", provenance={"source": "uploaded file"})
        if ds.sha256 != digest:
            raise AnalysisError("the stored upload does not match its name: upload it again")
        return ds
    return D.load_dataset(name)


def _windows(lm: LoadedModel, dataset: str, sha256: str, length: int, stride: int,
             windows: int) -> Any:
    from .analysis.datasets import dataset_windows

    ds = load_dataset(dataset)
    if ds.sha256 != sha256:
        raise AnalysisError(f"dataset {dataset!r} changed since it was chosen: choose it again")
    return dataset_windows(lm, ds, length=length, stride=stride, max_windows=windows)


def _loss_by_position(lm: LoadedModel, progress: Progress, dataset: str, sha256: str,
                      length: int, stride: int, windows: int) -> Any:
    from .analysis.compare import loss_by_position

    w = _windows(lm, dataset, sha256, length, stride, windows)
    return loss_by_position(lm, w.tokens, source=w.describe(), progress=progress)


def _probe_loss(lm: LoadedModel, progress: Progress) -> Any:
    from .analysis.compare import loss_by_position

    probe = store().compute(lm, probe_head_scores())
    return loss_by_position(lm, probe.tokens, f"probe [r ; r], T = {probe.seq_len}")


_DATASET_PARAMS = ("dataset", "sha256", "length", "stride", "windows")
ANALYSES["probe_loss"] = Analysis("loss by position on the probe", _probe_loss)
ANALYSES["loss_by_position"] = Analysis("loss by position over {windows} windows",
                                        _loss_by_position, _DATASET_PARAMS)


def probe_loss() -> Request:
    """Mean next-token loss at each position of the repeated-random-token probe."""
    return request("probe_loss")


def loss_by_position(dataset: str, sha256: str, length: int, stride: int,
                     windows: int) -> Request:
    """Mean next-token loss at each position over windows of ``dataset``."""
    return request("loss_by_position", dataset=dataset, sha256=sha256, length=int(length),
                   stride=int(stride), windows=int(windows))

# --------------------------------------------------------------------------- cache keys
def weight_hash(lm: LoadedModel) -> str:
    """A digest of every weight tensor of ``lm`` (names, shapes, dtypes and bytes)."""
    cached = getattr(lm, "_weight_hash", None)
    if cached is not None:
        return cached
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(lm.model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    digest = h.hexdigest()
    object.__setattr__(lm, "_weight_hash", digest)
    return digest


def cache_key(lm: LoadedModel, req: Request) -> str:
    """The store key of ``req`` on ``lm``'s weights (the code version included)."""
    params = json.dumps(dict(req.params), sort_keys=True, separators=(",", ":"))
    return f"wa:{__version__}:{weight_hash(lm)}:{req.name}:{params}"


class Missing(AnalysisError):
    """Weight analyses not computed yet (a page starts a background job for them)."""

    def __init__(self, model: str, requests: Sequence[Request]) -> None:
        self.model, self.requests = model, list(requests)
        super().__init__(f"{model}: not computed yet: "
                         + ", ".join(r.label for r in self.requests))


# ----------------------------------------------------------------------------- the store
_MISS = object()


class Store:
    """Weight analyses in a store shared by processes, in front of it a region of the
    in-process cache (:class:`attention_lens.cache.ByteLRU`) bounded by ``memo`` entries and
    ``memo_bytes`` bytes."""

    def __init__(self, results: Any, coord: Any, memo: int = 32,
                 memo_bytes: int = DEFAULT_WEIGHTS_BYTES) -> None:
        self.results, self.coord = results, coord
        self._memo = ByteLRU("analyses", memo_bytes, memo)

    @property
    def memo_bytes(self) -> int:
        """The in-process cache's byte budget (GPT-2 small's composition scores: ~1 MB)."""
        return self._memo.max_bytes

    @memo_bytes.setter
    def memo_bytes(self, value: int) -> None:
        self._memo.max_bytes = value

    @property
    def memo_size(self) -> int:
        """The in-process cache's entry budget."""
        return int(self._memo.max_items or 0)

    @memo_size.setter
    def memo_size(self, value: int) -> None:
        self._memo.max_items = value

    def _count(self, key: str) -> None:
        """Add one to the counter ``key``, which expires ``COUNTER_TTL_S`` after its last
        change."""
        self.coord.incr(key)
        self.coord.touch(key + ":n", expire=COUNTER_TTL_S)

    # ------------------------------------------------------------------ reading
    def cached(self, lm: LoadedModel, req: Request) -> Any:
        """The stored result of ``req`` or :data:`_MISS`."""
        key = cache_key(lm, req)
        value = self._memo.get(key, _MISS)
        if value is not _MISS:
            return value
        value = self.results.get(key, _MISS)
        if value is not _MISS:
            self._count(f"served:{key}:{os.getpid()}")
            self._memo.put(key, value)
        return value

    def get(self, lm: LoadedModel, *reqs: Request) -> list[Any]:
        """The results of ``reqs``; :class:`Missing` lists those not computed yet."""
        values = [self.cached(lm, r) for r in reqs]
        missing = [r for r, v in zip(reqs, values) if v is _MISS]
        if missing:
            raise Missing(lm.name, missing)
        return values

    # ---------------------------------------------------------------- computing
    def compute(self, lm: LoadedModel, req: Request, progress: Optional[Progress] = None
                ) -> Any:
        """The result of ``req``: stored, or computed here once per deployment (the store's
        lock: another process computing it already is waited for, and its result read)."""
        key = cache_key(lm, req)
        report = progress or (lambda _: None)
        value = self.cached(lm, req)
        if value is not _MISS:
            return value
        seen: list[Any] = []

        def stored() -> bool:  # the holder finished while we waited
            seen[:] = [self.cached(lm, req)]
            return seen[0] is not _MISS

        with store_lock(self.coord, f"lock:{key}", stop=stored) as held:
            if not held:
                return seen[0]
            value = self.cached(lm, req)  # finished between our look and the lock
            if value is not _MISS:
                return value
            spec = ANALYSES[req.name]
            value, seconds = timed(lambda: spec.compute(lm, report, **dict(req.params)))
            self.results.set(key, value)
            self._count(f"computed:{key}")
            self.coord.set(f"computed-by:{key}", {"pid": os.getpid(),
                                                  "host": socket.gethostname(),
                                                  "t": time.time()}, expire=COUNTER_TTL_S)
            self._memo.put(key, value, max(seconds, 1.0))  # temporaries freed: given back
            return value

    def get_or_compute(self, lm: LoadedModel, *reqs: Request) -> list[Any]:
        """The results of ``reqs``, computing the missing ones here in one job slot.

        Raises :class:`attention_lens.background.BusyError` when every slot is taken.
        """
        from . import background

        try:
            return self.get(lm, *reqs)
        except Missing as missing:
            label = ", ".join(r.label for r in missing.requests)
        with background.current().slots.job(label):
            return [self.compute(lm, r) for r in reqs]

    # ---------------------------------------------------------------- counting
    def stats(self, lm: LoadedModel, req: Request, pids: Sequence[int] = ()) -> dict[str, Any]:
        """How often ``req`` was computed, by which process, and read by each of ``pids``."""
        key = cache_key(lm, req)
        return {"computed": self.coord.count(f"computed:{key}"),
                "computed_by": self.coord.get(f"computed-by:{key}"),
                "served": {pid: self.coord.count(f"served:{key}:{pid}") for pid in pids}}

    def forget_memo(self) -> None:
        """Drop the in-process memo (the shared store keeps everything)."""
        self._memo.clear()


_STORES: dict[int, Store] = {}


def store() -> Store:
    """The store of the installed background (one per background, per process)."""
    from . import background

    bg = background.current()
    st = _STORES.get(id(bg))
    if st is None:
        st = _STORES.setdefault(id(bg), Store(bg.results, bg.kv))
    return st
