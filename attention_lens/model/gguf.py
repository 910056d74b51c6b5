"""GGUF files (llama.cpp, Ollama, LM Studio) converted into our :class:`HookedTransformer`.

Supported architectures: ``llama`` (SmolLM2, TinyLlama, Llama 2/3), ``mistral``, ``qwen2`` and
``gpt2``. Every tensor is dequantized with ggml's own ``gguf`` package (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K and whatever else ``gguf.quants.dequantize`` knows) and
analysed in float32. llama.cpp's converter permutes the rows of W_Q and W_K of ``llama`` and
``mistral`` files for its interleaved rotary layout; that permutation is undone here so the
rotate-half forward reproduces the file's model. The tokenizer is rebuilt from the metadata
(tokens, merges, the pre-tokenizer ``tokenizer.ggml.pre`` names, BOS/EOS, control tokens).

The header is walked with explicit bounds before ggml's reader sees it: every count and
length is checked against the bytes left in the file, and every tensor's data against the
file's size, so a truncated or hostile file is refused with a reason instead of hanging or
allocating. Dequantized weights are kept as safetensors under the cache folder, keyed by the
file's sha256, so a second process or the next start reads them back without dequantizing.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import CheckpointError, LoadedModel, compare_shapes
from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import HookedTransformer

SUFFIX = ".gguf"
MAGIC = b"GGUF"
#: Bounds on what a header may declare (far above any real file; refused before allocating).
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIMS = 4
MAX_STRING = 1 << 24
#: Cache format: bump when the conversion changes so stale caches are not read back.
CACHE_VERSION = "1"
#: Dequantized models kept in the cache folder (the oldest are removed beyond this).
CACHE_KEEP = 4

#: ``general.architecture`` -> family converted here.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
#: Architectures whose converter permuted W_Q / W_K rows for interleaved rotary.
PERMUTED = {"llama", "mistral"}

# GGUF metadata value types: id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
            6: ("f", 4), 7: ("B", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9


def _quant_types() -> dict[int, str]:
    """ggml tensor types this installation of ``gguf`` dequantizes: id -> name."""
    import gguf
    import gguf.quants

    kinds = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    kinds |= set(getattr(gguf.quants, "_type_traits", {}))
    return {int(k): k.name for k in kinds}


# --------------------------------------------------------------------------- header
@dataclass
class TensorInfo:
    """One tensor of the file: name, shape (torch order, outermost first), type and bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int  # from the start of the file
    nbytes: int

    @property
    def qname(self) -> str:
        return _quant_types().get(self.qtype, f"type {self.qtype}")


@dataclass
class Header:
    """What the bounded walk of a GGUF header found."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    size: int = 0


class _Cursor:
    """Reads little-endian values from a memory map, refusing to read past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.end = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise CheckpointError(self.path, f"truncated or corrupt GGUF header ({what} needs "
                                             f"{n} bytes at offset {self.pos}, the file has "
                                             f"{self.end})")

    def take(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.take("Q", 8, what)
        if n > MAX_STRING:
            raise CheckpointError(self.path, f"GGUF header: {what} declares a string of {n} "
                                             "bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            v = self.take(fmt, size, what)
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            itype = self.take("I", 4, what)
            count = self.take("Q", 8, what)
            least = 8 if itype == _STRING else _SCALARS.get(itype, ("", 0))[1]
            if itype not in _SCALARS and itype != _STRING:
                raise CheckpointError(self.path, f"GGUF header: {what} is an array of "
                                                 f"unknown type {itype}")
            if count * least > self.end - self.pos:  # before looping over a hostile count
                raise CheckpointError(self.path, f"GGUF header: {what} declares {count} items, "
                                                 "more than the file holds")
            if itype in _SCALARS:
                fmt, size = _SCALARS[itype]
                arr = np.frombuffer(self.buf, dtype=np.dtype("<" + fmt), count=count,
                                    offset=self.pos)
                self.pos += size * count
                return arr.astype(bool) if itype == 7 else arr
            return [self.string(what) for _ in range(count)]
        raise CheckpointError(self.path, f"GGUF header: {what} has unsupported value type "
                                         f"{vtype}")


def read_header(path: Path) -> Header:
    """Walk a GGUF file's header with every size checked; a CheckpointError on any problem."""
    import gguf

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            buf = np.memmap(fh, dtype=np.uint8, mode="r") if size else b""
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"cannot be read ({exc})") from None
    cur = _Cursor(memoryview(buf) if size else b"", path)
    cur.need(4, "the magic number")
    if bytes(cur.buf[:4]) != MAGIC:
        raise CheckpointError(path, "not a GGUF file (bad magic number)")
    cur.pos = 4
    version = cur.take("I", 4, "version")
    if version not in (2, 3):
        raise CheckpointError(path, f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.take("Q", 8, "tensor count")
    n_kv = cur.take("Q", 8, "metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise CheckpointError(path, f"GGUF header declares {n_tensors} tensors and {n_kv} "
                                    f"metadata entries (at most {MAX_TENSORS} each)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.take("I", 4, f"the type of {key}")
        if key in meta:
            raise CheckpointError(path, f"GGUF header repeats the metadata key {key!r}")
        meta[key] = cur.value(vtype, key)
    quants = _quant_types()
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.take("I", 4, f"the rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(path, f"tensor {name} declares {n_dims} dimensions")
        dims = [cur.take("Q", 8, f"the shape of {name}") for _ in range(n_dims)]
        qtype = cur.take("I", 4, f"the type of {name}")
        offset = cur.take("Q", 8, f"the offset of {name}")
        if any(d <= 0 or d > 1 << 40 for d in dims):
            raise CheckpointError(path, f"tensor {name} has shape {dims}")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(path, f"GGUF header: invalid alignment {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    header = Header(version, meta, size=size)
    for name, shape, qtype, offset in infos:
        if qtype not in quants:
            try:
                tname = gguf.GGMLQuantizationType(qtype).name
            except ValueError:
                tname = f"unknown type {qtype}"
            known = ", ".join(sorted(quants.values()))
            raise CheckpointError(path, f"tensor {name} is stored as {tname}, which cannot be "
                                        f"dequantized (supported: {known})")
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        n = int(np.prod(shape, dtype=object))
        if shape[-1] % block:
            raise CheckpointError(path, f"tensor {name}: rows of {shape[-1]} values do not fill "
                                        f"{quants[qtype]} blocks of {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(path, f"truncated file: tensor {name} needs bytes up to "
                                        f"{start + nbytes}, the file has {size}")
        if name in header.tensors:
            raise CheckpointError(path, f"GGUF header repeats the tensor {name!r}")
        header.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
    return header


# --------------------------------------------------------------------------- config
def _meta(h: Header, path: Path, key: str, default: Any = None, kind: type = int) -> Any:
    value = h.metadata.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(path, f"GGUF metadata lacks {key!r}")
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(path, f"GGUF metadata {key} must be {kind.__name__}, got "
                                    f"{str(value)[:60]!r}")
    return value


def architecture(h: Header, path: Path) -> tuple[str, str]:
    """The file's architecture and the family converting it, or a CheckpointError."""
    arch = h.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(path, f"unsupported GGUF architecture {arch!r}: Attention Lens "
                                    f"converts {', '.join(sorted(ARCHITECTURES))}")
    return str(arch), ARCHITECTURES[str(arch)]


def quantization(h: Header) -> str:
    """The file's quantization: the type most of its matrices are stored in (e.g. Q4_1)."""
    counts: dict[str, int] = {}
    for t in h.tensors.values():
        if len(t.shape) >= 2:
            counts[t.qname] = counts.get(t.qname, 0) + int(np.prod(t.shape))
    return max(counts, key=counts.__getitem__) if counts else "F32"


def model_config(h: Header, path: Path, name: Optional[str] = None) -> ModelConfig:
    """Our :class:`ModelConfig` from the file's metadata."""
    arch, family = architecture(h, path)
    a = arch
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    embd = h.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(path, "missing tensor 'token_embd.weight'")
    d_vocab = embd.shape[0]
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(path, "GGUF metadata lacks the tokenizer's tokens")
    if len(tokens) > d_vocab:
        raise CheckpointError(path, f"the tokenizer has {len(tokens)} tokens but the embedding "
                                    f"only {d_vocab} rows")
    if _meta(h, path, f"{a}.expert_count", default=0) > 0:
        raise CheckpointError(path, "mixture-of-experts models are not supported")
    d = _meta(h, path, f"{a}.embedding_length")
    n_heads = _meta(h, path, f"{a}.attention.head_count")
    n_layers = _meta(h, path, f"{a}.block_count")
    d_mlp = _meta(h, path, f"{a}.feed_forward_length")
    tok_model = h.metadata.get("tokenizer.ggml.model")
    bos = h.metadata.get("tokenizer.ggml.bos_token_id")
    add_bos = h.metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # older files: sentencepiece vocabularies add BOS
        add_bos = tok_model == "llama"
    extra: dict[str, Any] = {"source": "gguf", "model_type": arch, "bos_token_id": bos,
                             "eos_token_id": h.metadata.get("tokenizer.ggml.eos_token_id"),
                             "prepend_bos": bool(add_bos) and isinstance(bos, int),
                             "quantization": quantization(h),
                             "tied_embeddings": "output.weight" not in h.tensors}
    if not isinstance(n_heads, int) or n_heads <= 0 or not isinstance(d, int) or d <= 0:
        raise CheckpointError(path, "GGUF metadata: head count and embedding length must be "
                                    "positive integers")
    n_ctx = _meta(h, path, f"{a}.context_length")
    if family == "gpt2":
        if d % n_heads:
            raise CheckpointError(path, f"embedding length {d} is not a multiple of "
                                        f"{n_heads} heads")
        kw: dict[str, Any] = dict(
            d_head=d // n_heads, act_fn="gelu_new", normalization_type="LN",
            eps=float(_meta(h, path, f"{a}.attention.layer_norm_epsilon", 1e-5, float)))
    else:
        kv = _meta(h, path, f"{a}.attention.head_count_kv", default=n_heads)
        if kv <= 0 or n_heads % kv:
            raise CheckpointError(path, f"{n_heads} query heads are not a multiple of {kv} "
                                        "key/value heads")
        d_head = _meta(h, path, f"{a}.attention.key_length",
                       default=d // n_heads if d % n_heads == 0 else -1)
        if d_head <= 0 or _meta(h, path, f"{a}.attention.value_length", d_head) != d_head:
            raise CheckpointError(path, "GGUF metadata: head size missing or keys and values "
                                        "of different sizes")
        scaling = h.metadata.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none") or "rope_freqs.weight" in h.tensors:
            raise CheckpointError(path, f"rotary scaling {scaling or 'rope_freqs'!r} is not "
                                        "supported (only plain rotary positions)")
        rot = _meta(h, path, f"{a}.rope.dimension_count", default=d_head)
        if rot <= 0 or rot % 2 or rot > d_head:
            raise CheckpointError(path, f"rotary dimension {rot} must be a positive even "
                                        f"number no larger than the head size {d_head}")
        window = h.metadata.get(f"{a}.attention.sliding_window")
        if isinstance(window, int) and window > 0 and arch == "mistral":
            n_ctx = min(n_ctx, window)
            extra["sliding_window"] = window
        extra["n_key_value_heads"] = kv
        kw = dict(d_head=d_head, act_fn="silu", normalization_type="RMS",
                  eps=float(_meta(h, path, f"{a}.attention.layer_norm_rms_epsilon", 1e-6,
                                  float)),
                  positional_embedding_type="rotary",
                  rotary_base=float(_meta(h, path, f"{a}.rope.freq_base", 10000.0, float)),
                  rotary_dim=rot, gated_mlp=True)
    try:
        return ModelConfig(name=name or path.stem, n_layers=n_layers, d_model=d,
                           n_heads=n_heads, n_ctx=n_ctx, d_vocab=d_vocab, d_mlp=d_mlp,
                           attn_only=False, original_architecture=f"gguf:{arch}", extra=extra,
                           **kw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, str(exc)) from None


# -------------------------------------------------------------------------- weights
def _hf_names(arch: str, family: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name (prefix stripped) :mod:`.hf` converts."""
    names: dict[str, str] = {}
    if family == "gpt2":
        names.update({"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
                      "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
                      "output.weight": "lm_head.weight"})
        per = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn",
               "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
        prefix = "h"
    else:
        names.update({"token_embd.weight": "embed_tokens.weight",
                      "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"})
        per = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
        prefix = "layers"
    for i in range(n_layers):
        for ours, theirs in per.items():
            for kind in ("weight", "bias"):
                names[f"blk.{i}.{ours}.{kind}"] = f"{prefix}.{i}.{theirs}.{kind}"
    return names


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation (interleaved -> rotate-half rotary)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2)
            .reshape(rows, *rest))


class GGUFWeights:
    """The file's tensors under Hugging Face names, in the interface :mod:`.hf` converts.

    With ``meta=True`` nothing is read: tensors come back on the meta device, so every name
    and shape the conversion needs is checked against the tensor table before any
    dequantization or allocation.
    """

    def __init__(self, path: Path, header: Header, cfg: ModelConfig, arch: str, family: str,
                 meta: bool = False) -> None:
        self.path_, self.header, self.cfg, self.arch, self.family = path, header, cfg, arch, \
            family
        self.meta = meta
        names = _hf_names(arch, family, cfg.n_layers)
        unknown = sorted(n for n in header.tensors if n not in names)
        if unknown:
            raise CheckpointError(path, f"tensors the {arch} conversion does not support: "
                                        f"{unknown[:5]}{' …' if len(unknown) > 5 else ''}")
        self.by_hf = {names[n]: header.tensors[n] for n in header.tensors}
        self.used: set[str] = set()
        self.dtypes = {t.qname for t in header.tensors.values()}
        self._reader: Any = None

    def __contains__(self, key: str) -> bool:
        return key in self.by_hf

    def path(self, key: Optional[str] = None) -> Path:
        return self.path_

    def _conv1d(self, info: TensorInfo) -> bool:
        """GPT-2's Conv1D layers: stored [out, in] by llama.cpp, converted from [in, out]."""
        return self.family == "gpt2" and len(info.shape) == 2 and any(
            s in info.name for s in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))

    def _shape(self, info: TensorInfo) -> tuple[int, ...]:
        """The shape the HF converter expects."""
        return info.shape[::-1] if self._conv1d(info) else info.shape

    def _read(self, info: TensorInfo) -> torch.Tensor:
        import gguf.quants

        raw = np.memmap(self.path_, dtype=np.uint8, mode="r", offset=info.offset,
                        shape=(info.nbytes,))
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.qtype)]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            arr = np.array(raw.view(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            arr = raw.view(np.float16).astype(np.float32)
        else:
            rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
            blocks = raw.reshape(rows, info.shape[-1] // block * type_size)
            arr = gguf.quants.dequantize(blocks, qtype).astype(np.float32, copy=False)
        t = torch.from_numpy(np.ascontiguousarray(arr).reshape(info.shape))
        if not torch.isfinite(t).all():
            raise CheckpointError(self.path_, f"tensor {info.name} holds NaN or infinite values")
        name = info.name
        if self.arch in PERMUTED and (".attn_q." in name or ".attn_k." in name):
            heads = self.cfg.n_heads if ".attn_q." in name else \
                int(self.cfg.extra["n_key_value_heads"])
            t = _unpermute(t, heads)
        if self._conv1d(info):
            t = t.T.contiguous()
        return t

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        info = self.by_hf.get(key)
        if info is None:
            raise CheckpointError(self.path_, f"missing tensor for {key!r} (the "
                                              f"{self.arch} metadata needs it)")
        got = self._shape(info)
        if tuple(got) != tuple(shape):
            raise CheckpointError(self.path_, f"tensor {info.name} has shape "
                                              f"{list(info.shape)} but the metadata implies "
                                              f"{list(shape)}")
        self.used.add(key)
        if self.meta:
            return torch.empty(shape, device="meta")
        return self._read(info)

    def maybe(self, key: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
        return self.take(key, shape) if key in self.by_hf else None

    def check_all_used(self, arch: str) -> None:
        left = sorted(info.name for k, info in self.by_hf.items() if k not in self.used)
        if left:
            more = " …" if len(left) > 5 else ""
            raise CheckpointError(self.path_, f"tensors the {arch} conversion does not "
                                              f"support: {left[:5]}{more}")


def convert(path: Path, header: Header, cfg: ModelConfig, meta: bool) -> dict[str, torch.Tensor]:
    """Our state dict from the file (on the meta device with ``meta``: names/shapes only)."""
    from .hf import CONVERTERS

    arch, family = architecture(header, path)
    w = GGUFWeights(path, header, cfg, arch, family, meta=meta)
    state = CONVERTERS[family](cfg, w)
    w.check_all_used(arch)
    return state


# ------------------------------------------------------------------------ tokenizer
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: ``tokenizer.ggml.pre`` -> the split its merges were learned with (others: GPT-2's).
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "tekken": _TEKKEN_SPLIT, "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT, "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merges(h: Header, path: Path, tokens: list[str]) -> list[tuple[str, str]]:
    raw = h.metadata.get("tokenizer.ggml.merges")
    if raw is None:
        scores = h.metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(path, "GGUF tokenizer has neither merges nor scores")
        return _merges_from_scores(tokens, [float(s) for s in scores])
    if not isinstance(raw, list):
        raise CheckpointError(path, "tokenizer.ggml.merges must be a list of strings")
    out = []
    for m in raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(path, f"tokenizer merge {m[:40]!r} is not two tokens")
        out.append((parts[0], parts[1]))
    return out


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges implied by the vocabulary: every split of a token into two
    tokens, best-scoring result first (ties: longer left part, then longer right part), the
    order transformers derives them in."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for tok, score in dict(zip(tokens, scores)).items():
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok))
                 if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend(local)
    found.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def load_gguf_tokenizer(h: Header, path: Path) -> Tokenizer:
    """The tokenizer the file's metadata describes, built with HF ``tokenizers``."""
    kind = h.metadata.get("tokenizer.ggml.model")
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(path, "GGUF metadata lacks the tokenizer's tokens")
    types = h.metadata.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(path, "tokenizer.ggml.token_type and tokens differ in length")
    try:
        if kind == "gpt2":
            spelling = _bytes_to_unicode()
            alphabet = set(spelling.values())
            spelled = [t if set(t) <= alphabet else
                       "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
            vocab = {t: i for i, t in enumerate(spelled)}
            hf = HFTokenizer(models.BPE(vocab, _merges(h, path, tokens)))
            split = PRE_TOKENIZER_SPLITS.get(str(h.metadata.get("tokenizer.ggml.pre")))
            if split is None:
                hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            else:
                hf.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            hf.decoder = decoders.ByteLevel()
            control_ok = alphabet
        elif kind == "llama":
            vocab = {t: i for i, t in enumerate(tokens)}
            unk = h.metadata.get("tokenizer.ggml.unknown_token_id")
            unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
            hf = HFTokenizer(models.BPE(vocab, _merges(h, path, tokens), unk_token=unk_token,
                                        fuse_unk=True, byte_fallback=True))
            prefix = h.metadata.get("tokenizer.ggml.add_space_prefix", True)
            hf.normalizer = None
            hf.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if prefix:
                steps.append(decoders.Strip(content=" ", left=1))
            hf.decoder = decoders.Sequence(steps)
            control_ok = None
        else:
            raise CheckpointError(path, f"unsupported GGUF tokenizer {kind!r} (supported: gpt2 "
                                        "byte-level BPE, llama sentencepiece BPE)")
        control = [AddedToken(t, normalized=False, special=True)
                   for t, ty in zip(tokens, types)
                   if ty == _CONTROL and (control_ok is None or set(t) <= control_ok)]
        if control:
            hf.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        if user:
            hf.add_tokens(user)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise CheckpointError(path, f"the tokenizer in the metadata is not valid ({exc})") \
            from None
    return Tokenizer(hf, source=f"{path.name} (GGUF metadata)")


# --------------------------------------------------------------------------- loading
def file_sha256(path: Path) -> str:
    """The file's sha256 (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_gguf(path: str | Path) -> Optional[str]:
    """Why a GGUF file cannot be loaded (header, metadata, tensor table; no weights read)."""
    return check_gguf(path)[0]


def check_gguf(path: str | Path) -> tuple[Optional[str], Optional[str]]:
    """(why the file cannot be loaded or None, its quantization when the header reads)."""
    path = Path(path)
    quant = None
    try:
        header = read_header(path)
        quant = quantization(header)
        cfg = model_config(header, path)
        convert(path, header, cfg, meta=True)
        if header.metadata.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
            raise CheckpointError(path, "unsupported GGUF tokenizer "
                                        f"{header.metadata.get('tokenizer.ggml.model')!r}")
    except CheckpointError as exc:
        return str(exc), quant
    return None, quant


def describe(path: str | Path) -> dict[str, Any]:
    """Architecture and quantization of a GGUF file, read from its header (for listings)."""
    header = read_header(Path(path))
    return {"architecture": header.metadata.get("general.architecture"),
            "quantization": quantization(header), "name": header.metadata.get("general.name")}


def default_cache_dir() -> Path:
    """Where dequantized weights are kept: the deployment's cache folder, ``gguf/``."""
    from ..paths import default_cache_dir as root

    return root() / "gguf"


def _cache_read(file: Path, path: Path) -> Optional[dict[str, torch.Tensor]]:
    if not file.is_file():
        return None
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # a damaged cache entry is rebuilt
    os.utime(file)  # most recently used
    return state


def _cache_write(folder: Path, file: Path, state: dict[str, torch.Tensor], sha: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                      metadata={"sha256": sha, "version": CACHE_VERSION})
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        kept = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime,
                      reverse=True)
        for old in kept[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full cache folder only costs the next start a dequantization


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path) -> HookedTransformer:
    """A model holding ``state``'s tensors themselves (no copy), every name and shape checked;
    absent optional biases are exact zeros."""
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    compare_shapes(expected, {k: tuple(t.shape) for k, t in state.items()}, path)
    full: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        t = state.get(name)
        if t is None:
            full[name] = torch.zeros(shape)
            continue
        if t.dtype != torch.float32:
            raise CheckpointError(path, f"tensor {name} has dtype {t.dtype}, not float32")
        if not torch.isfinite(t).all():
            raise CheckpointError(path, f"tensor {name} holds NaN or infinite values")
        full[name] = t.contiguous()
    model.load_state_dict(full, assign=True)
    return model


def load_gguf(path: str | Path, device: str = "cpu", name: Optional[str] = None,
              cache_dir: Optional[Path | str] = None, use_cache: bool = True) -> LoadedModel:
    """Convert a GGUF file into a :class:`LoadedModel` (float32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "model file does not exist")
    header = read_header(path)
    arch, family = architecture(header, path)
    cfg = model_config(header, path, name or path.stem)
    tokenizer = load_gguf_tokenizer(header, path)
    if tokenizer.vocab_size > cfg.d_vocab:
        raise CheckpointError(path, f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                    f"embedding only {cfg.d_vocab} rows")
    convert(path, header, cfg, meta=True)  # every name and shape, before reading any weight
    sha = file_sha256(path)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = folder / f"{sha}-v{CACHE_VERSION}.safetensors"
    state = _cache_read(cached, path) if use_cache else None
    from_cache = state is not None
    if state is None:
        state = convert(path, header, cfg, meta=False)
    model = build_model(cfg, state, path)
    del state
    if not from_cache and use_cache:
        _cache_write(folder, cached, model.state_dict(), sha)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    meta = header.metadata
    card: dict[str, Any] = {
        "source": "GGUF file",
        "file": path.name,
        "name": meta.get("general.name"),
        "organization": meta.get("general.organization"),
        "license": meta.get("general.license"),
        "architecture": arch,
        "quantization": cfg.extra["quantization"],
        "stored_dtype": sorted({t.qname for t in header.tensors.values()}),
        "analysed_dtype": "float32",
        "sha256": sha,
        "tokenizer": f"GGUF metadata ({meta.get('tokenizer.ggml.model')}, pre-tokenizer "
                     f"{meta.get('tokenizer.ggml.pre', 'default')})",
        "n_params": sum(int(np.prod(t.shape)) for t in header.tensors.values()),
        "dequantized_from_cache": from_cache,
    }
    if "n_key_value_heads" in cfg.extra:
        card["key_value_heads"] = cfg.extra["n_key_value_heads"]
    side = path.with_suffix(".card.json")
    if side.is_file():
        from .checkpoint import read_json_file

        extra = read_json_file(side)
        if isinstance(extra, dict):
            card.update({k: v for k, v in extra.items() if k not in ("sha256",)})
    card = {k: v for k, v in card.items() if v is not None}
    return LoadedModel(name=name or path.stem, model=model, tokenizer=tokenizer, card=card,
                       path=path)


__all__ = ["ARCHITECTURES", "describe", "file_sha256", "inspect_gguf", "load_gguf",
           "load_gguf_tokenizer", "read_header"]
