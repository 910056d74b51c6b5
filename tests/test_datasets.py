"""Evaluation datasets: the shipped text's provenance, uploads and folders, windows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import make_tiny

from attention_lens.analysis import datasets as D
from attention_lens.analysis.errors import AnalysisError


def test_shipped_text_is_the_cards_validation_split(model_1l, model_2l):
    ds = D.load_dataset("validation")
    for lm in (model_1l, model_2l):
        assert ds.sha256 == lm.card["data"]["val_sha256"]
    meta = json.loads((D.DATA_DIR / "validation.json").read_text())
    assert {s["licence"] for s in meta["sources"]} >= {"CC BY-SA 4.0"}
    assert all(s["attribution"] and s["package"] for s in meta["sources"])
    assert sum(s["validation_documents"] for s in meta["sources"]) == len(ds.documents) == 183
    size = (D.DATA_DIR / meta["file"]).stat().st_size
    assert size < 300_000  # a few hundred KB at most
    assert gzip.decompress((D.DATA_DIR / meta["file"]).read_bytes()).decode() \
        == D.DOC_SEPARATOR.join(ds.documents)


def test_windows_stride_and_selection(model_2l):
    ds = D.load_dataset("validation")
    stream = D.token_stream(model_2l, ds)
    eot = D.end_of_text_id(model_2l)
    assert eot is not None and int((stream == eot).sum()) == len(ds.documents)
    w = D.dataset_windows(model_2l, ds, length=128, stride=64, max_windows=50)
    assert w.n_available == (stream.size - 128) // 64 + 1 and w.n_windows == 50
    assert np.all(w.starts % 64 == 0) and np.all(np.diff(w.starts) > 0)
    assert w.starts[0] == 0 and w.starts[-1] == (w.n_available - 1) * 64  # evenly spread
    for s, row in zip(w.starts, w.tokens):
        np.testing.assert_array_equal(row, stream[s:s + 128])
    assert "every 64 tokens" in w.describe() and "50 evenly spaced" in w.describe()
    small = D.dataset_windows(model_2l, D.Dataset("s", ("word " * 300,), "x"), length=16)
    assert small.stride == 16 and small.n_windows == small.n_available


def test_window_bounds(model_2l, tiny_tokenizer):
    ds = D.Dataset("s", ("a few words",), "x")
    with pytest.raises(AnalysisError, match="too short"):
        D.dataset_windows(model_2l, ds, length=64)
    with pytest.raises(AnalysisError, match="context"):
        D.dataset_windows(model_2l, ds, length=129)
    with pytest.raises(AnalysisError, match="stride"):
        D.dataset_windows(model_2l, ds, length=8, stride=0)
    with pytest.raises(AnalysisError, match="number of windows"):
        D.dataset_windows(model_2l, ds, length=8, max_windows=D.MAX_WINDOWS + 1)
    lm = make_tiny(tiny_tokenizer, extra={"prepend_bos": True, "bos_token_id": 0})
    w = D.dataset_windows(lm, D.Dataset("s", ("the cat sat on the mat " * 20,), "x"), length=16)
    assert np.all(w.tokens[:, 0] == 0) and w.bos == 0 and w.tokens.shape[1] == 16
    assert "BOS first" in w.describe()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"  \n\n\t ", "empty"),
    (b"text\x00with a NUL", "binary"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "binary"),
    (b"\x1f\x8b\x08\x00rest", "binary"),
    ("caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
    (b"\x01\x02\x03\x04\x05 mostly control", "binary"),
])
def test_upload_refusals(data, message):
    with pytest.raises(AnalysisError, match=message):
        D.parse_upload(data, "f.txt")


def test_upload_size_bound():
    big = b"word " * (D.MAX_UPLOAD_BYTES // 5 + 10)
    with pytest.raises(AnalysisError, match="at most 512 KiB"):
        D.parse_upload(big, "big.txt")
    assert D.parse_upload(big[: D.MAX_UPLOAD_BYTES], "ok.txt").n_chars > 0


def test_upload_text_and_jsonl():
    ds = D.parse_upload("\ufeffFirst doc.\n\nSecond doc.\n\n\n".encode(), "a.txt")
    assert ds.documents == ("First doc.", "Second doc.")
    js = D.parse_upload(b'{"text": "one"}\n\n"two"\n{"text": "three", "id": 3}\n', "b.jsonl")
    assert js.documents == ("one", "two", "three") and js.title == "uploaded file b.jsonl"
    assert js.name == "upload:" + js.sha256  # its full hash, the store's key
    assert D.load_dataset(D.remember_upload(js)) is js
    for i in range(D.MAX_KEPT_UPLOADS):
        D.remember_upload(D.parse_upload(f"text number {i}".encode(), "n.txt"))
    with pytest.raises(AnalysisError, match="upload it again"):
        D.load_dataset(js.name)
    sniffed = D.parse_upload(b'{"text": "one"}\n', "noext")
    assert sniffed.documents == ("one",)
    with pytest.raises(AnalysisError, match="line 2: not valid JSON"):
        D.parse_upload(b'{"text": "one"}\n{oops\n', "c.jsonl")
    with pytest.raises(AnalysisError, match='line 1: each line must be'):
        D.parse_upload(b'{"body": "one"}\n', "d.jsonl")
    assert D.parse_upload(b"same", "x.txt").sha256 == D.parse_upload(b"same", "y.txt").sha256


def test_datasets_folder(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    (tmp_path / "b.jsonl").write_text('{"text": "delta"}\n')
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe bad")
    assert D.dataset_names([tmp_path]) == ["validation", "a.txt", "b.jsonl", "d.txt"]
    monkeypatch.setenv(D.DIRS_ENV, str(tmp_path))
    assert D.dataset_names() == ["validation", "a.txt", "b.jsonl", "d.txt"]
    assert D.load_dataset("b.jsonl").documents == ("delta",)
    with pytest.raises(AnalysisError, match="not UTF-8"):
        D.load_dataset("d.txt")
    for bad in ("../a.txt", "c.bin", "nope.txt"):
        with pytest.raises(AnalysisError, match="unknown dataset"):
            D.load_dataset(bad)
