"""The Hugging Face cache: models listed where they lie (snapshots resolved through refs, files
linked into blobs), supported architectures only; hub ids found there first, and never
downloaded when HF_HUB_OFFLINE is set. The tests build the cache layout themselves."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import build  # noqa: E402

from attention_lens import cli  # noqa: E402
from attention_lens.server.config import ServerConfig  # noqa: E402
from attention_lens.model.hub import cached_models, hf_cache_dir, resolve  # noqa: E402
from attention_lens.model.checkpoint import CheckpointError  # noqa: E402
from attention_lens.registry import Registry  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def to_cache(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT,
             ref: bool = True) -> Path:
    """Lay ``folder`` out as the hub library does: blobs by hash, snapshot links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, tiny_tokenizer, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    for family, repo_id in (("llama-gqa", "test-org/tiny-llama"),
                            ("gpt2", "test-org/tiny-gpt2")):
        src = tmp_path / "src" / family
        build(family, src, tiny_tokenizer, max_shard_size="20KB") if family == "gpt2" \
            else build(family, src, tiny_tokenizer)
        to_cache(src, cache, repo_id)
    # an architecture we do not convert: never listed
    other = tmp_path / "src" / "bert"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                   "model_type": "bert"}))
    to_cache(other, cache, "test-org/a-bert")
    # no refs/main: the newest snapshot is used
    src = tmp_path / "src" / "qwen2"
    build("qwen2", src, tiny_tokenizer)
    to_cache(src, cache, "test-org/tiny-qwen", commit=OLD, ref=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert hf_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache_dir() == tmp_path / "b" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert hf_cache_dir() == tmp_path / "c" / "huggingface" / "hub"


def test_cached_models_listed_without_copying(hub, tmp_path):
    found = dict(cached_models())
    assert set(found) == {"test-org/tiny-llama", "test-org/tiny-gpt2", "test-org/a-bert",
                          "test-org/tiny-qwen"}
    reg = Registry([], hf_cache=True)
    names = reg.names()
    assert {"test-org/tiny-llama", "test-org/tiny-gpt2", "test-org/tiny-qwen"} <= set(names)
    assert "test-org/a-bert" not in [e.name for e in reg.entries()]
    entry = {e.name: e for e in reg.entries()}["test-org/tiny-llama"]
    assert entry.path == found["test-org/tiny-llama"] and entry.path.name == COMMIT
    assert entry.detail == "HF cache"
    lm = reg.get("test-org/tiny-gpt2")  # sharded: the index's shards link into blobs/
    assert lm.card["source"] == "Hugging Face cache"
    assert lm.card["repo"] == "test-org/tiny-gpt2" and lm.card["revision"] == COMMIT
    fp = reg.forward("Harry Potter", "test-org/tiny-llama")
    assert fp.logits.shape[-1] == reg.get("test-org/tiny-llama").cfg.d_vocab
    # nothing was copied: the cache is unchanged and no folder appeared elsewhere
    assert not (tmp_path / "models").exists()
    assert Registry([], hf_cache=False).names() == []


def test_same_logits_as_the_folder(hub, tmp_path, tiny_tokenizer):
    from attention_lens.model.hf import load_hf_folder

    reg = Registry([], hf_cache=True)
    a = reg.get("test-org/tiny-qwen")
    b = load_hf_folder(tmp_path / "src" / "qwen2")
    ids = torch.tensor([tiny_tokenizer.encode("Harry Potter went home")])
    with torch.no_grad():
        assert torch.equal(a.model(ids), b.model(ids))


def test_hub_id_found_in_cache_first(hub):
    assert resolve("test-org/tiny-llama").name == COMMIT
    reg = Registry([], default="test-org/tiny-llama")  # --model ORG/NAME, cache listing off
    assert reg.default == "test-org/tiny-llama" and reg.names() == ["test-org/tiny-llama"]


def test_hub_id_not_downloaded_offline(hub, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):  # pragma: no cover - reaching it fails the test
        raise AssertionError("downloaded although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve("test-org/absent", allow_download=True)
    reg = Registry([], default="test-org/absent")
    entry = {e.name: e for e in reg.entries()}["test-org/absent"]
    assert not entry.available and "HF_HUB_OFFLINE" in entry.error
    assert str(hub) not in entry.error  # no server paths in reasons every user sees
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "add", "hf:test-org/absent"])
    assert done.value.code == 1


def test_hub_download_when_allowed(hub, monkeypatch, tmp_path, tiny_tokenizer):
    """Online and not offline: huggingface_hub's snapshot_download is asked for the files."""
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, allow_patterns=None, cache_dir=None):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        src = tmp_path / "src" / "dl"
        build("llama-gqa", src, tiny_tokenizer)
        return str(to_cache(src, hub, repo_id))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "add", "hf:test-org/fresh"])
    assert done.value.code == 0
    assert asked["repo_id"] == "test-org/fresh" and "config.json" in asked["patterns"]
    assert "test-org/fresh" in Registry([], hf_cache=True).names()


def test_hf_cache_flag(hub, monkeypatch):
    from attention_lens.server import build_registry

    assert ServerConfig().hf_cache is None
    assert "test-org/tiny-llama" not in build_registry(ServerConfig()).names()  # gunicorn
    assert "test-org/tiny-llama" in build_registry(ServerConfig(hf_cache=True)).names()
    args = cli.parse(["--no-hf-cache"])
    assert cli.config_from_args(args).hf_cache is False
    monkeypatch.setenv("ATTENTION_LENS_HF_CACHE", "1")
    assert ServerConfig.from_env().hf_cache is True
