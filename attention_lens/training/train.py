"""Train a model folder from a JSON config.

``python -m attention_lens.training.train --config attention_lens/training/configs/attn-only-2l.json
--out weights/attn-only-2l --device cuda``

Training runs in phases; each phase sets a learning rate, a number of steps and the
fraction of batch rows replaced by a random token segment tiled to the full context
(synthetic repeats that make induction heads form at this budget; disclosed in the card).
A phase may stop early once the best induction score passes ``until_induction``.
Checkpoints (model + optimizer + step) are written every ``checkpoint_every`` steps to
``<out>/../.runs/<name>/`` and resumed with ``--resume``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..analysis.probe import ordinary_token_ids, probe_scores
from ..model.checkpoint import save_model
from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer
from ..model.transformer import HookedTransformer

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class Phase:
    """One stage of the curriculum."""

    steps: int
    lr: float
    tiled_fraction: float = 0.0
    until_induction: Optional[float] = None
    warmup: int = 100
    decay: bool = False


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    name: str
    model: dict[str, Any]
    phases: list[Phase]
    batch_size: int = 32
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 500
    val_windows: int = 400
    vocab_size: int = 4096
    tiled_period: tuple[int, int] = (8, 64)
    tiled_min_id: int = 256
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> "TrainConfig":
        """Read a JSON training config."""
        data = json.loads(Path(path).read_text())
        data["phases"] = [Phase(**p) for p in data["phases"]]
        for key in ("betas", "tiled_period"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


# --------------------------------------------------------------------------- data
def tokenizer_for(corpus: Path, path: Path, vocab_size: int) -> Tokenizer:
    """Load the tokenizer at ``path``, training it on ``corpus/train.txt`` if absent."""
    if path.is_file():
        return Tokenizer.from_file(path)
    text = (corpus / "train.txt").read_text(encoding="utf-8")
    docs = text.split("\n\n")
    tok = Tokenizer.train(docs, vocab_size=vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def token_stream(corpus: Path, split: str, tok: Tokenizer, cache_dir: Path) -> np.ndarray:
    """Token ids of ``corpus/<split>.txt`` (documents joined by end-of-text), cached as .npy."""
    text_path = corpus / f"{split}.txt"
    key = hashlib.sha256(text_path.read_bytes() + tok.hf.to_str().encode()).hexdigest()[:16]
    cached = cache_dir / f"{split}-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    eot = tok.hf.token_to_id("<|endoftext|>")
    docs = text_path.read_text(encoding="utf-8").split("\n\n")
    ids: list[int] = []
    encs = tok.hf.encode_batch(docs, add_special_tokens=False)
    for enc in tqdm(encs, desc=f"tokenize {split}", unit="doc"):
        ids.extend(enc.ids)
        if eot is not None:
            ids.append(eot)
    arr = np.asarray(ids, dtype=np.uint16 if tok.vocab_size < 65536 else np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, arr)
    return arr


class Batches:
    """Random context windows of natural text, some rows replaced by tiled random segments."""

    def __init__(self, stream: np.ndarray, cfg: TrainConfig, n_ctx: int, d_vocab: int,
                 seed: int) -> None:
        self.stream, self.cfg, self.n_ctx, self.d_vocab = stream, cfg, n_ctx, d_vocab
        self.rng = np.random.default_rng(seed)

    def next(self, tiled_fraction: float) -> torch.Tensor:
        """A [batch, n_ctx] int64 batch."""
        b, n = self.cfg.batch_size, self.n_ctx
        starts = self.rng.integers(0, len(self.stream) - n, size=b)
        rows = np.stack([self.stream[s:s + n] for s in starts]).astype(np.int64)
        n_tiled = int(round(tiled_fraction * b))
        lo, hi = self.cfg.tiled_period
        for r in range(n_tiled):
            period = int(self.rng.integers(lo, hi + 1))
            seg = self.rng.integers(self.cfg.tiled_min_id, self.d_vocab, size=period)
            offset = int(self.rng.integers(0, period))
            rows[r] = np.tile(seg, n // period + 2)[offset:offset + n]
        return torch.from_numpy(rows)


def validation_windows(stream: np.ndarray, n_ctx: int, count: int) -> torch.Tensor:
    """Deterministic, evenly spaced, non-overlapping windows of the validation stream."""
    count = min(count, len(stream) // n_ctx)
    step = len(stream) // count
    return torch.from_numpy(np.stack([stream[i * step:i * step + n_ctx]
                                      for i in range(count)]).astype(np.int64))


@torch.no_grad()
def validation_loss(model: HookedTransformer, windows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token loss over ``windows``."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch].to(model.device)
        nll = model.loss(chunk, per_token=True)
        total += float(nll.sum())
        n += nll.numel()
    model.train()
    return total / n


# ------------------------------------------------------------------------ training
def lr_at(phase: Phase, step_in_phase: int) -> float:
    """Linear warm-up, then constant or cosine decay to 10%."""
    if step_in_phase < phase.warmup:
        return phase.lr * (step_in_phase + 1) / phase.warmup
    if not phase.decay:
        return phase.lr
    frac = (step_in_phase - phase.warmup) / max(1, phase.steps - phase.warmup)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def save_state(path: Path, model: HookedTransformer, opt: torch.optim.Optimizer,
               state: dict[str, Any]) -> None:
    """Write a resumable checkpoint (tensors and plain numbers only: weights_only loadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                "state": json.dumps(state)}, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig, out: Path, corpus: Path, tokenizer_path: Path, device: str,
          resume: bool, command: str) -> dict[str, Any]:
    """Train, then write the model folder ``out`` with its card; return the card."""
    torch.manual_seed(cfg.seed)
    tok = tokenizer_for(corpus, tokenizer_path, cfg.vocab_size)
    cache_dir = tokenizer_path.parent / "tokens"
    train_ids = token_stream(corpus, "train", tok, cache_dir)
    val_ids = token_stream(corpus, "val", tok, cache_dir)
    mcfg = ModelConfig(**(cfg.model | {"d_vocab": tok.vocab_size, "name": cfg.name}))
    model = HookedTransformer(mcfg).init_weights(cfg.seed).to(device).train()
    decay = [p for n, p in model.named_parameters() if n.split(".")[-1].startswith("W_")]
    no_decay = [p for n, p in model.named_parameters() if not n.split(".")[-1].startswith("W_")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.phases[0].lr, betas=cfg.betas)
    batches = Batches(train_ids, cfg, mcfg.n_ctx, mcfg.d_vocab, cfg.seed)
    val_windows = validation_windows(val_ids, mcfg.n_ctx, cfg.val_windows)
    probe_len = min(50, mcfg.n_ctx // 2)
    probe_ids = ordinary_token_ids(tok.strings, special=[tok.hf.token_to_id("<|endoftext|>")])
    state: dict[str, Any] = {"phase": 0, "step_in_phase": 0, "step": 0, "tokens": 0,
                             "tokens_tiled": 0, "seconds": 0.0, "history": [],
                             "phase_steps": [0] * len(cfg.phases)}
    ckpt = out.parent / ".runs" / cfg.name / "state.pt"
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        state = json.loads(saved["state"])
        batches.rng = np.random.default_rng([cfg.seed, state["step"]])
        print(f"resumed from {ckpt} at step {state['step']}")
    if "initial_val_loss" not in state:
        state["initial_val_loss"] = round(validation_loss(model, val_windows), 4)
    total_steps = sum(p.steps for p in cfg.phases)
    bar = tqdm(total=total_steps, initial=state["step"], desc=cfg.name, unit="step")
    t0 = time.time() - state["seconds"]
    while state["phase"] < len(cfg.phases):
        phase = cfg.phases[state["phase"]]
        if state["step_in_phase"] >= phase.steps:
            state["phase"] += 1
            state["step_in_phase"] = 0
            continue
        lr = lr_at(phase, state["step_in_phase"])
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches.next(phase.tiled_fraction).to(device)
        loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        n_tiled = int(round(phase.tiled_fraction * cfg.batch_size))
        state["step"] += 1
        state["step_in_phase"] += 1
        state["phase_steps"][state["phase"]] += 1
        state["tokens"] += x.numel()
        state["tokens_tiled"] += n_tiled * mcfg.n_ctx
        bar.update(1)
        done_phase = state["step_in_phase"] >= phase.steps
        if state["step"] % cfg.eval_every == 0 or done_phase:
            val = validation_loss(model, val_windows)
            probe = probe_scores(model, probe_ids, seq_len=probe_len)
            best = float(probe.induction.max())
            state["history"].append({"step": state["step"], "phase": state["phase"],
                                     "train_loss": round(float(loss.detach()), 4),
                                     "val_loss": round(val, 4), "induction_max": round(best, 4)})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val=f"{val:.3f}",
                            induction=f"{best:.2f}")
            if phase.until_induction is not None and best >= phase.until_induction:
                tqdm.write(f"phase {state['phase']} reached induction {best:.3f} "
                           f"at step {state['step']}")
                bar.total -= phase.steps - state["step_in_phase"]
                bar.refresh()
                state["step_in_phase"] = phase.steps
        if state["step"] % cfg.checkpoint_every == 0:
            state["seconds"] = time.time() - t0
            save_state(ckpt, model, opt, state)
    bar.close()
    state["seconds"] = time.time() - t0
    save_state(ckpt, model, opt, state)
    model.eval()
    val = validation_loss(model, val_windows)
    probe = probe_scores(model, probe_ids, seq_len=probe_len)
    li, hi = np.unravel_index(int(probe.induction.argmax()), probe.induction.shape)
    card = {
        "name": cfg.name,
        "description": cfg.description,
        "architecture": {"n_layers": mcfg.n_layers, "d_model": mcfg.d_model,
                         "n_heads": mcfg.n_heads, "d_head": mcfg.d_head, "n_ctx": mcfg.n_ctx,
                         "d_vocab": mcfg.d_vocab, "attn_only": mcfg.attn_only,
                         "normalization_type": mcfg.normalization_type},
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "data": json.loads((corpus / "sources.json").read_text()),
        "tokenizer": {"type": "byte-level BPE (HF tokenizers)", "vocab_size": tok.vocab_size,
                      "trained_on": "train split of the corpus"},
        "training": {
            "steps": state["step"], "tokens_seen": state["tokens"],
            "synthetic_tiled_tokens": state["tokens_tiled"],
            "synthetic_note": ("Some batch rows were replaced by a random token segment "
                               f"(period {cfg.tiled_period[0]}-{cfg.tiled_period[1]}, ids >= "
                               f"{cfg.tiled_min_id}) tiled to the full context, so that "
                               "induction heads form at this budget."
                               if state["tokens_tiled"] else "Natural text only."),
            "phases": [{"lr": p.lr, "planned_steps": p.steps, "steps_run": s,
                        "tiled_fraction": p.tiled_fraction,
                        "until_induction": p.until_induction, "cosine_decay": p.decay}
                       for p, s in zip(cfg.phases, state["phase_steps"])],
            "batch_size": cfg.batch_size, "optimizer": "AdamW", "betas": list(cfg.betas),
            "weight_decay": cfg.weight_decay, "seed": cfg.seed,
            "seconds": round(state["seconds"], 1), "device": _device_name(device),
            "torch": torch.__version__, "python": platform.python_version(),
            "command": command, "date": dt.date.today().isoformat(),
            "history": state["history"],
        },
        "evaluation": {
            "validation_loss": round(val, 4),
            "initial_validation_loss": state.get("initial_val_loss"),
            "validation_tokens": int(val_windows.numel()),
            "validation_text": "val split of the corpus (sha256 in data.val_sha256), "
                               f"{len(val_windows)} windows of {mcfg.n_ctx} tokens",
            "induction_probe": {"seq_len": probe_len, "batch": 10, "seed": 0,
                                "max_score": round(float(probe.induction.max()), 4),
                                "max_layer": int(li), "max_head": int(hi),
                                "scores": np.round(probe.induction, 4).tolist(),
                                "previous_token_scores": np.round(probe.previous_token, 4).tolist(),
                                "loss_first_half": round(probe.loss_first_half, 4),
                                "loss_second_half": round(probe.loss_second_half, 4)},
        },
    }
    save_model(model.cpu(), tok, out, card)
    return card


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="Train an Attention Lens model folder.")
    ap.add_argument("--config", type=Path, required=True,
                    help="JSON training config (see attention_lens/training/configs/)")
    ap.add_argument("--out", type=Path, help="model folder to write (default weights/<name>)")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer.json"),
                    help="tokenizer.json to use; trained on the corpus if missing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every phase's steps (for smoke runs)")
    args = ap.parse_args(argv)
    cfg_path = args.config if args.config.is_file() else CONFIG_DIR / f"{args.config}.json"
    cfg = TrainConfig.from_file(cfg_path)
    if args.steps_scale != 1.0:
        for p in cfg.phases:
            p.steps = max(1, int(p.steps * args.steps_scale))
    out = args.out or Path("weights") / cfg.name
    command = "python -m attention_lens.training.train " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    card = train(cfg, out, args.corpus, args.tokenizer, args.device, args.resume, command)
    print(json.dumps(card["evaluation"] | {"n_params": card["n_params"],
                                           "seconds": card["training"]["seconds"],
                                           "tokens_seen": card["training"]["tokens_seen"]},
                     indent=2))


if __name__ == "__main__":
    main()
