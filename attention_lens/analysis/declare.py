"""An analysis declared once: its function, typed parameters, scope, cost and JSON form.

A declaration sits next to its function in :mod:`attention_lens.analysis`::

    NEXT_TOKEN = declare(
        "next-token", next_token, paths=("predict",),
        params=[Int("top_k", 10, 1, lambda cfg: min(100, cfg.d_vocab), url="k"),
                Position("position", -1, url="pos")],
        to_json=lambda res: {"position": res.position, ...})

and everything else is derived from it: the page's controls and URL state
(``register_page(analysis=NEXT_TOKEN, ...)``), the endpoint ``POST /api/next-token`` (and
``/api/predict``) with its validation and 400s, the cache key (scope, name and the
normalised parameters) and the cache it lives in (the forward pass's per-prompt cache for
scope ``prompt``, the weight-analysis store for scope ``weights``; scope ``pair``: a
clean/corrupted pair or a set of pairs with answers and metric, the input
:class:`..analysis.patching.PairInput` reads from a request, its results kept in the
registry's weight-analysis cache; scope ``dataset``: a stored dataset by its identity, its
name and content hash, never its text, cut into windows, the input
:class:`..analysis.datasets.DatasetInput`, kept there too), and whether it runs
inline or as a background job with progress (:func:`runs_inline`, one threshold,
:data:`INLINE_MAX_GFLOP`).

Parameters have two readers: ``read`` is strict (the API: a wrong type or a value out of
bounds is a :class:`ParamError`, answered 400); the page's controls, derived from the same
parameter, are lenient (a bad URL value becomes the default or the nearest bound, with a
message). Bounds may depend on the model (``hi=lambda cfg: cfg.n_layers - 1``); a
:class:`Position` is bounded by the prompt's length.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import threading
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .errors import AnalysisError
from .labels import parse_head

Bound = Union[int, None, Callable[[Any], Optional[int]]]
SCOPES = ("prompt", "weights", "dataset", "pair")
#: Scopes whose page, endpoint, cache and job are derived today.
DERIVED_SCOPES = ("prompt", "weights", "pair", "dataset")

#: Largest magnitude of a whole number without bounds of its own.
MAX_WHOLE = 2**31 - 1


class ParamError(AnalysisError):
    """A parameter sent to an analysis has the wrong type or is out of bounds (a 400)."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


#: Largest estimated work (GFLOP) an analysis runs inline, in the request or callback that
#: asks for it; above it, it runs as a background job with progress and its result is kept
#: in the weight-analysis store (``ATTENTION_LENS_INLINE_MAX_GFLOP``). The one "is this big"
#: threshold of declared analyses: about a second of work on two cores, where the pages'
#: former thresholds were (a logit lens of 2**27 logits, GPT-2 small at 107 tokens: 206;
#: a head sweep of 2**36 multiply-adds: 137). On GPT-2 small an ablation at 256 tokens
#: (66) and a head sweep at 8 (171) run inline, a logit lens at 256 (494) as a job; on
#: SmolLM2 a head sweep at 5 tokens (195) is a job.
INLINE_MAX_GFLOP = _env_float("ATTENTION_LENS_INLINE_MAX_GFLOP", 180.0)


# ------------------------------------------------------------- strict field readers
def _shown_int(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}… ({len(str(abs(int(value))))} digits)"


def read_int(body: Mapping[str, Any], key: str, default: Optional[int], lo: int, hi: int,
             what: str = "") -> Optional[int]:
    """An optional integer in [lo, hi]; booleans and non-whole floats are refused."""
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ParamError(f"{key!r} must be an integer, got {value!r}"[:200])
    if not lo <= int(value) <= hi:
        raise ParamError(f"{key!r} must be between {lo} and {hi}{what}, "
                         f"got {_shown_int(value)}")
    return int(value)


def read_text(body: Mapping[str, Any], key: str, what: str = "the prompt to analyse") -> str:
    """A required, non-empty prompt ``body[key]`` (no NUL); a :class:`ParamError` naming it."""
    if key not in body:
        raise ParamError(f"missing field {key!r} ({what})")
    text = body[key]
    if not isinstance(text, str):
        raise ParamError(f"{key!r} must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise ParamError(f"{key!r} contains a NUL character")
    if not text.strip():
        raise ParamError(f"{key!r} is empty: send some text to analyse")
    return text


def read_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    """An optional boolean."""
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ParamError(f"{key!r} must be true or false, got {value!r}"[:200])
    return value


def read_choice(body: Mapping[str, Any], key: str, default: str,
                choices: Sequence[str]) -> str:
    """An optional string from ``choices``."""
    value = body.get(key, default)
    if value not in choices:
        raise ParamError(f"{key!r} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}"[:300])
    return value


def read_token(body: Mapping[str, Any], key: str) -> Optional[Union[int, str]]:
    """An optional token: an id or a string (checked by the analysis)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ParamError(f"{key!r} must be a token id or a token string, got {value!r}"[:200])
    if isinstance(value, str) and "\x00" in value:
        raise ParamError(f"{key!r} contains a NUL character")
    return value


# ------------------------------------------------------------------- parameter types
@dataclass(frozen=True)
class Shape:
    """What bounds are computed from: the model's config and the prompt's length."""

    cfg: Any = None
    n_tokens: Optional[int] = None


def _bound(bound: Bound, cfg: Any) -> Optional[int]:
    if callable(bound):
        return bound(cfg) if cfg is not None else None
    return bound


@dataclass(frozen=True)
class Param:
    """A parameter of an analysis: its name (the API field), the page's URL name (``url``)
    and the function's keyword (``arg``), both the name if empty; its default and label, and
    whether the page shows it (``page=False``: API only; the page passes the default)."""

    name: str
    default: Any = None
    label: str = field(default="", kw_only=True)
    url: str = field(default="", kw_only=True)
    arg: str = field(default="", kw_only=True)
    page: bool = field(default=True, kw_only=True)

    @property
    def url_name(self) -> str:
        """The name of the page's control and URL parameter."""
        return self.url or self.name

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:  # pragma: no cover
        """The value sent in ``body`` (strict: ParamError on a bad one)."""
        raise NotImplementedError

    def normal(self, value: Any, shape: Shape) -> Any:
        """The value as the cache key holds it (equal results, equal keys)."""
        return tuple(value) if isinstance(value, list) else value

    def from_page(self, value: Any) -> Any:
        """The value of the page's (validated) control in the function's units."""
        return value


@dataclass(frozen=True)
class Int(Param):
    """A whole number in [lo, hi] (bounds may be functions of the model's config)."""

    lo: Bound = None
    hi: Bound = None
    placeholder: str = field(default="", kw_only=True)
    what: str = field(default="", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        lo, hi = _bound(self.lo, shape.cfg), _bound(self.hi, shape.cfg)
        return read_int(body, self.name, self.default, -MAX_WHOLE if lo is None else lo,
                        MAX_WHOLE if hi is None else hi, self.what)


@dataclass(frozen=True)
class Choice(Param):
    """One of a fixed set of strings; ``labels`` name the options on the page."""

    choices: tuple[str, ...] = ()
    labels: Optional[dict[str, str]] = field(default=None, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        return read_choice(body, self.name, self.default, tuple(self.choices))


@dataclass(frozen=True)
class Bool(Param):
    """True or false."""

    default: Any = False

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        return read_bool(body, self.name, self.default)


@dataclass(frozen=True)
class Token(Param):
    """A token: an id or its text; None (the page: empty) lets the analysis or page choose."""

    placeholder: str = field(default="", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        return read_token(body, self.name)


@dataclass(frozen=True)
class Position(Param):
    """A token position of the prompt (``-1`` the last). With ``auto``, the page's empty
    box means "the page chooses" (its placeholder says how); the API uses ``default``."""

    default: Any = -1
    auto: bool = field(default=False, kw_only=True)
    placeholder: str = field(default="", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        n = shape.n_tokens or 1
        return read_int(body, self.name, self.default, -n, n - 1,
                        f" (the prompt has {n} tokens)")

    def normal(self, value: Any, shape: Shape) -> Any:
        n = shape.n_tokens
        if n and isinstance(value, int) and not isinstance(value, bool) and -n <= value < n:
            return value % n
        return value


@dataclass(frozen=True)
class Positions(Param):
    """Some token positions of the prompt (a list; None, the default, is every position).
    API only (``page=False``): a page chooses them, e.g. the positions a figure shows."""

    page: bool = field(default=False, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        value = body.get(self.name, self.default)
        if value is None:
            return None
        if not isinstance(value, list):
            raise ParamError(f"{self.name!r} must be a list of token positions, e.g. "
                             "[-3, -2, -1]")
        if not value:
            raise ParamError(f"{self.name!r} must name at least one position")
        n = shape.n_tokens or 1
        for q in value:
            if isinstance(q, bool) or not isinstance(q, Integral) or not -n <= q < n:
                raise ParamError(f"{self.name!r} must be whole numbers from {-n} to {n - 1} "
                                 f"(the prompt has {n} tokens), got {q!r}"[:200])
        return list(value)

    def normal(self, value: Any, shape: Shape) -> Any:
        n = shape.n_tokens
        if value is None or not n:
            return None if value is None else tuple(value)
        return tuple(sorted({int(q) % n for q in value}))


@dataclass(frozen=True)
class Heads(Param):
    """Attention heads: a list of ``[layer, head]`` pairs or labels such as ``"L1H5"``, at
    least one, at most ``most`` (required: no default). API only (``page=False``): a page
    chooses them (typed, or a preset)."""

    page: bool = field(default=False, kw_only=True)
    most: int = field(default=256, kw_only=True)
    #: what the heads are for, ending the message on an empty list (" to ablate")
    what: str = field(default="", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        value = body.get(self.name, self.default)
        if value is None:
            raise ParamError(f"missing field {self.name!r} (a list of [layer, head] pairs)")
        if not isinstance(value, list) or len(value) > self.most:
            raise ParamError(f"{self.name!r} must be a list of at most {self.most} "
                             "[layer, head] pairs")
        if not value:
            raise ParamError(f"{self.name!r} is empty: choose at least one [layer, head]"
                             f"{self.what}")
        out = []
        for item in value:
            pair = parse_head(item) if isinstance(item, str) else item
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and
                    all(isinstance(x, Integral) and not isinstance(x, bool) for x in pair)):
                raise ParamError(f"each entry of {self.name!r} must be a [layer, head] pair "
                                 f"or a label like 'L1H0', got {item!r}"[:200])
            layer, head = int(pair[0]), int(pair[1])
            if shape.cfg is not None:
                read_int({"layer": layer}, "layer", None, 0, shape.cfg.n_layers - 1)
                read_int({"head": head}, "head", None, 0, shape.cfg.n_heads - 1)
            out.append([layer, head])
        return out

    def normal(self, value: Any, shape: Shape) -> Any:
        return tuple(sorted({(int(la), int(h)) for la, h in value}))


@dataclass(frozen=True)
class Share(Param):
    """A share in (0, 1] (e.g. of a total influence); the page shows it in whole percent."""

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        value = body.get(self.name, self.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value <= 1:
            raise ParamError(f"{self.name!r} must be a number in (0, 1] (a share of the total "
                             f"influence), got {value!r}"[:200])
        return float(value)

    def normal(self, value: Any, shape: Shape) -> Any:
        return float(value)

    def from_page(self, value: Any) -> Any:
        return value / 100

    @property
    def percent(self) -> int:
        """The default in whole percent (the page's)."""
        return round(self.default * 100)


# ------------------------------------------- parameter types of pair-scope analyses
@dataclass(frozen=True)
class HeadPair(Param):
    """One attention head, ``[layer, head]`` (a negative index counts from the end); None
    (the default) when not chosen. API only (``page=False``): a page reads its own box."""

    page: bool = field(default=False, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        value = body.get(self.name, self.default)
        if value is None:
            return None
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, Integral) for v in value)):
            raise ParamError(f"{self.name!r} must be [layer, head], got {value!r}"[:200])
        layer, head = int(value[0]), int(value[1])
        if shape.cfg is not None:
            for v, n, what, exists in (
                    (layer, shape.cfg.n_layers, "layer", f"the model has {shape.cfg.n_layers} "
                                                         "layer(s)"),
                    (head, shape.cfg.n_heads, "head", f"each layer has {shape.cfg.n_heads} "
                                                      "heads")):
                if not -n <= v < n:
                    raise ParamError(f"{what} {v} does not exist: {exists}, numbered 0 to "
                                     f"{n - 1}")
            layer, head = layer % shape.cfg.n_layers, head % shape.cfg.n_heads
        return [layer, head]

    def normal(self, value: Any, shape: Shape) -> Any:
        return None if value is None else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class Sized(Int):
    """A whole number in [lo, hi] whose message names the model's size (``what_of(cfg)``,
    e.g. " (gpt2 has 144 heads)")."""

    what_of: Optional[Callable[[Any], str]] = field(default=None, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        lo, hi = _bound(self.lo, shape.cfg), _bound(self.hi, shape.cfg)
        what = self.what_of(shape.cfg) if self.what_of and shape.cfg is not None else \
            self.what
        default = _bound(self.default, shape.cfg) if callable(self.default) else self.default
        return read_int(body, self.name, default, -MAX_WHOLE if lo is None else lo,
                        MAX_WHOLE if hi is None else hi, what)


@dataclass(frozen=True)
class Number(Param):
    """A finite number at least ``lo``; ``what`` says what it is in the message."""

    lo: float = 0.0
    what: str = field(default="", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        value = body.get(self.name, self.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not self.lo <= value < float("inf"):
            raise ParamError(f"{self.name!r} must be a number >= {self.lo:g}{self.what}, "
                             f"got {value!r}"[:200])
        return float(value)

    def normal(self, value: Any, shape: Shape) -> Any:
        return float(value)


# ----------------------------------------------------------------------- analyses
Cost = Callable[[Any, int, dict], float]


def reads_the_pass(cfg: Any, n_tokens: int, values: dict) -> float:
    """The cost of an analysis that only reads the prompt's cached forward pass: no further
    forward passes."""
    return 0.0


def _fields_json(result: Any) -> dict[str, Any]:
    return {"result": result}


@dataclass(frozen=True)
class Analysis:
    """A declared analysis (see the module's docs).

    ``fn(lm, fp, **params, **needs)`` for scope ``prompt`` (``fn(lm, **params, **needs)`` for
    ``weights``; ``fn(lm, pair, **params)`` for ``pair``, ``pair`` the scope's input);
    ``needs`` maps a keyword of ``fn`` to the weight analysis (by its store name) it reads;
    ``cost(cfg, n_tokens, params)`` estimates the work in forward passes of the prompt
    beyond the cached one (the default, 0: it only reads that pass);
    ``to_json(result)`` gives the endpoint's fields (numpy arrays and dataclasses allowed:
    the API encodes them); ``paths`` are further endpoint names (kept old paths).
    """

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    scope: str = "prompt"
    cost: Cost = reads_the_pass
    to_json: Callable[[Any], dict[str, Any]] = _fields_json
    needs: Mapping[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    label: str = ""
    #: significant digits of the endpoint's floats (None: exact, e.g. float64 sums that
    #: must add up)
    digits: Optional[int] = 7
    #: ``check(values)``: what no one parameter says alone (e.g. "one of two fields"),
    #: a ParamError (400) before any work
    check: Optional[Callable[[dict], None]] = None
    #: ``canonical(values)``: the values with those that cannot change the result set to one
    #: form (circuit discovery's ACDC threshold when the search is not ACDC), so equal
    #: results share a cache key whether a page or the API asked
    canonical: Optional[Callable[[dict], dict]] = None
    #: fields of the scope's input the analysis does not read (sent, they are refused as
    #: unknown: circuit discovery has no direction)
    without: tuple[str, ...] = ()
    #: parameters of what the endpoint shows of the result (which metric's examples, how
    #: many): read and checked like ``params``, but no part of the cache key or the job
    views: tuple[Param, ...] = ()
    #: ``show(lm, result, views, encode)``: the endpoint's fields when the analysis has
    #: ``views`` (instead of ``to_json``), JSON-ready (``encode``: the API's encoder of
    #: arrays and rounded floats); ``check_views(views)`` as ``check``
    show: Optional[Callable[..., dict[str, Any]]] = None
    check_views: Optional[Callable[[dict], None]] = None

    @property
    def fields(self) -> set[str]:
        """The API fields of the parameters."""
        return {p.name for p in (*self.params, *self.views)}

    def read_views(self, body: Mapping[str, Any], shape: Shape) -> dict[str, Any]:
        """Every view's value from an API body (strict: ParamError on a bad one)."""
        values = {p.name: p.read(body, shape) for p in self.views}
        if self.check_views is not None:
            self.check_views(values)
        return values

    def read(self, body: Mapping[str, Any], shape: Shape) -> dict[str, Any]:
        """Every parameter's value from an API body (strict: ParamError on a bad one)."""
        values = {p.name: p.read(body, shape) for p in self.params}
        if self.check is not None:
            self.check(values)
        return values if self.canonical is None else self.canonical(values)

    def values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every parameter's value: ``given`` ones, the defaults for the rest."""
        unknown = set(given) - {p.name for p in self.params}
        if unknown:
            raise TypeError(f"{self.name} has no parameters {sorted(unknown)}")
        values = {p.name: given.get(p.name, p.default) for p in self.params}
        return values if self.canonical is None else self.canonical(values)

    def from_query(self, query: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters from a page's validated controls (URL names; an empty token is
        None; a parameter the page does not show takes its default)."""
        out = {}
        for p in self.params:
            value = p.from_page(query[p.url_name]) if p.page and p.url_name in query \
                else p.default
            if isinstance(p, Token) and value == "":
                value = None
            out[p.name] = value
        return out

    def key(self, values: Mapping[str, Any], shape: Shape = Shape(), given: Any = None
            ) -> tuple:
        """The cache key: scope, name and the normalised parameters (and the key of the
        scope's input ``given``, the pair of scope pair)."""
        key = (self.scope, self.name,
               tuple((p.name, p.normal(values[p.name], shape)) for p in self.params))
        return key if given is None else key + (given.key(),)

    def gflop(self, cfg: Any, n_tokens: int, values: Mapping[str, Any]) -> float:
        """Estimated work (GFLOP): the cost in passes times one pass's work."""
        return float(self.cost(cfg, n_tokens, dict(values))) * forward_gflop(cfg, n_tokens)

    def compute(self, lm: Any, fp: Any, values: Mapping[str, Any], needs: Mapping[str, Any],
                progress: Optional[Callable[[float], None]] = None) -> Any:
        """Run the function (the prompt's forward pass ``fp``, None for scope weights, the
        pair for scope pair)."""
        shape = Shape(lm.cfg, getattr(fp, "n_tokens", None))
        args = {p.arg or p.name: p.normal(values[p.name], shape)
                if isinstance(p, (Position, Positions)) else values[p.name]
                for p in self.params}
        if progress is not None and "progress" in inspect.signature(self.fn).parameters:
            args["progress"] = progress
        if self.scope == "weights":
            return self.fn(lm, **args, **needs)
        return self.fn(lm, fp, **args, **needs)

    def stored_params(self, values: Mapping[str, Any], shape: Shape = Shape()) -> str:
        """The normalised parameters as the store's request carries them (canonical JSON)."""
        return json.dumps({p.name: p.normal(values[p.name], shape) for p in self.params},
                          sort_keys=True)


def forward_gflop(cfg: Any, n_tokens: int) -> float:
    """Floating-point work (GFLOP) of one forward pass of ``n_tokens`` tokens: two per weight
    and token, plus the attention scores and mixing."""
    c = cfg
    per_layer = 4 * c.d_model * c.n_heads * c.d_head
    if not c.attn_only:
        per_layer += 2 * c.d_model * (c.d_mlp or 4 * c.d_model)
    weights = c.n_layers * per_layer + c.d_model * c.d_vocab
    attention = c.n_layers * c.n_heads * 2 * n_tokens * n_tokens * c.d_head
    return (2 * n_tokens * weights + 2 * attention) / 1e9


def runs_inline(analysis: Analysis, cfg: Any, n_tokens: int,
                values: Mapping[str, Any]) -> bool:
    """Whether ``analysis`` runs inline (else as a background job): its estimated work
    against :data:`INLINE_MAX_GFLOP`."""
    return analysis.gflop(cfg, n_tokens, values) <= INLINE_MAX_GFLOP


# ------------------------------------------------------------------ the declarations
_DECLARED: dict[str, Analysis] = {}
_LOCK = threading.Lock()
_SCANNED = False


def declare(name: str, fn: Callable[..., Any], *, params: Sequence[Param] = (),
            scope: str = "prompt", cost: Cost = reads_the_pass,
            to_json: Callable[[Any], dict[str, Any]] = _fields_json,
            needs: Optional[Mapping[str, str]] = None, paths: Sequence[str] = (),
            label: str = "", digits: Optional[int] = 7,
            check: Optional[Callable[[dict], None]] = None,
            canonical: Optional[Callable[[dict], dict]] = None,
            without: Sequence[str] = (), views: Sequence[Param] = (),
            show: Optional[Callable[..., dict[str, Any]]] = None,
            check_views: Optional[Callable[[dict], None]] = None) -> Analysis:
    """Declare an analysis (see the module's docs); declaring a name again replaces it."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope not in DERIVED_SCOPES:
        raise ValueError(f"{name}: scope {scope!r} has no derived endpoint and cache yet "
                         f"(declared scopes: {', '.join(DERIVED_SCOPES)})")
    names = [p.name for p in (*params, *views)]
    urls = [p.url_name for p in params if p.page]
    if len(set(names)) != len(names) or len(set(urls)) != len(urls):
        raise ValueError(f"{name}: parameters need distinct names and URL names")
    analysis = Analysis(name=name, fn=fn, params=tuple(params), scope=scope, cost=cost,
                        to_json=to_json, needs=dict(needs or {}), paths=tuple(paths),
                        label=label or name.replace("-", " "), digits=digits,
                        check=check, canonical=canonical, without=tuple(without),
                        views=tuple(views), show=show, check_views=check_views)
    with _LOCK:
        for path in (name, *paths):
            other = _DECLARED.get(path)
            if other is not None and other.name != name:
                raise ValueError(f"{path!r} is already the endpoint of {other.name}")
        for path in (name, *paths):
            _DECLARED[path] = analysis
    return analysis


def _scan() -> None:
    """Import every module of the analysis package once, so its declarations exist."""
    global _SCANNED
    if _SCANNED:
        return
    from .. import analysis as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
        # a package's declarations may sit in its module ``declared`` (analysis/circuit)
        if mod.ispkg and importlib.util.find_spec(f"{pkg.__name__}.{mod.name}.declared"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}.declared")
    _SCANNED = True


def find(name: str) -> Optional[Analysis]:
    """The analysis declared under ``name`` (or one of its paths), or None."""
    if name not in _DECLARED:
        _scan()
    return _DECLARED.get(name)


def declared() -> dict[str, Analysis]:
    """Every endpoint name with its analysis."""
    _scan()
    return dict(_DECLARED)


def fields_of(result: Any) -> dict[str, Any]:
    """A dataclass result's fields as a dict (for a JSON form adding properties to them)."""
    import dataclasses

    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


# ------------------------------------------- layers, heads and query positions (API fields)
# Parameters of the per-prompt endpoints that name a head or a few query rows: an optional
# layer, a head that needs its layer (or both required), an optional list of heads instead,
# and query positions as a list or a window. Messages name the field and the model's shape.
def _model_name(cfg: Any) -> str:
    return getattr(cfg, "name", None) or "the model"


@dataclass(frozen=True)
class Layer(Param):
    """A layer index in [0, n_layers - 1]; None (the default) is "every layer" (or, with a
    :class:`Head` marked ``required``, a 400 there)."""

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        cfg = shape.cfg
        n = cfg.n_layers if cfg is not None else MAX_WHOLE
        what = "" if cfg is None else f" (the model {_model_name(cfg)} has {n} layer(s))"
        return read_int(body, self.name, self.default, 0, n - 1, what)


@dataclass(frozen=True)
class Head(Param):
    """A head index in [0, n_heads - 1] of the layer in the field ``layer``, which it needs;
    ``required``: both must be sent."""

    layer: str = field(default="layer", kw_only=True)
    required: bool = field(default=False, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        cfg = shape.cfg
        n = cfg.n_heads if cfg is not None else MAX_WHOLE
        what = "" if cfg is None else f" (each layer of {_model_name(cfg)} has {n} heads)"
        head = read_int(body, self.name, self.default, 0, n - 1, what)
        layer = body.get(self.layer)
        if head is not None and layer is None:
            raise ParamError(f"{self.name!r} needs a {self.layer!r} too")
        if self.required and (layer is None or head is None):
            raise ParamError(f"{self.layer!r} and {self.name!r} are required")
        return head


@dataclass(frozen=True)
class SomeHeads(Param):
    """An optional list of heads (``[layer, head]`` pairs or labels such as ``"L1H5"``), in
    the order given, instead of the field ``instead`` (a :class:`Layer`). API only."""

    page: bool = field(default=False, kw_only=True)
    most: int = field(default=256, kw_only=True)
    instead: str = field(default="layer", kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        if self.name not in body:
            return None
        if body.get(self.instead) is not None:
            raise ParamError(f"send either {self.name!r} (a list of heads) or "
                             f"{self.instead!r} (and 'head'), not both")
        value = body[self.name]
        if value is None:
            raise ParamError(f"missing field {self.name!r} (a list of [layer, head] pairs)")
        if not isinstance(value, list) or len(value) > self.most:
            raise ParamError(f"{self.name!r} must be a list of at most {self.most} "
                             "[layer, head] pairs")
        out = []
        for item in value:
            label = parse_head(item) if isinstance(item, str) else None
            if label is not None:
                item = list(label)
            if not (isinstance(item, list) and len(item) == 2):
                raise ParamError(f"each entry of {self.name!r} must be a [layer, head] pair "
                                 f"or a label like 'L1H0', got {item!r}"[:200])
            pair = {"layer": item[0], "head": item[1]}
            layer = Layer("layer").read(pair, shape)
            out.append((layer, Head("head", required=True).read(pair, shape)))
        if not out:
            raise ParamError(f"{self.name!r} is empty: choose at least one head, as "
                             "[layer, head] or 'L1H0'")
        return out

    def normal(self, value: Any, shape: Shape) -> Any:
        return None if value is None else tuple((int(la), int(h)) for la, h in value)


def read_positions(body: Mapping[str, Any], key: str, n_tokens: int) -> Optional[list[int]]:
    """Optional prompt positions ``body[key]``: a list of positions, or a window
    ``{"start", "stop"}``.

    Positions count from 0, negative ones from the end (``-1`` is the last token); a window
    is half-open, ``start`` defaulting to 0 and ``stop`` to the prompt's length. The
    positions come back non-negative, in the order given (a window's in increasing order).
    """
    value = body.get(key)
    if value is None:
        return None
    what = f" (the prompt has {n_tokens} tokens)"
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"start", "stop"})
        if unknown:
            raise ParamError(f"{key!r} as a window takes 'start' and 'stop', got "
                             f"{', '.join(map(repr, unknown))}"[:200])
        start = read_int(value, "start", 0, -n_tokens, n_tokens - 1, what)
        stop = read_int(value, "stop", n_tokens, -n_tokens, n_tokens, what)
        start, stop = start % n_tokens, stop if stop >= 0 else stop + n_tokens  # type: ignore
        if stop <= start:
            raise ParamError(f"{key!r} window is empty: start {start} is not before stop "
                             f"{stop}{what}")
        return list(range(start, stop))
    if not isinstance(value, list):
        raise ParamError(f"{key!r} must be a list of positions or a window "
                         f"{{\"start\": .., \"stop\": ..}}, got {value!r}"[:200])
    if not value:
        raise ParamError(f"{key!r} is empty: give at least one position")
    if len(value) > n_tokens:
        raise ParamError(f"{key!r} has {len(value)} entries; the prompt has {n_tokens} tokens")
    out = []
    for i, item in enumerate(value):
        name = f"{key}[{i}]"
        pos = read_int({name: item}, name, None, -n_tokens, n_tokens - 1, what)
        if pos is None:
            raise ParamError(f"{name!r} must be an integer, got null")
        out.append(pos % n_tokens)
    return out


@dataclass(frozen=True)
class Rows(Param):
    """Some positions of the prompt, as a list or a window ``{"start", "stop"}``
    (:func:`read_positions`), kept in the order given (repeats too); None is every one.
    API only."""

    page: bool = field(default=False, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        return read_positions(body, self.name, shape.n_tokens or 1)

    def normal(self, value: Any, shape: Shape) -> Any:
        n = shape.n_tokens
        if value is None:
            return None
        return tuple(int(q) % n if n else int(q) for q in value)


@dataclass(frozen=True)
class Exact:
    """A value of an endpoint's JSON written as it is, not rounded to the declaration's
    ``digits`` (e.g. a sum that must add up beside rounded terms)."""

    value: Any


@dataclass(frozen=True)
class ModelInt(Int):
    """A whole number whose message (``what``) may be a function of the model's config."""

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        lo, hi = _bound(self.lo, shape.cfg), _bound(self.hi, shape.cfg)
        what = self.what(shape.cfg) if callable(self.what) and shape.cfg is not None \
            else self.what if isinstance(self.what, str) else ""
        return read_int(body, self.name, self.default, -MAX_WHOLE if lo is None else lo,
                        MAX_WHOLE if hi is None else hi, what)


#: Analyses whose endpoint is ``GET /api/<name>`` with the parameters in the query string
#: (weight analyses read from a link), instead of ``POST`` with a JSON body.
_BY_GET: set[str] = set()


def answers_get(analysis: Analysis) -> Analysis:
    """Serve ``analysis`` as ``GET /api/<name>?param=value...`` (whole numbers parsed from
    the query string) instead of ``POST``."""
    with _LOCK:
        _BY_GET.add(analysis.name)
    return analysis


def method_of(analysis: Analysis) -> str:
    """The HTTP method of the analysis's endpoint: ``GET`` or ``POST``."""
    return "GET" if analysis.name in _BY_GET else "POST"


def query_ints(analysis: Analysis) -> set[str]:
    """The parameters a query string carries as whole numbers."""
    return {p.name for p in analysis.params if isinstance(p, (Int, Layer, Head, Position))}


def read_words(body: Mapping[str, Any], key: str, required: bool, most: int) -> list[str]:
    """A list of words ``body[key]`` (one word may be sent as a string): at most ``most``,
    none empty; ``required``: the field must be sent."""
    value = body.get(key, [] if not required else None)
    if value is None:
        raise ParamError(f"missing field {key!r} (a list of words)")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise ParamError(f"{key!r} must be a list of strings")
    if len(value) > most:
        raise ParamError(f"{key!r} has {len(value)} terms; at most {most} are allowed")
    for w in value:
        if "\x00" in w:
            raise ParamError(f"{key!r} contains a NUL character")
        if not w.strip():
            raise ParamError(f"{key!r} contains an empty word")
    return value


@dataclass(frozen=True)
class Words(Param):
    """Words typed by the user (a list; one word may be a string); ``required``: sent and
    not empty. API only."""

    page: bool = field(default=False, kw_only=True)
    required: bool = field(default=False, kw_only=True)
    most: int = field(default=10, kw_only=True)

    def read(self, body: Mapping[str, Any], shape: Shape) -> Any:
        words = read_words(body, self.name, self.required, self.most)
        if self.required and not words:
            raise ParamError(f"{self.name!r} is empty: give at least one word")
        return words


def has_cost(analysis: Analysis) -> bool:
    """Whether the analysis estimates its work (a weight analysis without an estimate always
    runs as a job, its result kept in the weight-analysis store)."""
    return analysis.cost is not reads_the_pass
