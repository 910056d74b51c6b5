"""Small GGUF files written with ggml's own writer, for the GGUF tests.

A random llama-, qwen2- or gpt2-shaped model is written tensor by tensor in llama.cpp's
layout (names, [out, in] rows, norms in F32) and in any quantization: the ones ``gguf`` can
quantize are quantized from random float32 weights; the K-quants (which ``gguf`` only
dequantizes) are random blocks whose scale fields hold small finite half floats.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import numpy as np

import gguf
from attention_lens.model.tokenizer import Tokenizer

QT = gguf.GGMLQuantizationType
#: Byte offsets of the half-float scale fields inside one block of each K-quant.
K_SCALES = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2),
            QT.Q6_K: (208,)}

CORPUS = [
    "The capital of France is Paris. When Mary and John went to the store, John gave a "
    "drink to Mary. Harry Potter went home. 12345 + 678 = 13023.",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Café, naïve, façade, 東京, Москва, ß, emoji 🙂🚀, tabs\tand  double  spaces.",
] * 20


@functools.lru_cache(maxsize=None)
def small_tokenizer(vocab_size: int = 360) -> tuple[list[str], list[str], int]:
    """(tokens by id, merges as 'a b', id of <|endoftext|>) of a small byte-level BPE."""
    tok = Tokenizer.train(CORPUS, vocab_size=vocab_size)
    data = json.loads(tok.hf.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges, vocab["<|endoftext|>"]


@functools.lru_cache(maxsize=None)
def spm_tokenizer(vocab_size: int = 420) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a small sentencepiece-style BPE (Llama 2 layout:
    <unk>, <s>, </s>, the 256 byte tokens, then pieces with '▁' for spaces)."""
    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(CORPUS, vocab_size=vocab_size, show_progress=False)
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens = head + [p for p in pieces if p not in head]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - len(head))
    scores = [0.0] * len(head) + [-float(i) for i in range(len(tokens) - len(head))]
    return tokens, scores, types


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], qtype: QT,
            scale: float = 0.08) -> tuple[np.ndarray, Optional[QT]]:
    """Data for one weight in ``qtype`` (raw blocks for quantized types)."""
    if qtype in K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        raw = rng.integers(0, 256, size=(rows, shape[-1] // block, size), dtype=np.uint8)
        for off in K_SCALES[qtype]:
            low = 1e-5 if qtype == QT.Q6_K else 1e-4  # Q6_K multiplies by int8 scales
            half = rng.uniform(low, 3 * low, size=raw.shape[:2]).astype(np.float16)
            raw[:, :, off:off + 2] = half[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
        return raw.reshape(*shape[:-1], shape[-1] // block * size), qtype
    data = (rng.standard_normal(shape) * scale).astype(np.float32)
    if qtype == QT.F32:
        return data, None
    if qtype == QT.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(path: Path, arch: str = "llama", qtype: QT = QT.F32, seed: int = 0,
               d_model: int = 256, n_heads: int = 4, n_kv: int = 2, d_mlp: int = 512,
               n_layers: int = 2, tied: bool = False, pre: str = "smollm",
               add_bos: Optional[bool] = None, n_ctx: int = 128,
               extra_kv: Optional[dict] = None, spm: bool = False) -> Path:
    """Write a random model of ``arch`` with every matrix in ``qtype``; returns ``path``."""
    rng = np.random.default_rng(seed)
    if spm:
        tokens, spm_scores, spm_types = spm_tokenizer()
    else:
        tokens, merges, eot = small_tokenizer()
    v = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"test {arch} {qtype.name}")
    w.add_license("mit")
    w.add_block_count(n_layers)
    w.add_context_length(n_ctx)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_mlp)
    w.add_head_count(n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(d_model // n_heads)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(spm_scores)
        w.add_token_types(spm_types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if i == eot else 1 for i in range(v)])
        w.add_token_merges(merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    for key, value in (extra_kv or {}).items():
        w.add_key_value(key, value[0], value[1])
    e = d_model // n_heads

    def mat(name: str, shape: tuple[int, ...], scale: float = 0.08) -> None:
        data, raw = _tensor(rng, shape, qtype, scale)
        w.add_tensor(name, data, raw_dtype=raw)

    def vec(name: str, n: int, base: float = 0.0, scale: float = 0.05) -> None:
        w.add_tensor(name, (base + rng.standard_normal(n) * scale).astype(np.float32))

    mat("token_embd.weight", (v, d_model), 0.5)
    if arch == "gpt2":
        w.add_tensor("position_embd.weight",
                     (rng.standard_normal((n_ctx, d_model)) * 0.1).astype(np.float32))
    for i in range(n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", d_model, 1.0, 0.1)
        vec(p + "ffn_norm.weight", d_model, 1.0, 0.1)
        if arch == "gpt2":
            for n in ("attn_norm", "ffn_norm"):
                vec(p + n + ".bias", d_model)
            mat(p + "attn_qkv.weight", (3 * d_model, d_model))
            vec(p + "attn_qkv.bias", 3 * d_model)
            mat(p + "attn_output.weight", (d_model, d_model))
            vec(p + "attn_output.bias", d_model)
            mat(p + "ffn_up.weight", (d_mlp, d_model))
            vec(p + "ffn_up.bias", d_mlp)
            mat(p + "ffn_down.weight", (d_model, d_mlp))
            vec(p + "ffn_down.bias", d_model)
            continue
        mat(p + "attn_q.weight", (n_heads * e, d_model))
        mat(p + "attn_k.weight", (n_kv * e, d_model))
        mat(p + "attn_v.weight", (n_kv * e, d_model))
        if arch == "qwen2":
            vec(p + "attn_q.bias", n_heads * e, scale=0.3)
            vec(p + "attn_k.bias", n_kv * e, scale=0.3)
            vec(p + "attn_v.bias", n_kv * e, scale=0.3)
        mat(p + "attn_output.weight", (d_model, n_heads * e))
        mat(p + "ffn_gate.weight", (d_mlp, d_model))
        mat(p + "ffn_up.weight", (d_mlp, d_model))
        mat(p + "ffn_down.weight", (d_model, d_mlp))
    vec("output_norm.weight", d_model, 1.0, 0.1)
    if arch == "gpt2":
        vec("output_norm.bias", d_model)
    if not tied:
        mat("output.weight", (v, d_model), 0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
