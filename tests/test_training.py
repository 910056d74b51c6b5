"""Training: a short run on a tiny corpus lowers the loss and writes a loadable folder."""

from __future__ import annotations

import json

from attention_lens.model import load_model
from attention_lens.training.corpus import is_validation
from attention_lens.training.train import Phase, TrainConfig, main, train

from .conftest import TINY_TEXT


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [TINY_TEXT[i:i + 300] for i in range(0, len(TINY_TEXT), 150)]
    (corpus / "train.txt").write_text("\n\n".join(docs * 3))
    (corpus / "val.txt").write_text("\n\n".join(docs[:4]))
    (corpus / "sources.json").write_text(json.dumps({"sources": [], "val_sha256": "x"}))
    return corpus


def test_short_run_lowers_loss(tmp_path):
    corpus = _corpus(tmp_path)
    cfg = TrainConfig(
        name="smoke",
        model=dict(n_layers=1, d_model=32, n_heads=2, d_head=16, n_ctx=32, attn_only=True),
        phases=[Phase(steps=40, lr=3e-3, tiled_fraction=0.25, warmup=5)],
        batch_size=8, eval_every=20, checkpoint_every=20, val_windows=8, vocab_size=300,
    )
    card = train(cfg, tmp_path / "weights" / "smoke", corpus, tmp_path / "tok.json", "cpu",
                 resume=False, command="test")
    ev = card["evaluation"]
    assert ev["validation_loss"] < ev["initial_validation_loss"] - 0.5
    assert card["training"]["steps"] == 40
    assert card["training"]["synthetic_tiled_tokens"] == 40 * 2 * 32
    lm = load_model(tmp_path / "weights" / "smoke")
    assert lm.card["evaluation"]["validation_loss"] == ev["validation_loss"]
    assert (tmp_path / "weights" / ".runs" / "smoke" / "state.pt").is_file()


def test_resume_continues_from_checkpoint(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "name": "resume", "vocab_size": 300, "batch_size": 4, "eval_every": 5,
        "checkpoint_every": 5, "val_windows": 4,
        "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16},
        "phases": [{"steps": 10, "lr": 0.001, "warmup": 2}]}))
    args = ["--config", str(config), "--corpus", str(corpus), "--tokenizer",
            str(tmp_path / "tok.json"), "--out", str(tmp_path / "w" / "resume"), "--device", "cpu"]
    main(args)
    main(args + ["--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 10" in out
    assert load_model(tmp_path / "w" / "resume").card["training"]["steps"] == 10


def test_validation_split_is_deterministic():
    docs = [f"document number {i}" for i in range(2000)]
    first = [d for d in docs if is_validation(d, 0.05)]
    assert first == [d for d in reversed(docs) if is_validation(d, 0.05)][::-1]
    assert 50 < len(first) < 150
