"""The transformer, its hook points, tokenizer and checkpoint folders."""

from .checkpoint import CheckpointError, LoadedModel, load_model, save_model
from .config import ModelConfig
from .hooks import HookPoint
from .tokenizer import Tokenizer, display_token
from .transformer import HookedTransformer

__all__ = [
    "CheckpointError",
    "HookPoint",
    "HookedTransformer",
    "LoadedModel",
    "ModelConfig",
    "Tokenizer",
    "display_token",
    "load_model",
    "save_model",
]
