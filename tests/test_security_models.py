"""Hostile model folders: nothing in a shared models directory can stop or exhaust the server."""

from __future__ import annotations

import json
import os
import resource
import shutil
import time

import pytest

from attention_lens.analysis.errors import AnalysisError
from attention_lens.registry import DEFAULT_WEIGHTS, Registry
from attention_lens.server import ServerConfig, create_server

NESTED = "[" * 100_000 + "]" * 100_000  # Python's json parser raises RecursionError on it


def copy_model(root, name: str, edit_config=None, card=None):
    dst = root / name
    shutil.copytree(DEFAULT_WEIGHTS / "attn-only-1l", dst)
    if edit_config is not None:
        path = dst / "config.json"
        if isinstance(edit_config, str):
            path.write_text(edit_config)
        else:
            cfg = json.loads(path.read_text())
            edit_config(cfg)
            path.write_text(json.dumps(cfg))
    if card is not None:
        (dst / "card.json").write_text(card)
    return dst


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture()
def hostile(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    copy_model(root, "good")
    copy_model(root, "nested-config", NESTED)
    copy_model(root, "nested-card", card='{"a": ' + NESTED + "}")
    copy_model(root, "huge-int", '{"n_layers": 1' + "0" * 5000 + "}")
    copy_model(root, "layers-20000", lambda c: c.update(n_layers=20_000))
    copy_model(root, "layers-300", lambda c: c.update(n_layers=300))
    copy_model(root, "ctx-1e12", lambda c: c.update(n_ctx=10**12))
    copy_model(root, "tok-dotdot", lambda c: c.update(tokenizer="../../../../../etc/passwd"))
    copy_model(root, "tok-absolute", lambda c: c.update(tokenizer="/etc/passwd"))
    link = copy_model(root, "tok-symlink")
    (link / "tokenizer.json").unlink()
    os.symlink("/etc/passwd", link / "tokenizer.json")
    hf = root / "hf-nested"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "x": ' + NESTED
                                    + "}")
    hf2 = root / "hf-layers"
    hf2.mkdir()
    (hf2 / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "n_layer": 20_000, "n_embd": 32, "n_head": 4,
         "n_positions": 64, "vocab_size": 300}))
    return root


EXPECTED = {
    "nested-config": "levels deep",
    "nested-card": "levels deep",
    "huge-int": "not valid JSON",
    "layers-20000": "n_layers = 20000 is larger than the 512 allowed",
    "layers-300": "the weights hold 1 layer(s) but config.json says n_layers = 300",
    "ctx-1e12": "n_ctx = 1000000000000 is larger",
    "tok-dotdot": "outside the model folder",
    "tok-absolute": "outside the model folder",
    "tok-symlink": "outside the model folder",
    "hf-nested": "levels deep",
    "hf-layers": "n_layers = 20000 is larger",
}


def test_hostile_folders_are_unavailable_with_a_reason_at_scan(hostile):
    rss0, t0 = peak_rss_mb(), time.perf_counter()
    reg = Registry([hostile], default="good")
    elapsed, grown = time.perf_counter() - t0, peak_rss_mb() - rss0
    entries = {e.name: e for e in reg.entries()}
    print(f"scan of {len(entries)} folders: {elapsed:.2f} s, peak RSS +{grown:.0f} MB")
    for name, outcome in entries.items():
        print(f"  {name}: {'available' if outcome.available else outcome.error}")
    assert entries["good"].available
    for name, words in EXPECTED.items():
        assert not entries[name].available, name
        assert words in entries[name].error, (name, entries[name].error)
        assert entries[name].error.startswith(f"{name}/") or \
            entries[name].error.startswith(f"{name}:"), entries[name].error
        assert str(hostile) not in entries[name].error and "/tmp" not in entries[name].error
        with pytest.raises(AnalysisError, match="unavailable"):
            reg.get(name)
    assert reg.get("good").cfg.n_layers == 1
    assert elapsed < 30 and grown < 300, (elapsed, grown)


def test_the_app_starts_and_lists_the_reasons_without_absolute_paths(hostile):
    app = create_server(ServerConfig(models_dirs=[hostile], model="good", cache_size=4))
    client = app.server.test_client()
    r = client.get("/api/models")
    assert r.status_code == 200
    body = r.get_json()
    assert [m["name"] for m in body["models"]] == ["good"]
    reasons = {m["name"]: m["reason"] for m in body["unavailable"]}
    assert set(EXPECTED) <= set(reasons)
    assert str(hostile) not in r.get_data(as_text=True)
    r = client.post("/api/predict", json={"text": "hello there", "model": "layers-20000"})
    assert r.status_code == 400 and "unavailable" in r.get_json()["error"]
    assert client.post("/api/predict", json={"text": "hello", "model": "good"}).status_code == 200


def test_any_failure_at_load_makes_the_model_unavailable(tmp_path, monkeypatch):
    root = tmp_path / "models"
    root.mkdir()
    copy_model(root, "breaks-at-load")
    reg = Registry([root])
    assert reg.names() == ["breaks-at-load"]
    import attention_lens.registry as registry

    def explode(folder, **kwargs):
        raise MemoryError(f"cannot allocate while reading {folder}/model.safetensors")

    monkeypatch.setattr(registry, "load_folder", explode)
    with pytest.raises(AnalysisError, match="unavailable"):
        reg.get("breaks-at-load")
    entry = reg.entries()[0]
    assert not entry.available and "MemoryError" in entry.error
    assert str(root) not in entry.error and "breaks-at-load/model.safetensors" in entry.error
    assert reg.names() == []


def test_a_config_is_checked_against_the_weights_before_allocating(tmp_path):
    from attention_lens.model.checkpoint import CheckpointError, load_model

    folder = copy_model(tmp_path, "m", lambda c: c.update(n_layers=400))
    rss0, t0 = peak_rss_mb(), time.perf_counter()
    with pytest.raises(CheckpointError, match="hold 1 layer"):
        load_model(folder)
    assert time.perf_counter() - t0 < 5 and peak_rss_mb() - rss0 < 100
    folder = copy_model(tmp_path, "w", lambda c: c.update(d_model=512, d_head=42))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(folder)
