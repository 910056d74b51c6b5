"""Checkpoint folders: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``card.json``.

Loading validates everything and raises :class:`CheckpointError` naming the file and the
problem. There is no fallback to random weights, and no pickle of untrusted files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import HookedTransformer

CONFIG, WEIGHTS, TOKENIZER, CARD = "config.json", "model.safetensors", "tokenizer.json", "card.json"
LEGACY_WEIGHTS = "model.pth"


class CheckpointError(Exception):
    """A model folder cannot be loaded; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


@dataclass
class LoadedModel:
    """A model ready for analysis: weights, tokenizer, config and provenance card."""

    name: str
    model: HookedTransformer
    tokenizer: Tokenizer
    card: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def cfg(self) -> ModelConfig:
        """The model's config."""
        return self.model.cfg


def _is_optional(name: str) -> bool:
    """Biases may be absent (a model without biases); they then load as exact zeros."""
    return name.rsplit(".", 1)[-1].startswith("b_")


def read_config(folder: Path) -> ModelConfig:
    """Parse and validate ``config.json``."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(path, "missing file (every model folder needs config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from None
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, str(exc)) from None


def _read_tensors(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = folder / WEIGHTS
    if path.is_file():
        try:
            return path, load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(path, f"corrupt or truncated safetensors file ({exc})") from None
    legacy = folder / LEGACY_WEIGHTS
    if legacy.is_file():
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a load error
            raise CheckpointError(legacy, f"cannot be read as a weights-only state dict ({exc})")
        if not isinstance(state, dict):
            raise CheckpointError(legacy, "does not hold a state dict")
        return legacy, state
    raise CheckpointError(path, "missing file (the weights must be in model.safetensors)")


def load_state_dict(model: HookedTransformer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``tensors`` into ``model`` after checking every name and shape against the config."""
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(path, f"unexpected tensors not in the config's architecture: "
                                    f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    missing = sorted(k for k in expected if k not in tensors and not _is_optional(k))
    if missing:
        raise CheckpointError(path, f"missing tensors: {missing[:5]}"
                                    f"{' …' if len(missing) > 5 else ''}")
    for name, target in expected.items():
        if name not in tensors:
            target.zero_()
            continue
        t = tensors[name]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(
                path, f"tensor {name} has shape {list(t.shape)} but config.json implies "
                      f"{list(target.shape)} (the config disagrees with the weights)")
        if not t.is_floating_point():
            raise CheckpointError(path, f"tensor {name} has non-float dtype {t.dtype}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise CheckpointError(path, f"tensor {name} holds NaN or infinite values")
        target.copy_(t)


def load_model(folder: str | Path, device: str = "cpu", name: Optional[str] = None) -> LoadedModel:
    """Load a model folder in our format, validating every file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "model folder does not exist")
    cfg = read_config(folder)
    weights_path, tensors = _read_tensors(folder)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        load_state_dict(model, tensors, weights_path)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    tok_path = folder / (cfg.tokenizer or TOKENIZER)
    if not tok_path.is_file():
        raise CheckpointError(tok_path, "missing tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
        raise CheckpointError(tok_path, f"not a valid HF tokenizers file ({exc})") from None
    if tokenizer.vocab_size > cfg.d_vocab:
        raise CheckpointError(tok_path, f"tokenizer has {tokenizer.vocab_size} tokens but "
                                        f"config.json says d_vocab = {cfg.d_vocab}")
    card: dict[str, Any] = {}
    card_path = folder / CARD
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(card_path, f"not valid JSON ({exc})") from None
    return LoadedModel(name=name or cfg.name or folder.name, model=model, tokenizer=tokenizer,
                       card=card, path=folder)


def save_model(model: HookedTransformer, tokenizer: Tokenizer, folder: str | Path,
               card: Optional[dict[str, Any]] = None) -> Path:
    """Write a model folder in our format (float32 safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save(folder / TOKENIZER)
    if card is not None:
        (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return folder
