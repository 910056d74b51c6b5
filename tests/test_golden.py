"""The shipped models: golden logits, card claims recomputed, default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attention_lens.analysis.probe import ordinary_token_ids, probe_scores
from attention_lens.registry import DEFAULT_MODEL, DEFAULT_WEIGHTS

GOLDEN = json.loads((Path(__file__).parent / "golden.json").read_text())
PROMPT = "Harry Potter went to the shop. Harry Potter"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_top5(registry, name):
    lm = registry.get(name)
    gold = GOLDEN[name]
    ids = lm.tokenizer.encode(PROMPT)
    assert ids == gold["ids"]
    logits = lm.model(torch.tensor([ids]))[0, -1]
    top = logits.topk(5)
    assert top.indices.tolist() == gold["top5_ids"]
    np.testing.assert_allclose(top.values.numpy(), gold["top5_logits"], atol=1e-4)


def test_default_model_is_the_two_layer_induction_model(registry):
    """The default is the shipped model with two layers and an induction head, as the README
    says (its table marks it "(default)")."""
    assert registry.default == DEFAULT_MODEL
    lm = registry.get(registry.default)
    assert lm.cfg.n_layers == 2
    probe = lm.card["evaluation"]["induction_probe"]
    assert probe["max_layer"] == 1 and probe["max_score"] > 0.8
    readme = (DEFAULT_WEIGHTS.parent / "README.md").read_text(encoding="utf-8")
    assert f"| `{registry.default}` (default) |" in readme


@pytest.mark.parametrize("name", ["attn-only-1l", "attn-only-2l"])
def test_folder_under_30_mb(name):
    size = sum(p.stat().st_size for p in (DEFAULT_WEIGHTS / name).iterdir())
    assert size <= 30 * 2**20


def _probe(lm):
    eot = lm.tokenizer.hf.token_to_id("<|endoftext|>")
    return probe_scores(lm.model, ordinary_token_ids(lm.tokenizer.strings, special=[eot]),
                        seq_len=50, batch=10, seed=0)


def test_two_layer_model_has_induction_heads(model_2l):
    scores = _probe(model_2l)
    assert scores.induction.max() >= 0.6
    layer, head = np.unravel_index(scores.induction.argmax(), scores.induction.shape)
    assert layer == 1  # induction needs a previous layer to compose with
    card = model_2l.card["evaluation"]["induction_probe"]
    assert abs(card["max_score"] - scores.induction.max()) < 1e-3
    assert (card["max_layer"], card["max_head"]) == (layer, head)
    # the copyable half of the probe is predicted far better than the random half
    assert scores.loss_second_half < 0.5 * scores.loss_first_half


def test_one_layer_model_cannot_do_induction(model_1l):
    scores = _probe(model_1l)
    assert scores.induction.max() < 0.3
    assert scores.loss_second_half > 0.8 * scores.loss_first_half


def test_cards_record_validation_loss(model_1l, model_2l):
    c1, c2 = model_1l.card, model_2l.card
    for card, lm in ((c1, model_1l), (c2, model_2l)):
        assert card["training"]["command"].startswith("python -m attention_lens.training.train")
        assert card["data"]["sources"][0]["licence"] == "CC BY-SA 4.0"
        assert card["n_params"] == sum(p.numel() for p in lm.model.parameters())
    assert c1["evaluation"]["validation_text"] == c2["evaluation"]["validation_text"]
    assert c1["data"]["val_sha256"] == c2["data"]["val_sha256"]
    assert c2["evaluation"]["validation_loss"] < c1["evaluation"]["validation_loss"]
    assert "tiled" in c2["training"]["synthetic_note"]
