"""The model registry: discovers model folders, loads them lazily, caches forward passes.

One registry per process. It is thread-safe: concurrent requests share one model
instance and one bounded LRU cache of forward passes keyed by (model, token ids).
Weight-only analyses are cached per model (they never change).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from .analysis.errors import AnalysisError
from .analysis.forward import ForwardPass, run_forward, tokenize
from .model.checkpoint import CheckpointError, LoadedModel, load_model

T = TypeVar("T")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = PACKAGE_ROOT / "weights"
DEFAULT_MODEL = "attn-only-2l"


@dataclass(frozen=True)
class ModelEntry:
    """A model folder found on disk: loadable or not, with the reason."""

    name: str
    path: Path
    size_bytes: int
    kind: str  # "attention-lens" or "huggingface"
    error: Optional[str] = None

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
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_our_config(data: Any) -> bool:
    return isinstance(data, dict) and "n_layers" in data and "d_head" in data


def load_folder(folder: Path, device: str = "cpu", name: Optional[str] = None) -> LoadedModel:
    """Load a model folder of any supported format."""
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

    Returns the reason the folder cannot be loaded, or None; reading the weights themselves
    is left to the first use.
    """
    from safetensors import SafetensorError, safe_open

    from .model.checkpoint import TOKENIZER, WEIGHTS, read_config

    for name in (WEIGHTS, TOKENIZER):
        if not (folder / name).is_file():
            return f"{folder / name}: missing file"
    try:
        read_config(folder)
        with safe_open(str(folder / WEIGHTS), "pt") as fh:
            fh.keys()
    except CheckpointError as exc:
        return str(exc)
    except (SafetensorError, OSError, ValueError) as exc:
        return f"{folder / WEIGHTS}: corrupt or truncated safetensors file ({exc})"
    return None


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Registry:
    """Owns loaded models (at most ``max_models``) and the forward-pass LRU cache."""

    def __init__(
        self,
        models_dirs: Iterable[Path | str] = (DEFAULT_WEIGHTS,),
        default: str = DEFAULT_MODEL,
        max_models: int = 2,
        max_forward: int = 64,
        max_weights: int = 256,
        max_forward_bytes: int = 2 * 2**30,
        max_tokens: Optional[int] = None,
        device: str = "cpu",
    ) -> None:
        self.models_dirs = [Path(d) for d in models_dirs]
        self.max_models, self.max_forward, self.max_weights = max_models, max_forward, max_weights
        self.max_tokens, self.device = max_tokens, device
        self.max_forward_bytes = max_forward_bytes
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._forward: OrderedDict[tuple[str, tuple[int, ...]], ForwardPass] = OrderedDict()
        self._weights: OrderedDict[tuple[str, Any], Any] = OrderedDict()
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()
        self.default = default if default in self._entries else next(iter(self._entries), default)

    # ------------------------------------------------------------- discovery
    def refresh(self) -> list[ModelEntry]:
        """Rescan the model folders."""
        entries: dict[str, ModelEntry] = {}
        for root in self.models_dirs:
            if not root.is_dir():
                continue
            candidates = [root] if (root / "config.json").is_file() else sorted(root.iterdir())
            for folder in candidates:
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                kind = folder_kind(folder)
                if kind is None:
                    continue
                if kind == "attention-lens":
                    error = quick_check(folder)
                else:  # cheap checks only (config, architecture, files): no weights read
                    from .model.hf import inspect_hf_folder

                    error = inspect_hf_folder(folder)
                entries.setdefault(folder.name, ModelEntry(folder.name, folder, _size(folder),
                                                           kind, error))
        with self._lock:
            self._entries = entries
        return list(entries.values())

    def mark_unavailable(self, name: str, reason: str) -> None:
        """Record that model ``name`` cannot be loaded (shown in the picker and the API)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries[name] = ModelEntry(entry.name, entry.path, entry.size_bytes,
                                                 entry.kind, reason)

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
                lm = load_folder(entry.path, device=self.device, name=name)
            except CheckpointError as exc:
                self.mark_unavailable(name, str(exc))
                raise AnalysisError(f"model {name!r} is unavailable: {exc}") from None
            with self._lock:
                self._models[name] = lm
                while len(self._models) > self.max_models:
                    evicted, _ = self._models.popitem(last=False)
                    self._forward = OrderedDict((k, v) for k, v in self._forward.items()
                                                if k[0] != evicted)
                    self._weights = OrderedDict((k, v) for k, v in self._weights.items()
                                                if k[0] != evicted)
            return lm

    def add(self, lm: LoadedModel) -> None:
        """Register an already-loaded model (tests, notebooks)."""
        with self._lock:
            self._entries[lm.name] = ModelEntry(lm.name, lm.path or Path("."), 0, "memory")
            self._models[lm.name] = lm

    # --------------------------------------------------------------- caching
    def forward(self, text: str, model: Optional[str] = None) -> ForwardPass:
        """The cached forward pass of ``text`` through ``model``."""
        lm = self.get(model)
        tokenized = tokenize(lm, text, self.max_tokens)
        key = (lm.name, tuple(tokenized[0]))
        with self._lock:
            hit = self._forward.get(key)
            if hit is not None:
                self._forward.move_to_end(key)
                return hit
        fp = run_forward(lm, text, self.max_tokens, tokenized=tokenized)
        with self._lock:
            self._forward[key] = fp
            self._forward.move_to_end(key)
            # bounded in count and in bytes (a long prompt through a big model holds every
            # layer's attention patterns); the newest pass always stays
            total = sum(v.nbytes for v in self._forward.values())
            while len(self._forward) > 1 and (len(self._forward) > self.max_forward
                                              or total > self.max_forward_bytes):
                _, old = self._forward.popitem(last=False)
                total -= old.nbytes
        return fp

    def weights(self, model: Optional[str], key: Any, compute: Callable[[LoadedModel], T]) -> T:
        """A weight-only analysis of ``model``, computed once and cached under ``key``."""
        lm = self.get(model)
        k = (lm.name, key)
        with self._lock:
            if k in self._weights:
                self._weights.move_to_end(k)
                return self._weights[k]
        value = compute(lm)
        with self._lock:
            self._weights[k] = value
            while len(self._weights) > self.max_weights:
                self._weights.popitem(last=False)
        return value

    def cache_info(self) -> dict[str, int]:
        """Sizes of the caches (for monitoring and the soak test)."""
        with self._lock:
            return {"models": len(self._models), "forward": len(self._forward),
                    "forward_bytes": sum(v.nbytes for v in self._forward.values()),
                    "weights": len(self._weights)}


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
