"""The model registry: discovers model folders, loads them lazily, caches forward passes.

One registry per process. It is thread-safe: concurrent requests share one model
instance and one bounded LRU cache of forward passes keyed by (model, token ids).
Weight-only analyses are cached per model (they never change).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence, TypeVar

from .analysis.errors import AnalysisError
from .analysis.forward import ForwardPass, run_forward, tokenize
from .cache import ByteLRU, nbytes_of, release_memory, timed  # noqa: F401 - re-exported
from .model.checkpoint import CheckpointError, LoadedModel, load_model
from .paths import user_models_dir  # noqa: F401 - part of this module's interface

T = TypeVar("T")
_MISS = object()

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = PACKAGE_ROOT / "weights"
DEFAULT_MODEL = "attn-only-2l"
#: Default caps of a worker's caches: forward passes with their per-prompt results, and
#: weight analyses (a 256-token forward pass through GPT-2 small holds ~180 MB; with
#: 640 MiB one GPT-2-small worker stays near 2.5 GB).
DEFAULT_FORWARD_BYTES = 640 * 2**20
DEFAULT_WEIGHTS_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ModelEntry:
    """A model folder found on disk: loadable or not, with the reason."""

    name: str
    path: Path
    size_bytes: int
    kind: str  # "attention-lens", "huggingface" or "gguf"
    error: Optional[str] = None
    detail: Optional[str] = None  # shown with the name in the picker, e.g. "GGUF Q4_1"

    @property
    def available(self) -> bool:
        """True when the folder looks loadable."""
        return self.error is None


def folder_kind(folder: Path) -> Optional[str]:
    """Which checkpoint format a folder holds, or None if it is no model folder.

    Decided by ``config.json``: our keys (``n_layers``, ``d_head``) mean our format; a
    Hugging Face config (``architectures`` or ``model_type``) means "huggingface". A config
    that cannot be parsed counts as ours, so the loader reports the broken file.
    """
    path = folder / "config.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    if isinstance(data, dict) and not _is_our_config(data) and (
        "architectures" in data or "model_type" in data
    ):
        return "huggingface"
    return "attention-lens"


def _read_json(path: Path) -> Any:
    from .model.jsonfile import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def public_reason(reason: BaseException | str, folder: Path) -> str:
    """Why ``folder`` cannot be used, naming files relative to its models directory.

    Every user sees these reasons (model picker, ``/api/models``): they never contain the
    server's absolute paths.
    """
    text = str(reason) if isinstance(reason, (str, CheckpointError)) else \
        f"{folder.name}: cannot be loaded ({type(reason).__name__}: {str(reason)[:300]})"
    base = folder.parent
    for root in {str(base.resolve()), str(base.absolute()), str(base)}:
        if root not in ("", ".", "/"):
            text = text.replace(root.rstrip("/") + "/", "")
    return text


def _is_our_config(data: Any) -> bool:
    return isinstance(data, dict) and "n_layers" in data and "d_head" in data


def is_gguf(path: Path) -> bool:
    """True for a ``.gguf`` file."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_entry(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(why the GGUF file cannot be loaded or None, its picker detail such as "GGUF Q4_1")."""
    from .model.gguf import check_gguf

    error, quant = check_gguf(path)
    return error, f"GGUF {quant}" if quant else "GGUF"


def load_folder(folder: Path, device: str = "cpu", name: Optional[str] = None,
                cache_dir: Optional[Path] = None) -> LoadedModel:
    """Load a model folder (or a GGUF file) of any supported format."""
    if is_gguf(folder):
        from .model.gguf import load_gguf

        return load_gguf(folder, device=device, name=name,
                         cache_dir=Path(cache_dir) / "gguf" if cache_dir else None)
    kind = folder_kind(folder)
    if kind == "huggingface":
        try:
            from .model.hf import load_hf_folder
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise CheckpointError(folder, f"Hugging Face folders need the 'hf' extra ({exc})")
        return load_hf_folder(folder, device=device, name=name)
    return load_model(folder, device=device, name=name)


def quick_check(folder: Path) -> Optional[str]:
    """Cheap validation of a folder in our format (files present, config, safetensors header).

    Returns the reason the folder cannot be loaded, or None (a CheckpointError may also
    escape); reading the weights themselves is left to the first use.
    """
    from .model.checkpoint import (
        CARD,
        TOKENIZER,
        WEIGHTS,
        check_shapes,
        read_config,
        read_json_file,
        tensor_shapes,
    )

    cfg = read_config(folder)  # sizes bounded, paths inside the folder
    for name in (WEIGHTS, TOKENIZER):
        if not (folder / name).is_file():
            return f"{folder / name}: missing file"
    check_shapes(cfg, tensor_shapes(folder / WEIGHTS), folder / WEIGHTS)
    if (folder / CARD).is_file():
        read_json_file(folder / CARD)
    return None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


#: Results kept per cached forward pass (a walk through every page keeps each page's own);
#: the least recently used goes first, and the pass's byte budget bounds them too.
MAX_PER_PROMPT = 32


@dataclass
class _Cached:
    """A cached forward pass, what was computed from it, and the bytes both hold."""

    fp: ForwardPass
    nbytes: int
    derived: OrderedDict[Hashable, tuple[Any, int]] = field(default_factory=OrderedDict)


def _model_bytes(lm: LoadedModel) -> int:
    return sum(t.numel() * t.element_size() for t in lm.model.state_dict().values())


class Registry:
    """Owns loaded models (at most ``max_models``) and the forward-pass LRU cache."""

    def __init__(
        self,
        models_dirs: Iterable[Path | str] = (DEFAULT_WEIGHTS,),
        default: str = DEFAULT_MODEL,
        max_models: int = 2,
        max_forward: int = 64,
        max_weights: int = 256,
        max_forward_bytes: int = DEFAULT_FORWARD_BYTES,
        max_weights_bytes: int = DEFAULT_WEIGHTS_BYTES,
        max_tokens: Optional[int] = None,
        device: str = "cpu",
        user_models: bool = False,
        cache_dir: Optional[Path | str] = None,
        hf_cache: bool = False,
    ) -> None:
        self.models_dirs = [Path(d) for d in models_dirs]
        #: List the models of the user's Hugging Face cache (snapshots, not copied).
        self.hf_cache = hf_cache
        #: Models named by hub id (``--model ORG/NAME``): name -> snapshot folder or the reason
        #: it could not be found.
        self._hub: dict[str, Path | str] = {}
        if default and not Path(default).expanduser().exists():
            from .model.hub import is_hub_id

            if is_hub_id(default):
                self._hub[default] = self._resolve_hub(default)
        #: Scan the per-user models folder (:func:`user_models_dir`) after ``models_dirs``.
        self.user_models = user_models
        #: The deployment's cache folder: dequantized GGUF weights go to its ``gguf/``.
        self.cache_dir = Path(cache_dir) if cache_dir else None
        direct = Path(default).expanduser() if default else None
        if direct is not None and (is_gguf(direct) or (direct / "config.json").is_file()):
            self.models_dirs.append(direct)  # --model PATH: the file or folder itself
            default = direct.stem if is_gguf(direct) else direct.name
        self.max_models, self.max_forward, self.max_weights = max_models, max_forward, max_weights
        self.max_tokens, self.device = max_tokens, device
        self.max_forward_bytes, self.max_weights_bytes = max_forward_bytes, max_weights_bytes
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        # forward passes (with their per-prompt results) and weight analyses: two regions of
        # the one in-process cache, each bounded by its settings (read at every store)
        self._forward = ByteLRU("forward", lambda: self.max_forward_bytes,
                                lambda: self.max_forward, sizeof=lambda c: c.nbytes,
                                keep_newest=True)  # the newest pass stays (README)
        self._running: dict[tuple[str, tuple[int, ...]], threading.Lock] = {}
        self._weights = ByteLRU("weights", lambda: self.max_weights_bytes,
                                lambda: self.max_weights)
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()
        self.default = default if default in self._entries else next(iter(self._entries), default)

    # ------------------------------------------------------------- discovery
    def refresh(self) -> list[ModelEntry]:
        """Rescan the model folders."""
        entries: dict[str, ModelEntry] = {}
        roots = list(self.models_dirs)
        if self.user_models:
            roots.append(user_models_dir())
        for root in roots:
            if is_gguf(root):
                candidates = [root]
            elif not root.is_dir():
                continue
            else:
                candidates = [root] if (root / "config.json").is_file() else \
                    sorted(root.iterdir())
            for folder in candidates:
                if folder.name.startswith("."):
                    continue
                if is_gguf(folder):
                    try:
                        gerror, detail = gguf_entry(folder)
                        gsize = folder.stat().st_size
                    except Exception as exc:  # noqa: BLE001 - one bad file never stops the app
                        gerror, detail, gsize = str(exc), "GGUF", 0
                    entries.setdefault(folder.stem, ModelEntry(
                        folder.stem, folder, gsize, "gguf",
                        public_reason(gerror, folder) if gerror else None, detail))
                    continue
                if not folder.is_dir():
                    continue
                kind = folder_kind(folder)
                if kind is None:
                    continue
                error: Optional[BaseException | str]
                try:
                    if kind == "attention-lens":
                        error = quick_check(folder)
                    else:  # cheap checks only (config, architecture, files): no weights read
                        from .model.hf import inspect_hf_folder

                        error = inspect_hf_folder(folder)
                    size = _size(folder)
                except Exception as exc:  # noqa: BLE001 - one bad folder never stops the app
                    error, size = exc, 0
                reason = public_reason(error, folder) if error else None
                entries.setdefault(folder.name, ModelEntry(folder.name, folder, size, kind,
                                                           reason))
        self._hf_entries(entries)
        with self._lock:
            self._entries = entries
        return list(entries.values())

    @staticmethod
    def _resolve_hub(repo_id: str) -> Path | str:
        """The snapshot of a hub id: the Hugging Face cache first, else a download (unless
        ``HF_HUB_OFFLINE``); the reason as text when neither works."""
        from .model.hub import offline, resolve

        try:
            return resolve(repo_id, allow_download=not offline())
        except CheckpointError as exc:
            return str(exc)

    def _hf_entries(self, entries: dict[str, ModelEntry]) -> None:
        """Models of the Hugging Face cache and those named by hub id (supported ones only)."""
        from .model.hf import inspect_hf_folder
        from .model.hub import cached_models

        found: list[tuple[str, Path | str]] = list(self._hub.items())
        if self.hf_cache:
            try:
                found += cached_models()
            except OSError:
                pass
        for repo_id, snap in found:
            if repo_id in entries:
                continue
            if isinstance(snap, str):
                entries[repo_id] = ModelEntry(repo_id, Path("."), 0, "huggingface", snap,
                                              "Hugging Face")
                continue
            try:
                error = inspect_hf_folder(snap)
                size = _size(snap)
            except Exception as exc:  # noqa: BLE001 - one bad snapshot never stops the app
                error, size = str(exc), 0
            if error and "unsupported architecture" in error and repo_id not in self._hub:
                continue  # the cache holds every kind of model: list only what we convert
            entries[repo_id] = ModelEntry(repo_id, snap, size, "huggingface",
                                          public_reason(error, snap) if error else None,
                                          "HF cache")

    def mark_unavailable(self, name: str, reason: str) -> None:
        """Record that model ``name`` cannot be loaded (shown in the picker and the API)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries[name] = ModelEntry(entry.name, entry.path, entry.size_bytes,
                                                 entry.kind, reason, entry.detail)

    def entries(self) -> list[ModelEntry]:
        """Every model folder found, loadable or not."""
        return list(self._entries.values())

    def names(self) -> list[str]:
        """Names of the models that can be picked."""
        return [e.name for e in self._entries.values() if e.available]

    # --------------------------------------------------------------- loading
    def get(self, name: Optional[str] = None) -> LoadedModel:
        """The loaded model ``name`` (the default if None), loading it on first use."""
        name = name or self.default
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            entry = self._entries.get(name)
            if entry is None:
                raise AnalysisError(f"unknown model {name!r}; available: {', '.join(self.names())}")
            if entry.error:
                raise AnalysisError(f"model {name!r} is unavailable: {entry.error}")
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:  # one load per model even under concurrent first requests
            with self._lock:
                if name in self._models:
                    return self._models[name]
            try:
                lm = load_folder(entry.path, device=self.device, name=name,
                                 cache_dir=self.cache_dir)
            except Exception as exc:  # noqa: BLE001 - any failure: unavailable, with the reason
                reason = public_reason(exc, entry.path)
                self.mark_unavailable(name, reason)
                raise AnalysisError(f"model {name!r} is unavailable: {reason}") from None
            with self._lock:
                self._models[name] = lm
                while len(self._models) > self.max_models:
                    evicted, _ = self._models.popitem(last=False)
                    self._forward.discard(lambda k, m=evicted: k[0] == m)
                    self._weights.discard(lambda k, m=evicted: k[0] == m)
                    release_memory()  # the model's parameters are freed too
            return lm

    def add(self, lm: LoadedModel) -> None:
        """Register an already-loaded model (tests, notebooks)."""
        with self._lock:
            self._entries[lm.name] = ModelEntry(lm.name, lm.path or Path("."), 0, "memory")
            self._models[lm.name] = lm

    # --------------------------------------------------------------- caching
    def forward(self, text: str, model: Optional[str] = None) -> ForwardPass:
        """The cached forward pass of ``text`` through ``model``.

        Concurrent requests for the same prompt (a page's callbacks fire together) wait for
        one computation instead of each running the model.
        """
        lm = self.get(model)
        tokenized = tokenize(lm, text, self.max_tokens)
        key = (lm.name, tuple(tokenized[0]))
        hit = self._forward.get(key)
        if hit is not None:
            return hit.fp
        with self._lock:
            lock = self._running.setdefault(key, threading.Lock())
        with lock:
            hit = self._forward.get(key)
            if hit is not None:
                return hit.fp
            try:
                fp = run_forward(lm, text, self.max_tokens, tokenized=tokenized)
                with self._lock:
                    self._forward.put(key, _Cached(fp, fp.nbytes))
            finally:
                with self._lock:
                    self._running.pop(key, None)
        return fp

    def cached_forward(self, model: str, token_ids: Sequence[int]) -> Optional[ForwardPass]:
        """The cached forward pass of these token ids through ``model``, or None."""
        hit = self._forward.get((model, tuple(int(i) for i in token_ids)))
        return None if hit is None else hit.fp

    def per_prompt(self, fp: ForwardPass, key: Hashable, compute: Callable[[], T]) -> T:
        """An analysis of one forward pass, cached with it under ``key``.

        The result is counted in the forward-pass cache's bytes and evicted with its pass
        (a pass no longer cached is computed on without keeping the result).
        """
        fkey = (fp.model_name, tuple(int(i) for i in fp.token_ids))
        with self._lock:
            entry = self._forward.get(fkey)
            if entry is not None and entry.fp is fp and key in entry.derived:
                entry.derived.move_to_end(key)
                return entry.derived[key][0]
        value, seconds = timed(compute)
        size = nbytes_of(value)
        with self._lock:
            entry = self._forward.get(fkey)
            if entry is None or entry.fp is not fp:
                self._forward.computed(seconds)
                return value
            if key not in entry.derived:
                entry.derived[key] = (value, size)
                entry.nbytes += size
            # a result larger than the whole budget is not kept
            while len(entry.derived) > MAX_PER_PROMPT or (
                    entry.nbytes > self.max_forward_bytes and entry.derived):
                _, (_, dropped) = entry.derived.popitem(last=False)
                entry.nbytes -= dropped
            self._forward.put(fkey, entry, seconds)  # measured again with its results
        return value

    def weights(self, model: Optional[str], key: Any, compute: Callable[[LoadedModel], T]) -> T:
        """A weight-only analysis of ``model``, computed once and cached under ``key``.

        Bounded by count (``max_weights``) and bytes (``max_weights_bytes``); a result larger
        than the byte budget is not kept.
        """
        lm = self.get(model)
        k = (lm.name, key)
        hit = self._weights.get(k, _MISS)
        if hit is not _MISS:
            return hit
        value, seconds = timed(lambda: compute(lm))
        self._weights.put(k, value, seconds)
        return value

    def cache_info(self) -> dict[str, int]:
        """Sizes of the caches (for monitoring and the soak test)."""
        with self._lock:
            passes = self._forward.values()
            return {"models": len(self._models), "forward": len(passes),
                    "forward_bytes": self._forward.nbytes,
                    "per_prompt": sum(len(c.derived) for c in passes),
                    "weights": len(self._weights),
                    "weights_bytes": self._weights.nbytes}

    def memory_bound(self) -> int:
        """Bytes the caches may hold at most: forward passes with their per-prompt results,
        weight analyses, and the loaded models' parameters (the largest ``max_models``)."""
        with self._lock:
            models = sorted((_model_bytes(lm) for lm in self._models.values()), reverse=True)
        return (self.max_forward_bytes + self.max_weights_bytes
                + sum(models[: self.max_models]))


# ----------------------------------------------------------------- the process's registry
_CURRENT: Optional[Registry] = None
_CURRENT_LOCK = threading.Lock()


def current() -> Registry:
    """The registry installed for this process (a default one over ``weights/`` at first use)."""
    global _CURRENT
    with _CURRENT_LOCK:
        if _CURRENT is None:
            _CURRENT = Registry()
        return _CURRENT


def install(reg: Registry) -> Registry:
    """Make ``reg`` the registry page callbacks and background jobs of this process use."""
    global _CURRENT
    with _CURRENT_LOCK:
        _CURRENT = reg
    return reg
