"""Model configuration, named after TransformerLens' ``HookedTransformerConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

NormalizationType = Literal["LN", "RMS"]
ActFn = Literal["gelu", "gelu_new", "relu", "silu"]
PositionalEmbeddingType = Literal["standard", "rotary"]

#: Largest value accepted for each size in a config (beyond any model this app can analyse);
#: checked before anything is allocated, so a hostile config cannot exhaust memory.
MAX_SIZES = {"n_layers": 512, "d_model": 1 << 16, "n_heads": 1024, "d_head": 4096,
             "n_ctx": 1 << 20, "d_vocab": 1 << 20, "d_mlp": 1 << 18}


@dataclass
class ModelConfig:
    """Shape and architecture of a transformer; keys match TransformerLens names."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_vocab: int
    attn_only: bool = True
    d_mlp: Optional[int] = None
    act_fn: Optional[str] = None
    normalization_type: Optional[str] = None
    eps: float = 1e-5
    positional_embedding_type: str = "standard"
    rotary_dim: Optional[int] = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    final_rms: bool = False
    original_architecture: Optional[str] = None
    name: str = "model"
    tokenizer: str = "tokenizer.json"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: {key} must be a positive integer, got {value!r}")
        for key, most in MAX_SIZES.items():
            value = getattr(self, key)
            if isinstance(value, int) and value > most:
                raise ValueError(f"config: {key} = {value} is larger than the {most} allowed")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError("config: tokenizer must be a file name")
        if self.normalization_type not in (None, "LN", "RMS"):
            raise ValueError(
                f"config: normalization_type must be null, 'LN' or 'RMS', "
                f"got {self.normalization_type!r}"
            )
        if self.positional_embedding_type not in ("standard", "rotary"):
            raise ValueError(
                "config: positional_embedding_type must be 'standard' or 'rotary', "
                f"got {self.positional_embedding_type!r}"
            )
        if not self.attn_only:
            if not isinstance(self.d_mlp, int) or self.d_mlp <= 0:
                raise ValueError("config: d_mlp must be a positive integer when attn_only is false")
            if self.act_fn not in ("gelu", "gelu_new", "relu", "silu", "gelu_fast"):
                raise ValueError(f"config: unsupported act_fn {self.act_fn!r}")
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head

    @property
    def has_absolute_positions(self) -> bool:
        """True when positions enter through a learned ``W_pos`` (False for rotary models)."""
        return self.positional_embedding_type == "standard"

    @property
    def n_params(self) -> int:
        """Number of parameters of a model of this shape (biases and norms included)."""
        d, h, dh, v = self.d_model, self.n_heads, self.d_head, self.d_vocab
        n = v * d + d * v + v  # W_E, W_U, b_U
        if self.positional_embedding_type == "standard":
            n += self.n_ctx * d
        norm = {None: 0, "LN": 2 * d, "RMS": d}[self.normalization_type]
        per_layer = 4 * h * d * dh + 3 * h * dh + d + norm
        if not self.attn_only:
            m = self.d_mlp or 0
            per_layer += (3 if self.gated_mlp else 2) * d * m + m + d + norm
        return n + self.n_layers * per_layer + norm

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-serialisable dict stored in ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build a config from a ``config.json`` dict, rejecting unknown keys loudly."""
        if not isinstance(data, dict):
            raise ValueError("config: top level must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}")
        missing = [k for k in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab")
                   if k not in data]
        if missing:
            raise ValueError(f"config: missing required keys {missing}")
        return cls(**data)
