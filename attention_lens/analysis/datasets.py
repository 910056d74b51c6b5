"""Evaluation datasets: the shipped validation text, uploads, folders, and their windows.

A dataset is a list of documents. Its token stream is every document's tokens followed by
the end-of-text token (when the tokenizer has one), as in training. Windows are cut from
that stream: ``length`` tokens (at most the model's context) starting every ``stride``
tokens; when the stream holds more than ``max_windows`` of them, that many evenly spaced
ones are kept. Models that always see BOS first get it at the start of every window (the
window then holds ``length - 1`` stream tokens).

The shipped set (``validation``) is the held-out split of the corpus the shipped models
were trained on (:mod:`attention_lens.training.corpus`); its provenance and licences are in
``attention_lens/data/eval/validation.json``. Uploads are plain text (documents separated
by a blank line) or JSONL (one ``{"text": ...}`` object or JSON string per line), bounded
in size; anything else is refused with the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..cache import ByteLRU
from ..model.checkpoint import LoadedModel
from ..model.jsonfile import JsonFileError, loads_bounded
from .errors import AnalysisError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "eval"
SHIPPED = "validation"
DOC_SEPARATOR = "\n\n"
#: Largest uploaded file accepted (bytes; its base64 form must fit the server's 1 MiB body).
MAX_UPLOAD_BYTES = 512 * 2**10
#: Uploaded datasets this process keeps (the oldest is forgotten first).
MAX_KEPT_UPLOADS = 8
#: Deepest nesting of lists and objects in a JSONL line (a document needs 1).
MAX_JSON_DEPTH = 16
#: Largest file read from a datasets folder (bytes).
MAX_FILE_BYTES = 16 * 2**20
#: Most windows one run may score.
MAX_WINDOWS = 2000
#: Default window length (tokens; cut to the model's context) and number of windows.
DEFAULT_LENGTH = 128
DEFAULT_WINDOWS = 400
#: Folders of ``*.txt`` / ``*.jsonl`` datasets (":"-separated), besides the shipped one.
DIRS_ENV = "ATTENTION_LENS_DATASETS_DIRS"
SUFFIXES = (".txt", ".jsonl")
END_OF_TEXT = ("<|endoftext|>", "</s>", "<eos>")
#: File headers of formats that are not text (gzip, zip, ELF, PDF, PNG).
BINARY_MAGIC = (b"\x1f\x8b", b"PK\x03\x04", b"\x7fELF", b"%PDF-", b"\x89PNG")


@dataclass(frozen=True)
class Dataset:
    """Documents to score heads on, with where they came from.

    Attributes:
        name: the dataset's name ("validation", a file name, or "upload:<file>").
        documents: the documents (non-empty strings).
        sha256: sha256 of the documents joined by a blank line (for the shipped set, the
            same as the corpus' ``val_sha256`` in the model cards).
        title: a human-readable title.
        provenance: source, licence and counts (shipped set: the recorded sources).
    """

    name: str
    documents: tuple[str, ...]
    sha256: str
    title: str = ""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def n_chars(self) -> int:
        """Characters over all documents."""
        return sum(len(d) for d in self.documents)


def documents_sha256(documents: Sequence[str]) -> str:
    """sha256 of the documents joined by a blank line (a dataset's identity)."""
    return hashlib.sha256(DOC_SEPARATOR.join(documents).encode("utf-8")).hexdigest()


def _dataset(name: str, documents: Sequence[str], title: str = "",
             provenance: Optional[dict] = None) -> Dataset:
    docs = tuple(d for d in documents if d.strip())
    if not docs:
        raise AnalysisError(f"{name}: no text (every document is empty)")
    digest = documents_sha256(docs)
    return Dataset(name=name, documents=docs, sha256=digest, title=title or name,
                   provenance=dict(provenance or {}))


# ------------------------------------------------------------------------ parsing
def decode_text(data: bytes, what: str = "the file") -> str:
    """UTF-8 text of ``data``, or an :class:`AnalysisError` saying why it is not text."""
    if not data or not data.strip():
        raise AnalysisError(f"{what} is empty: give some text (plain text or JSONL)")
    if b"\x00" in data[:65536] or data.startswith(BINARY_MAGIC):
        raise AnalysisError(f"{what} looks binary (a NUL byte or an archive/PDF header): "
                            "give a plain-text or JSONL file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnalysisError(f"{what} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at "
                            f"offset {exc.start}); save it as UTF-8 and try again") from None
    text = text.lstrip("\ufeff")
    control = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if control > 0.01 * min(len(text), 65536):
        raise AnalysisError(f"{what} looks binary ({control} control characters): give a "
                            "plain-text or JSONL file")
    return text


def parse_jsonl(text: str, what: str = "the file") -> list[str]:
    """Documents of a JSONL text: each line a JSON string or an object with ``"text"``."""
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = loads_bounded(line, MAX_JSON_DEPTH)
        except JsonFileError as exc:
            raise AnalysisError(f"{what}, line {n}: not valid JSON ({exc})") from None
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise AnalysisError(f"{what}, line {n}: each line must be a JSON string or an "
                                "object with a \"text\" string")
        docs.append(item)
    return docs


def is_jsonl(name: str, text: str) -> bool:
    """A ``.jsonl`` name, or text whose first non-blank line is a JSON object or string."""
    if name.lower().endswith((".jsonl", ".json")):
        return True
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not (first.startswith("{") or first.startswith('"')):
        return False
    try:
        return isinstance(loads_bounded(first, MAX_JSON_DEPTH), (dict, str))
    except JsonFileError as exc:
        return "nested" in str(exc)  # meant as JSON: parse_jsonl says what is wrong


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def parse_upload(data: bytes, filename: str = "upload", max_bytes: int = MAX_UPLOAD_BYTES
                 ) -> Dataset:
    """A dataset from an uploaded file's bytes (plain text or JSONL), size-bounded."""
    filename = Path(str(filename or "upload")).name[:120] or "upload"
    what = f"the file {filename!r}"
    if not isinstance(data, (bytes, bytearray)):
        raise AnalysisError(f"{what} could not be read")
    if len(data) > max_bytes:
        raise AnalysisError(f"{what} is {_size(len(data))}; at most {_size(max_bytes)} can be "
                            "used (cut it, or put it in a datasets folder on the server)")
    text = decode_text(bytes(data), what)
    docs = parse_jsonl(text, what) if is_jsonl(filename, text) else text.split(DOC_SEPARATOR)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise AnalysisError(f"{what} holds no text")
    ds = _dataset("upload", docs, title=f"uploaded file {filename}",
                  provenance={"source": "uploaded file", "file": filename, "bytes": len(data)})
    return Dataset(name=f"upload:{ds.sha256}", documents=ds.documents, sha256=ds.sha256,
                   title=ds.title, provenance=ds.provenance)


def is_upload_digest(text: str) -> bool:
    """Whether ``text`` is what follows ``upload:`` in an uploaded dataset's name (its
    documents' sha256, 64 lower-case hex digits)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


#: Uploads this process keeps (besides the shared store), each at most ``MAX_UPLOAD_BYTES``.
_UPLOADS = ByteLRU("uploaded datasets", lambda: MAX_KEPT_UPLOADS * 32 * MAX_UPLOAD_BYTES,
                   lambda: MAX_KEPT_UPLOADS)


def remember_upload(ds: Dataset) -> str:
    """Keep an uploaded dataset in this process (bounded) and return the name to load it by
    (the web app also puts it in the deployment's shared store, where every worker finds
    it: :func:`attention_lens.weight_analyses.keep_upload`)."""
    _UPLOADS.put(ds.name, ds)
    return ds.name


# ----------------------------------------------------------------------- loading
def dataset_dirs(extra: Iterable[Path | str] = ()) -> list[Path]:
    """Folders searched for datasets: ``extra`` then ``$ATTENTION_LENS_DATASETS_DIRS``."""
    env = [p for p in os.environ.get(DIRS_ENV, "").split(":") if p.strip()]
    return [Path(p) for p in [*extra, *env]]


def dataset_names(dirs: Iterable[Path | str] = ()) -> list[str]:
    """The shipped dataset, then every ``*.txt`` / ``*.jsonl`` file in the folders."""
    names = [SHIPPED]
    for folder in dataset_dirs(dirs):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.suffix.lower() in SUFFIXES and p.name not in names:
                    names.append(p.name)
    return names


@lru_cache(maxsize=1)
def _shipped() -> Dataset:
    meta = json.loads((DATA_DIR / "validation.json").read_text(encoding="utf-8"))
    raw = gzip.decompress((DATA_DIR / meta["file"]).read_bytes())
    if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise AnalysisError("the shipped evaluation text does not match its recorded sha256")
    text = raw.decode("utf-8")
    ds = _dataset(SHIPPED, text.split(DOC_SEPARATOR), title=meta["title"], provenance=meta)
    return ds


def load_dataset(name: str, dirs: Iterable[Path | str] = ()) -> Dataset:
    """The dataset called ``name``: the shipped one or a file in a datasets folder."""
    if name == SHIPPED:
        return _shipped()
    if isinstance(name, str) and name.startswith("upload:"):
        ds = _UPLOADS.get(name)
        if ds is None:
            raise AnalysisError("this server no longer holds that uploaded file (it keeps "
                                "recent uploads for a week): upload it again")
        return ds
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise AnalysisError(f"unknown dataset {str(name)[:80]!r}")
    for folder in dataset_dirs(dirs):
        path = folder / name
        if path.is_file() and path.suffix.lower() in SUFFIXES:
            data = path.read_bytes() if path.stat().st_size <= MAX_FILE_BYTES else None
            if data is None:
                raise AnalysisError(f"dataset {name!r} is larger than {_size(MAX_FILE_BYTES)}")
            ds = parse_upload(data, name, max_bytes=MAX_FILE_BYTES)
            return Dataset(name=name, documents=ds.documents, sha256=ds.sha256, title=name,
                           provenance={"source": "datasets folder", "file": str(path)})
    raise AnalysisError(f"unknown dataset {name!r}; available: "
                        f"{', '.join(dataset_names(dirs))}")


# ----------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Windows:
    """Token windows of a dataset for one tokenizer and context.

    Attributes:
        dataset: the dataset's name.
        sha256: the dataset's sha256.
        tokens: [n_windows, length] int64 token ids.
        starts: [n_windows] offset of each window in the token stream.
        length: tokens per window (BOS included when the model needs one).
        stride: tokens between the starts of consecutive candidate windows.
        n_stream_tokens: tokens in the dataset's stream.
        n_available: windows the stream holds at this stride (before evenly spaced
            selection down to ``max_windows``).
        bos: the BOS id put first in each window, or None.
    """

    dataset: str
    sha256: str
    tokens: np.ndarray
    starts: np.ndarray
    length: int
    stride: int
    n_stream_tokens: int
    n_available: int
    bos: Optional[int] = None

    @property
    def n_windows(self) -> int:
        """Number of windows."""
        return int(self.tokens.shape[0])

    def describe(self) -> str:
        """How the windows were cut, in one sentence."""
        sel = (f"{self.n_windows} evenly spaced of the {self.n_available}"
               if self.n_windows < self.n_available else f"all {self.n_windows}")
        bos = ", BOS first" if self.bos is not None else ""
        return (f"{sel} windows of {self.length} tokens{bos}, one starting every "
                f"{self.stride} tokens of the {self.n_stream_tokens:,}-token stream of "
                f"{self.dataset!r}")


def end_of_text_id(lm: LoadedModel) -> Optional[int]:
    """The id of the end-of-text token the documents are joined by, if the tokenizer has one."""
    hf = getattr(lm.tokenizer, "hf", None)
    if hf is None:
        return None
    for tok in END_OF_TEXT:
        i = hf.token_to_id(tok)
        if i is not None and i < lm.cfg.d_vocab:
            return int(i)
    return None


#: Token streams kept (a tokenized dataset: 8 bytes a token).
STREAM_CACHE_BYTES = 64 * 2 ** 20
_STREAMS = ByteLRU("token streams", lambda: STREAM_CACHE_BYTES, 8,
                   sizeof=lambda hit: hit[1].nbytes)


def token_stream(lm: LoadedModel, dataset: Dataset) -> np.ndarray:
    """Every document's tokens, each followed by end-of-text when there is one (cached)."""
    key = (id(lm.tokenizer), lm.cfg.d_vocab, dataset.sha256, hash(dataset.documents))
    hit = _STREAMS.get(key)
    if hit is not None and hit[0] is lm.tokenizer:
        return hit[1]
    stream = _token_stream(lm, dataset)
    stream.setflags(write=False)
    _STREAMS.put(key, (lm.tokenizer, stream))  # the tokenizer held: its id stays unique
    return stream


def _token_stream(lm: LoadedModel, dataset: Dataset) -> np.ndarray:
    eot = end_of_text_id(lm)
    hf = getattr(lm.tokenizer, "hf", None)
    if hf is not None:
        encoded = [e.ids for e in hf.encode_batch(list(dataset.documents),
                                                  add_special_tokens=False)]
    else:
        encoded = [lm.tokenizer.encode(d) for d in dataset.documents]
    ids: list[int] = []
    for doc in encoded:
        ids.extend(doc)
        if eot is not None:
            ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def check_window_args(lm: LoadedModel, length: Optional[int], stride: Optional[int],
                      max_windows: int) -> tuple[int, int]:
    """Validated (length, stride): length defaults to min(context, 128), stride to length."""
    n_ctx = lm.cfg.n_ctx
    length = min(n_ctx, DEFAULT_LENGTH) if length is None else length
    if not isinstance(length, (int, np.integer)) or not 4 <= length <= n_ctx:
        raise AnalysisError(f"window length must be between 4 and the model's context "
                            f"({n_ctx})")
    stride = int(length) if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or not 1 <= stride <= 100_000:
        raise AnalysisError("stride must be a whole number of tokens between 1 and 100000")
    if not isinstance(max_windows, (int, np.integer)) or not 1 <= max_windows <= MAX_WINDOWS:
        raise AnalysisError(f"the number of windows must be between 1 and {MAX_WINDOWS}")
    return int(length), int(stride)


def dataset_windows(lm: LoadedModel, dataset: Dataset, length: Optional[int] = None,
                    stride: Optional[int] = None, max_windows: int = DEFAULT_WINDOWS
                    ) -> Windows:
    """Windows of ``dataset``'s token stream for ``lm`` (see the module docstring)."""
    length, stride = check_window_args(lm, length, stride, max_windows)
    extra = lm.cfg.extra or {}
    bos = int(extra["bos_token_id"]) if extra.get("prepend_bos") else None
    body = length - (bos is not None)
    stream = token_stream(lm, dataset)
    if stream.size and (stream.min() < 0 or stream.max() >= lm.cfg.d_vocab):
        raise AnalysisError(f"the tokenizer produced ids outside the model's vocabulary "
                            f"({lm.cfg.d_vocab})")
    if stream.size < body:
        raise AnalysisError(f"{dataset.name} has {stream.size} tokens: too short for one "
                            f"window of {length} tokens (give more text or a shorter window)")
    n_avail = (stream.size - body) // stride + 1
    if n_avail > max_windows:
        pick = np.unique(np.round(np.linspace(0, n_avail - 1, max_windows)).astype(np.int64))
    else:
        pick = np.arange(n_avail, dtype=np.int64)
    starts = pick * stride
    tokens = np.stack([stream[s:s + body] for s in starts])
    if bos is not None:
        tokens = np.concatenate([np.full((len(tokens), 1), bos, dtype=np.int64), tokens], 1)
    return Windows(dataset=dataset.name, sha256=dataset.sha256, tokens=tokens.astype(np.int64),
                   starts=starts, length=length, stride=stride, n_stream_tokens=int(stream.size),
                   n_available=int(n_avail), bos=bos)


# --------------------------------------------------------------- the dataset scope's input
#: The request fields of an analysis of scope dataset (:mod:`.declare`): a dataset by name
#: (shipped, a datasets folder's, or an upload's ``upload:<sha256>``) or its documents as
#: ``text``, and how it is cut into windows.
DATASET_FIELDS = frozenset({"dataset", "text", "windows", "length", "stride"})


@dataclass(frozen=True)
class DatasetInput:
    """What an analysis of scope dataset reads: a dataset by its identity (its name and the
    sha256 of its documents, never their text) and the windows cut from it. ``dataset``,
    the documents themselves, is kept beside it in the process that read them (not part of
    the key nor of a job's request: a job loads the dataset by its name and checks the
    hash)."""

    name: str
    sha256: str
    length: int
    stride: int
    windows: int
    dataset: Optional[Dataset] = field(default=None, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:
        """Tokens of a window (the cost is estimated per window)."""
        return self.length

    def key(self) -> tuple:
        """The part of a cache key this input gives: the content hash and the windows."""
        return ("dataset", self.sha256, self.length, self.stride, self.windows)

    def to_json(self) -> str:
        """Canonical JSON of the input (a job's request carries it: the name, not the text)."""
        return json.dumps({"name": self.name, "sha256": self.sha256, "length": self.length,
                           "stride": self.stride, "windows": self.windows}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetInput":
        """The input :meth:`to_json` wrote (without the documents)."""
        d = json.loads(text)
        return cls(d["name"], d["sha256"], d["length"], d["stride"], d["windows"])

    def cut(self, lm: LoadedModel, dataset: Optional[Dataset] = None) -> Windows:
        """The windows of the dataset (``dataset``: the documents, when this input does not
        hold them), after checking they are still the ones this input names."""
        ds = dataset if dataset is not None else self.dataset
        if ds is None:
            raise AnalysisError(f"dataset {self.name!r} is not loaded here")
        if ds.sha256 != self.sha256:
            raise AnalysisError(f"dataset {self.name!r} changed since it was chosen: choose "
                                "it again")
        return dataset_windows(lm, ds, length=self.length, stride=self.stride,
                               max_windows=self.windows)

    @classmethod
    def read(cls, body: Any, lm: LoadedModel, load: Any, keep: Any,
             default_windows: int = DEFAULT_WINDOWS) -> "DatasetInput":
        """The input of a request ``body`` (strict: a ParamError naming the field).
        ``load(name)`` finds a dataset by name; ``keep(dataset)`` keeps documents sent as
        ``text`` where every process finds them by their name."""
        from .declare import ParamError, read_int, read_text

        n = read_int(body, "windows", default_windows, 1, MAX_WINDOWS)
        length = read_int(body, "length", min(lm.cfg.n_ctx, DEFAULT_LENGTH), 4, lm.cfg.n_ctx,
                          f" (the context of {lm.name})")
        stride = read_int(body, "stride", length, 1, 100_000)
        check_window_args(lm, length, stride, n)
        if "text" in body and "dataset" in body:
            raise ParamError("give either 'dataset' (a name) or 'text' (the documents), not "
                             "both")
        if "text" in body:
            ds = parse_upload(read_text(body, "text").encode("utf-8"), "request body")
            keep(ds)
        else:
            name = body.get("dataset", SHIPPED)
            if not isinstance(name, str) or not name.strip():
                raise ParamError("'dataset' must be a dataset name")
            ds = load(name)
        return cls(ds.name, ds.sha256, length, stride, n, ds)
