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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .jsonfile import JsonFileError, read_json
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


def read_json_file(path: Path) -> Any:
    """A JSON side file of a model folder (bounded size and depth), or a CheckpointError."""
    try:
        return read_json(path)
    except JsonFileError as exc:
        raise CheckpointError(path, str(exc)) from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None


def inside(folder: Path, name: str, config: Path) -> Path:
    """``folder / name`` if it stays inside ``folder`` (symbolic links resolved)."""
    path = folder / name
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):
        raise CheckpointError(config, f"the path {name!r} points outside the model folder") \
            from None
    return path


def read_config(folder: Path) -> ModelConfig:
    """Parse and validate ``config.json`` (sizes bounded, the tokenizer inside the folder)."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(path, "missing file (every model folder needs config.json)")
    data = read_json_file(path)
    try:
        cfg = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, str(exc)) from None
    inside(folder, cfg.tokenizer or TOKENIZER, path)
    return cfg


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({exc})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a model of ``cfg`` has, without allocating its weights."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HookedTransformer(cfg).state_dict().items()}


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse a config that disagrees with the weights' names and shapes, before allocating."""
    layers = {int(k.split(".")[1]) for k in shapes
              if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if cfg.n_layers > len(layers):  # before even describing the model: n_layers is bounded
        raise CheckpointError(path, f"the weights hold {len(layers)} layer(s) but config.json "
                                    f"says n_layers = {cfg.n_layers}")
    compare_shapes(expected_shapes(cfg), shapes, path)


def compare_shapes(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]],
                   path: Path) -> None:
    """Every tensor the architecture needs is present with its shape, and nothing else."""
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise CheckpointError(path, f"unexpected tensors not in the config's architecture: "
                                    f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    missing = sorted(k for k in expected if k not in shapes and not _is_optional(k))
    if missing:
        raise CheckpointError(path, f"missing tensors: {missing[:5]}"
                                    f"{' …' if len(missing) > 5 else ''}")
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(path, f"tensor {name} has shape {list(shapes[name])} but "
                                        f"config.json implies {list(shape)} (the config "
                                        "disagrees with the weights)")


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
    compare_shapes({k: tuple(v.shape) for k, v in expected.items()},
                   {k: tuple(t.shape) for k, t in tensors.items()}, path)
    for name, target in expected.items():
        if name not in tensors:
            target.zero_()
            continue
        t = tensors[name]
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
    if (folder / WEIGHTS).is_file():
        check_shapes(cfg, tensor_shapes(folder / WEIGHTS), folder / WEIGHTS)
    weights_path, tensors = _read_tensors(folder)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, weights_path)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        load_state_dict(model, tensors, weights_path)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    tok_path = inside(folder, cfg.tokenizer or TOKENIZER, folder / CONFIG)
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
        card = read_json_file(card_path)
        if not isinstance(card, dict):
            raise CheckpointError(card_path, "the model card must be a JSON object")
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
