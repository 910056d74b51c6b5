"""GGUF files as a model source: logits and tokens against transformers' own GGUF loader,
every quantization ``gguf`` dequantizes, the weight cache, and hostile or broken files."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_files import QT, write_gguf  # noqa: E402

from attention_lens.analysis.forward import tokenize  # noqa: E402
from attention_lens.model.checkpoint import CheckpointError  # noqa: E402
from attention_lens.model.gguf import inspect_gguf, load_gguf, read_header  # noqa: E402
from attention_lens.registry import Registry  # noqa: E402

STRINGS = [
    "The capital of France is",
    " Harry Potter went home. Harry Potter",
    "  two  spaces,\ta tab and\nnew\n\nlines   ",
    "Digits 0 12 345 6789 3.14159 1,000,000",
    "Unicode: Café naïve façade 東京 Москва ß Ωmega",
    "Emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "def main():\n    return {'a': [1, 2]}  # code\n",
    "<|endoftext|>special in the middle<|endoftext|>",
    "",
]
QUANTS = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
          QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _compare_logits(path: Path, tmp: Path) -> float:
    lm = load_gguf(path, cache_dir=tmp / "cache")
    hf = _hf_model(path)
    worst = 0.0
    for text in STRINGS[:4]:
        ids = torch.tensor([lm.tokenizer.encode(text) or [0]])
        with torch.no_grad():
            ours, theirs = lm.model(ids), hf(ids).logits
        assert ours.shape == theirs.shape
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


@pytest.mark.parametrize("qtype", QUANTS, ids=lambda q: q.name)
def test_llama_logits_equal_transformers_in_every_quantization(files, qtype):
    path = write_gguf(files / f"llama-{qtype.name}.gguf", "llama", qtype, seed=int(qtype))
    assert _compare_logits(path, files) < 1e-4
    lm = load_gguf(path, cache_dir=files / "cache")
    assert lm.card["quantization"] == qtype.name
    assert lm.cfg.n_heads == 4 and lm.cfg.extra["n_key_value_heads"] == 2


@pytest.mark.parametrize("arch,qtype,kw", [
    ("qwen2", QT.Q8_0, {}),
    ("llama", QT.Q4_0, {"tied": True}),
    ("gpt2", QT.F16, {"tied": True, "d_mlp": 1024, "n_ctx": 1024}),
], ids=["qwen2-Q8_0", "llama-tied-Q4_0", "gpt2-F16"])
def test_other_architectures_equal_transformers(files, arch, qtype, kw):
    path = write_gguf(files / f"{arch}-{qtype.name}-{len(kw)}.gguf", arch, qtype, seed=7, **kw)
    assert _compare_logits(path, files) < 1e-4


def test_mistral_architecture(files):
    """llama.cpp writes most Mistral models as 'llama'; a file saying 'mistral' (which
    transformers does not read) converts exactly like the same tensors saying 'llama'."""
    a = load_gguf(write_gguf(files / "m-llama.gguf", "llama", QT.Q5_1, seed=5),
                  use_cache=False)
    b = load_gguf(write_gguf(files / "m-mistral.gguf", "mistral", QT.Q5_1, seed=5),
                  use_cache=False)
    assert b.card["architecture"] == "mistral"
    ids = torch.tensor([a.tokenizer.encode(STRINGS[1])])
    with torch.no_grad():
        assert torch.equal(a.model(ids), b.model(ids))


def test_permutation_is_undone(files):
    """Reading W_Q without undoing llama.cpp's row permutation would change the logits."""
    from attention_lens.model import gguf as G

    path = write_gguf(files / "perm.gguf", "llama", QT.F32, seed=3)
    right = load_gguf(path, use_cache=False)
    original = G.PERMUTED
    try:
        G.PERMUTED = set()
        wrong = load_gguf(path, use_cache=False)
    finally:
        G.PERMUTED = original
    ids = torch.tensor([right.tokenizer.encode(STRINGS[1])])
    with torch.no_grad():
        assert float((right.model(ids) - wrong.model(ids)).abs().max()) > 1e-2


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-4o"])
def test_tokenizer_equals_transformers(files, pre):
    path = write_gguf(files / f"tok-{pre}.gguf", "llama", QT.F32, pre=pre)
    lm = load_gguf(path, cache_dir=files / "cache")
    hf = _hf_tokenizer(path)
    for text in STRINGS:
        ours = lm.tokenizer.encode(text)
        assert ours == hf.encode(text, add_special_tokens=False), (pre, text)
        assert lm.tokenizer.decode(ours) == text


def test_sentencepiece_tokenizer_equals_transformers(files):
    """Llama 2 / TinyLlama / Mistral files: a sentencepiece vocabulary with byte fallback,
    scores and no merges; BOS added by default."""
    path = write_gguf(files / "spm.gguf", "llama", QT.Q8_0, spm=True)
    lm = load_gguf(path, cache_dir=files / "cache")
    hf = _hf_tokenizer(path)
    for text in STRINGS:
        ours = lm.tokenizer.encode(text)
        assert ours == hf.encode(text, add_special_tokens=False), text
        assert lm.tokenizer.decode(ours) == hf.decode(ours)
    assert lm.cfg.extra["prepend_bos"] is True and lm.cfg.extra["bos_token_id"] == 1
    assert list(tokenize(lm, STRINGS[0], None)[0]) == hf.encode(STRINGS[0])
    assert _compare_logits(path, files) < 1e-4


def test_bos_from_metadata(files):
    path = write_gguf(files / "bos.gguf", "llama", QT.F32, add_bos=True)
    lm = load_gguf(path, cache_dir=files / "cache")
    hf = _hf_tokenizer(path)
    assert lm.cfg.extra["prepend_bos"] is True
    ids, _ = tokenize(lm, STRINGS[0], None)
    assert list(ids) == hf.encode(STRINGS[0])
    assert list(ids)[0] == lm.cfg.extra["bos_token_id"]
    no = load_gguf(write_gguf(files / "nobos.gguf", "llama", QT.F32, add_bos=False),
                   use_cache=False)
    assert no.cfg.extra["prepend_bos"] is False


def test_weights_cached_by_hash(files, tmp_path):
    path = write_gguf(files / "cache.gguf", "llama", QT.Q4_K, seed=11)
    first = load_gguf(path, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].name.startswith(first.card["sha256"])
    second = load_gguf(path, cache_dir=tmp_path)
    assert first.card["dequantized_from_cache"] is False
    assert second.card["dequantized_from_cache"] is True
    for (k, a), (_, b) in zip(first.model.state_dict().items(),
                              second.model.state_dict().items()):
        assert torch.equal(a, b), k
    cached[0].write_bytes(b"garbage")  # a damaged cache entry is rebuilt, not trusted
    third = load_gguf(path, cache_dir=tmp_path)
    assert third.card["dequantized_from_cache"] is False
    assert torch.equal(third.model.embed.W_E, first.model.embed.W_E)


def test_card_from_metadata(files):
    path = write_gguf(files / "card.gguf", "llama", QT.Q8_0)
    lm = load_gguf(path, cache_dir=files / "cache")
    c = lm.card
    assert c["name"] == "test llama Q8_0" and c["license"] == "mit"
    assert c["quantization"] == "Q8_0" and c["analysed_dtype"] == "float32"
    import hashlib

    assert c["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------ hostile files
def _reason(path: Path) -> str:
    reason = inspect_gguf(path)
    assert reason is not None
    with pytest.raises(CheckpointError):
        load_gguf(path, use_cache=False)
    return reason


def test_truncated_file(files, tmp_path):
    good = write_gguf(files / "trunc-src.gguf", "llama", QT.Q8_0)
    data = good.read_bytes()
    for cut in (3, 20, 200, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        assert "truncat" in _reason(bad) or "GGUF" in _reason(bad)
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated file" in _reason(bad)


def _header(n_tensors: int, kvs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def _kv_string_array(key: str, count: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 8, count)


def test_hostile_headers_refused_quickly(tmp_path):
    cases = {
        "huge-array": _header(0, [_kv_string_array("tokenizer.ggml.tokens", 1 << 60)]),
        "huge-counts": b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40),
        "huge-string": _header(0, [struct.pack("<Q", 1 << 50) + b"x" * 64]),
        "bad-magic": b"GGUX" + b"\0" * 64,
        "bad-version": b"GGUF" + struct.pack("<IQQ", 99, 0, 0),
        "empty": b"",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data + b"\0" * 64)
        t0 = time.perf_counter()
        reason = _reason(path)
        assert time.perf_counter() - t0 < 2, name
        assert reason, name


def test_tensor_beyond_file_and_bad_shapes(files, tmp_path):
    good = write_gguf(files / "shape-src.gguf", "llama", QT.F32)
    header = read_header(good)
    info = header.tensors["blk.0.attn_q.weight"]
    data = bytearray(good.read_bytes())
    # the tensor's declared first dimension (stored innermost-first) is found after its name
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4
    d0 = struct.unpack_from("<Q", data, at)[0]
    assert d0 == info.shape[-1]
    struct.pack_into("<Q", data, at, d0 * 1_000_000)  # far more bytes than the file holds
    bad = tmp_path / "beyond.gguf"
    bad.write_bytes(bytes(data))
    assert "truncated file" in _reason(bad) or "shape" in _reason(bad)
    # a metadata size that disagrees with the tensor table: refused before dequantizing
    wrong = write_gguf(tmp_path / "wrong.gguf", "llama", QT.F32,
                       extra_kv={"llama.feed_forward_length": (999, gguf.GGUFValueType.UINT32)})
    assert "feed_forward_length" in _reason(wrong) or "shape" in _reason(wrong)


def test_unsupported_architecture_and_quantization(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "unsupported GGUF architecture 'falcon'" in _reason(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 40), np.uint8), raw_dtype=QT.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "Q8_1, which cannot be dequantized" in _reason(tmp_path / "q81.gguf")


# ------------------------------------------------------------------------------ registry
def test_registry_lists_and_loads_gguf(files, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    write_gguf(models / "tiny-llama.Q4_K.gguf", "llama", QT.Q4_K)
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    reg = Registry([models], default="tiny-llama.Q4_K", cache_dir=tmp_path / "cache")
    entries = {e.name: e for e in reg.entries()}
    assert entries["tiny-llama.Q4_K"].available
    assert entries["tiny-llama.Q4_K"].kind == "gguf"
    assert entries["tiny-llama.Q4_K"].detail == "GGUF Q4_K"
    assert not entries["broken"].available and str(tmp_path) not in entries["broken"].error
    fp = reg.forward("The capital of France is", "tiny-llama.Q4_K")
    assert fp.logits.shape[-1] == reg.get("tiny-llama.Q4_K").cfg.d_vocab
    assert list((tmp_path / "cache" / "gguf").glob("*.safetensors"))
    # a file named directly (--model PATH) is a model too
    direct = Registry([], default=str(models / "tiny-llama.Q4_K.gguf"),
                      cache_dir=tmp_path / "cache")
    assert direct.default == "tiny-llama.Q4_K" and direct.names() == ["tiny-llama.Q4_K"]


def test_user_models_folder_follows_xdg(tmp_path, monkeypatch):
    from attention_lens.registry import user_models_dir

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    folder = user_models_dir()
    assert folder == tmp_path / "data" / "attention-lens" / "models"
    folder.mkdir(parents=True)
    write_gguf(folder / "mine.gguf", "llama", QT.Q8_0)
    assert "mine" in Registry([], user_models=True).names()
    assert "mine" not in Registry([], user_models=False).names()
