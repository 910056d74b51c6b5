"""The Hugging Face cache and hub ids.

Models already in the user's Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) are used where they lie: each ``models--ORG--NAME`` folder's
``refs/main`` names the snapshot, whose files link into ``blobs/``. Nothing is copied. A hub
id (``openai-community/gpt2``) is looked up there first and downloaded with
``huggingface_hub`` only when asked, when the machine is online and ``HF_HUB_OFFLINE`` is unset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError

#: A hub id: ORG/NAME (letters, digits, '-', '_', '.'), neither part starting with '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
#: Files a model folder needs (weights, config, tokenizer): nothing else is downloaded.
DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                     "special_tokens_map.json", "generation_config.json"]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache this user's ``transformers`` would use."""
    env = os.environ.get("HF_HUB_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME", "").strip()
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def is_hub_id(text: str) -> bool:
    """True for ``ORG/NAME`` (not a path that exists, not '..')."""
    return bool(HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


def repo_folder(repo_id: str, cache: Optional[Path] = None) -> Path:
    """``models--ORG--NAME`` in the cache."""
    return (cache or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def snapshot(repo: Path, revision: str = "main") -> Optional[Path]:
    """The snapshot folder ``refs/<revision>`` names (else the newest snapshot), or None."""
    snaps = repo / "snapshots"
    ref = repo / "refs" / revision
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            commit = ""
        if _COMMIT.match(commit) and (snaps / commit).is_dir():
            return snaps / commit
    if not snaps.is_dir():
        return None
    found = [p for p in snaps.iterdir() if p.is_dir() and _COMMIT.match(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def cached_models(cache: Optional[Path] = None) -> list[tuple[str, Path]]:
    """(hub id, snapshot folder) of every model in the cache with a ``config.json``."""
    root = cache or hf_cache_dir()
    out: list[tuple[str, Path]] = []
    if not root.is_dir():
        return out
    try:
        repos = sorted(root.iterdir())
    except OSError:
        return out
    for repo in repos:
        if not repo.name.startswith("models--") or not repo.is_dir():
            continue
        parts = repo.name[len("models--"):].split("--")
        if len(parts) != 2:
            continue  # ids without an organisation (old "gpt2") or odd names
        repo_id = "/".join(parts)
        snap = snapshot(repo)
        if snap is not None and (snap / "config.json").is_file():
            out.append((repo_id, snap))
    return out


def find_cached(repo_id: str, cache: Optional[Path] = None) -> Optional[Path]:
    """The snapshot of ``repo_id`` in the cache, or None."""
    snap = snapshot(repo_folder(repo_id, cache))
    return snap if snap is not None and (snap / "config.json").is_file() else None


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(repo_id: str, cache: Optional[Path] = None) -> Path:
    """Download the model files of ``repo_id`` into the Hugging Face cache (with a progress
    bar), unless ``HF_HUB_OFFLINE`` is set; returns the snapshot folder."""
    if not HUB_ID.match(repo_id):
        raise CheckpointError(repo_id, "not a Hugging Face model id (ORG/NAME)")
    if offline():
        raise CheckpointError(repo_id, "not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                                       "set: nothing is downloaded")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(repo_id, "downloading needs the huggingface_hub package") \
            from None
    try:
        path = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS,
                                 cache_dir=str(cache) if cache else None)
    except Exception as exc:  # noqa: BLE001 - network, authentication, missing repo
        raise CheckpointError(repo_id, f"could not be downloaded ({type(exc).__name__}: "
                                       f"{str(exc)[:200]})") from None
    return Path(path)


def resolve(repo_id: str, allow_download: bool = False,
            cache: Optional[Path] = None) -> Path:
    """The local folder of hub id ``repo_id``: the cache first, then (if allowed) the hub."""
    found = find_cached(repo_id, cache)
    if found is not None:
        return found
    if not allow_download:
        why = ", and HF_HUB_OFFLINE is set" if offline() else ""
        raise CheckpointError(repo_id, f"not in the Hugging Face cache{why}: add it with "
                              f"'attention-lens models add hf:{repo_id}'")
    return download(repo_id, cache)
