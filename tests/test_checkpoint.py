"""Checkpoint folders: round trip, and a specific error for every way a folder can be broken."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention_lens.model import CheckpointError, load_model, save_model
from attention_lens.registry import Registry


def test_round_trip(tiny_ln, tmp_path):
    folder = save_model(tiny_ln.model, tiny_ln.tokenizer, tmp_path / "m", card={"name": "m"})
    loaded = load_model(folder)
    tokens = torch.randint(0, tiny_ln.cfg.d_vocab, (1, 12))
    torch.testing.assert_close(loaded.model(tokens), tiny_ln.model(tokens), atol=0, rtol=0)
    assert loaded.cfg == tiny_ln.cfg
    assert loaded.card == {"name": "m"}
    assert loaded.tokenizer.encode("Harry Potter") == tiny_ln.tokenizer.encode("Harry Potter")
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_state_dict_uses_transformer_lens_names(model_2l):
    names = dict(model_2l.model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in names.items()}
    assert shapes["embed.W_E"] == (4096, 384)
    assert shapes["pos_embed.W_pos"] == (128, 384)
    assert shapes["blocks.1.attn.W_Q"] == (12, 384, 32)
    assert shapes["blocks.1.attn.W_O"] == (12, 32, 384)
    assert shapes["blocks.0.attn.b_K"] == (12, 32)
    assert shapes["blocks.0.attn.b_O"] == (384,)
    assert shapes["unembed.W_U"] == (384, 4096)
    assert shapes["unembed.b_U"] == (4096,)


@pytest.mark.parametrize("missing, message", [
    ("config.json", r"config\.json: missing file"),
    ("model.safetensors", r"model\.safetensors: missing file"),
    ("tokenizer.json", r"tokenizer\.json: missing tokenizer file"),
])
def test_missing_file(tmp_copy, missing, message):
    folder = tmp_copy()
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_truncated_weights(tmp_copy):
    folder = tmp_copy()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_model(folder)


def test_garbage_weights(tmp_copy):
    folder = tmp_copy()
    (folder / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(folder)


def test_wrong_shape(tmp_copy):
    folder = tmp_copy()
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["blocks.0.attn.W_Q"] = tensors["blocks.0.attn.W_Q"][:, :, :16].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.W_Q has shape \[12, 384, 16\] "
                                              r"but config\.json implies \[12, 384, 32\]"):
        load_model(folder)


def test_config_disagrees_with_tensors(tmp_copy):
    folder = tmp_copy()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["d_model"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config disagrees with the weights"):
        load_model(folder)


def test_missing_and_unexpected_tensors(tmp_copy):
    folder = tmp_copy()
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["embed.W_E"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['embed\.W_E'\]"):
        load_model(folder)
    tensors = load_file(str(tmp_copy("attn-only-2l") / "model.safetensors"))
    tensors["blocks.9.attn.W_Q"] = torch.zeros(1)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors"):
        load_model(folder)


def test_absent_biases_load_as_zeros(tmp_copy):
    folder = tmp_copy()
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["blocks.0.attn.b_Q"]
    save_file(tensors, str(folder / "model.safetensors"))
    lm = load_model(folder)
    assert torch.count_nonzero(lm.model.blocks[0].attn.b_Q) == 0


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"n_layers": 1}', "missing required keys"),
    ('{"n_layers": 1, "d_model": 384, "n_heads": 12, "d_head": 32, "n_ctx": 128, '
     '"d_vocab": 4096, "bogus": 1}', r"unknown keys \['bogus'\]"),
    ('{"n_layers": 0, "d_model": 384, "n_heads": 12, "d_head": 32, "n_ctx": 128, '
     '"d_vocab": 4096}', "n_layers must be a positive integer"),
    ("[1, 2]", "top level must be a JSON object"),
])
def test_bad_config(tmp_copy, text, message):
    folder = tmp_copy()
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(folder)
    assert "config.json" in str(info.value)


def test_nan_weights(tmp_copy):
    folder = tmp_copy()
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["unembed.W_U"][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(folder)


def test_corrupt_tokenizer(tmp_copy):
    folder = tmp_copy()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid"):
        load_model(folder)


def test_pickle_is_never_unpickled(tmp_copy):
    """A legacy .pth holding arbitrary objects is refused by weights_only loading."""
    folder = tmp_copy()
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "model.pth")
    with pytest.raises(CheckpointError, match=r"model\.pth: cannot be read as a weights-only"):
        load_model(folder)


def test_registry_reports_broken_folder_and_keeps_others(tmp_copy, tmp_path):
    broken = tmp_copy("attn-only-1l")
    tmp_copy("attn-only-2l")
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    reg = Registry([tmp_path])
    assert reg.get("attn-only-2l").cfg.n_layers == 2
    from attention_lens.analysis import AnalysisError

    with pytest.raises(AnalysisError, match="unavailable.*corrupt or truncated"):
        reg.get("attn-only-1l")
    entry = {e.name: e for e in reg.entries()}["attn-only-1l"]
    assert not entry.available and "corrupt" in entry.error
    with pytest.raises(AnalysisError, match="unknown model 'gpt-9'.*attn-only-2l"):
        reg.get("gpt-9")


def test_registry_weight_cache_is_bounded(tmp_copy, tmp_path):
    tmp_copy("attn-only-1l")
    reg = Registry([tmp_path], max_weights=3)
    calls = []
    for key in range(5):
        reg.weights("attn-only-1l", key, lambda lm, key=key: calls.append(key) or key)
    assert reg.cache_info()["weights"] == 3
    assert reg.weights("attn-only-1l", 4, lambda lm: -1) == 4  # still cached
    assert reg.weights("attn-only-1l", 0, lambda lm: -1) == -1  # evicted, recomputed
    assert calls == [0, 1, 2, 3, 4]


def test_lone_surrogate_is_an_analysis_error(model_1l):
    from attention_lens.analysis import AnalysisError
    from attention_lens.analysis.forward import tokenize

    with pytest.raises(AnalysisError, match="lone surrogate"):
        tokenize(model_1l, "abc\ud800")


def test_forward_cache_is_bounded_in_count_and_bytes(tmp_copy, tmp_path):
    tmp_copy("attn-only-1l")
    reg = Registry([tmp_path], max_forward=3)
    prompts = [f"Prompt number {i} about Harry Potter" for i in range(5)]
    for p in prompts:
        reg.forward(p, "attn-only-1l")
    assert reg.cache_info()["forward"] == 3
    one = reg.forward(prompts[-1], "attn-only-1l").nbytes
    assert one > 0
    reg.max_forward_bytes = int(one * 1.5)  # room for one pass only
    reg.forward(prompts[0], "attn-only-1l")
    info = reg.cache_info()
    assert info["forward"] == 1 and info["forward_bytes"] <= reg.max_forward_bytes
    assert reg.forward(prompts[0], "attn-only-1l") is reg.forward(prompts[0], "attn-only-1l")
