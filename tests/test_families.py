"""Every JSON API endpoint and every page's main callback on each supported Hugging Face family.

Tiny random GPT-2 (learned positions), GPT-NeoX (partial rotary, parallel attention + MLP),
Llama (grouped-query attention) and Qwen2 (GQA, tied embeddings) folders are built with
``transformers`` in a temporary models directory and served by one ``create_server``.
An analysis that does not apply to a family must say so (a note or an alert), never show
numbers computed from weights the model does not have.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext

import dash
import numpy as np
import pytest

from attention_lens.components import page as P
from attention_lens.server import ServerConfig, create_server

if os.environ.get("CI") != "true":  # the hf extra is installed under CI: never skip there
    pytest.importorskip("transformers")

from tests.test_hf import build  # noqa: E402  (needs transformers)

FAMILIES = ("gpt2", "neox", "llama-gqa", "qwen2")
ROTARY = {"neox", "llama-gqa", "qwen2"}
GQA = {"llama-gqa": 2, "qwen2": 2}  # key/value heads (of 4 query heads)
PROMPT = "Harry Potter went to the shop. Harry Potter bought a wand. Harry Potter"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_tokenizer):
    """One server over a models directory holding one tiny folder per family."""
    root = tmp_path_factory.mktemp("families")
    for seed, family in enumerate(FAMILIES):
        build(family, root / family, tiny_tokenizer, seed=seed)
    app = create_server(ServerConfig(models_dirs=[root], model="gpt2",
                                     max_models=len(FAMILIES), cache_size=16))
    reg = app.server.extensions["attention_lens"]["registry"]
    assert sorted(reg.names()) == sorted(FAMILIES)
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.server.test_client()


@pytest.fixture(scope="module")
def reg(app):
    return app.server.extensions["attention_lens"]["registry"]


def page_module(path: str):
    """The module Dash imported for the page at ``path``."""
    return sys.modules[next(k for k, p in dash.page_registry.items() if p["path"] == path)]


def run_page(name: str, family: str, **controls) -> P.Drawn:
    """A page's callbacks on ``family`` with default controls (and ``controls``)."""
    st = {"model": family, "text": PROMPT, "pos": None, "src": "url"}
    return P.spec_of(name).render(st, **controls)


def texts(components) -> str:
    """All text inside a (list of) Dash components."""
    return json.dumps([c.to_plotly_json() if hasattr(c, "to_plotly_json") else c
                       for c in (components or [])], default=str)


def post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, (path, body, r.get_json())
    return r.get_json()


def get(client, path: str) -> dict:
    r = client.get(path)
    assert r.status_code == 200, (path, r.get_json())
    return r.get_json()


# ------------------------------------------------------------------------- JSON API
def test_models_lists_every_family(client):
    data = get(client, "/api/models")
    assert {m["name"] for m in data["models"]} == set(FAMILIES)
    assert all(m["kind"] == "huggingface" and m["size_bytes"] > 0 for m in data["models"])
    assert data["unavailable"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_endpoints(client, reg, family):
    lm = reg.get(family)
    fp = reg.forward(PROMPT, family)
    n, L, H = fp.n_tokens, lm.cfg.n_layers, lm.cfg.n_heads
    body = {"text": PROMPT, "model": family}

    data = post(client, "/api/predict", {**body, "top_k": 3})
    assert data["model"] == family and data["token_ids"] == fp.token_ids.tolist()
    probs = [p["probability"] for p in data["predictions"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1

    data = post(client, "/api/token-predictions", body)
    assert len(data["result"]["top_ids"]) == n

    data = post(client, "/api/attention", {**body, "layer": 1})
    pat = np.asarray(data["result"]["patterns"])
    assert pat.shape == (H, n, n) and np.allclose(pat.sum(-1), 1, atol=1e-5)
    data = post(client, "/api/attention", {**body, "layer": 0, "head": 1})
    assert np.asarray(data["result"]["pattern"]).shape == (n, n)

    data = post(client, "/api/activations", body)
    assert len(data["residual_stream"]["labels"]) == L + 1

    data = post(client, "/api/logit-lens", {**body, "top_k": 2})
    res = data["result"]
    assert res["stage_labels"][0] == "embeddings" and len(res["top_ids"][0]) == n
    assert res["top_ids"][-1] == np.argsort(-fp.logits.numpy(), -1)[:, :2].tolist()

    data = post(client, "/api/eigenvalues", {**body, "layer": 0, "head": 0})
    assert len(data["attention_spectrum"]["eigenvalues"]) == n
    assert -1 <= data["circuits"]["copying"]["full_ov"] <= 1

    data = post(client, "/api/induction-score", body)
    assert np.asarray(data["induction_scores"]).shape == (L, H)
    assert np.asarray(data["probe_induction_scores"]).shape == (L, H)

    data = post(client, "/api/attribution", body)
    res = data["result"]
    labels = res["labels"]
    assert ("pos_embed" in labels) is (family not in ROTARY)
    assert sum(1 for x in labels if x.startswith("L")) >= L * H
    target = res["target_id"]
    logit_target = float(fp.logits[-1, target]) - float(lm.model.b_U[target])
    assert abs(data["result"]["total"] - logit_target) < 1e-3

    data = post(client, "/api/ablation", {**body, "heads": [[1, 0], [0, 1]]})
    assert len(data["result"]["kl_per_position"]) == n


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_endpoints(client, reg, family):
    lm = reg.get(family)
    L, H, e = lm.cfg.n_layers, lm.cfg.n_heads, lm.cfg.d_head
    for circuit in ("OV", "QK"):
        data = get(client, f"/api/weights?model={family}&circuit={circuit}")
        s = np.asarray(data["result"]["singular_values"])
        assert s.shape == (L, H, e) and np.all(np.diff(s, axis=-1) <= 1e-9)
    data = get(client, f"/api/weights?model={family}&layer=1&head=1&top_k=4&n_directions=2")
    assert np.asarray(data["result"]["input_ids"]).shape == (2, 4)
    data = get(client, f"/api/embeddings?model={family}&max_tokens=100&text=Harry")
    assert np.asarray(data["result"]["coords"]).shape[0] == 100
    assert data["prompt"]["projection"]["coords"]
    data = post(client, "/api/analogy", {"model": family, "positive": ["Harry", "wand"],
                                         "negative": ["shop"], "top_k": 3})
    assert len(data["results"]) == 3


# ------------------------------------------------------------------------------ pages
@pytest.mark.parametrize("family", FAMILIES)
def test_every_page_runs(app, family):
    """Every declared page (from dash.page_registry) draws on every family."""
    names = [s.page for s in P.declared_pages()]
    assert len(names) >= 11
    for name in names:
        d = run_page(name, family)
        alert_text = " ".join(text for _, text in d.alerts)
        assert "analysis failed" not in alert_text, (name, alert_text)
        assert not [t for c, t in d.alerts if c == "danger"], (name, alert_text)
        assert d.drew, f"{name} drew nothing on {family}: {alert_text}"
        for fig in d.figures.values():
            if not fig.data:  # a placeholder says why it is empty
                assert fig.layout.annotations and fig.layout.annotations[0].text
        assert d.query["_src"] == "url"


@pytest.mark.parametrize("family", FAMILIES)
def test_overview_card(app, family):
    card, links = page_module("/").update({"model": family, "text": PROMPT})
    text = texts([card])
    assert family in text


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_fits_the_context_and_starts_with_bos(reg, family):
    from attention_lens.analysis.heads import max_probe_len, probe_head_scores

    lm = reg.get(family)
    probe = probe_head_scores(lm, batch=2)
    bos = family == "llama-gqa"  # Llama models always see BOS first; GPT-2, NeoX, Qwen2 do not
    assert lm.cfg.n_ctx == 64 and probe.seq_len == max_probe_len(lm) == (63 if bos else 64) // 2
    T = probe.seq_len
    assert probe.tokens.shape == (2, 2 * T + bos)
    if bos:
        assert (probe.tokens[:, 0] == lm.cfg.extra["bos_token_id"]).all()
        assert probe.bos == lm.cfg.extra["bos_token_id"]
        assert lm.cfg.extra["bos_token_id"] not in probe.tokens[:, 1:]
    assert np.array_equal(probe.tokens[:, bos:bos + T], probe.tokens[:, bos + T:])
    assert np.all((probe.induction >= 0) & (probe.induction <= 1))
    # the scores read the second half's rows, after BOS when there is one
    import torch

    name = "blocks.1.attn.hook_pattern"
    _, cache = lm.model.run_with_cache(torch.as_tensor(probe.tokens), names_filter=[name])
    A = cache[name].double()
    rows = torch.arange(T + bos, 2 * T + bos)
    manual = A[:, :, rows, rows - (T - 1)].mean((0, 2)).numpy()
    assert np.allclose(probe.induction[1], manual, atol=1e-6)
    prev_rows = torch.arange(1 + bos, 2 * T + bos)
    assert np.allclose(probe.previous_token[1],
                       A[:, :, prev_rows, prev_rows - 1].mean((0, 2)).numpy(), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_pages_say_what_does_not_apply(app, reg, family):
    """Rotary QK circuits hold at distance 0 only, GQA heads share K/V, NeoX stages are
    parallel, GPT-2's full QK leaves W_pos out: each page says so, in its own words."""
    lm = reg.get(family)
    rotary, kv = family in ROTARY, GQA.get(family)
    d = run_page("weights", family, circuit="QK")
    qk_text = " ".join(d.notes)
    assert ("Rotary positions" in qk_text) is rotary and d.errors == []
    if family == "neox":  # rotary_pct 0.5 of d_head 16
        assert "the first 8 of 16 query/key dimensions" in qk_text
    ov_text = " ".join(run_page("weights", family, circuit="OV").notes)
    assert "Rotary" not in ov_text
    assert (f"{kv} key/value heads serve 4 query heads" in ov_text) if kv else \
        "Grouped-query" not in ov_text
    eig_text = " ".join(run_page("eigenvalues", family).notes)
    assert ("Rotary positions" in eig_text) is rotary
    assert ("W_pos are left out" in eig_text) is (not rotary)
    assert ("Rotary positions" in " ".join(run_page("induction", family).notes)) is rotary
    lens = post_free_lens(reg, family)
    assert any("(parallel)" in s for s in lens.stage_labels) is (family == "neox")
    assert bool(lens.note) is (family == "neox")
    with pytest.raises(AttributeError, match="rotary") if rotary else nullcontext():
        assert lm.model.W_pos.shape[0] == 64


def post_free_lens(reg, family):
    """The logit lens of the prompt on ``family``."""
    from attention_lens.analysis.logit_lens import logit_lens

    return logit_lens(reg.get(family), reg.forward(PROMPT, family), k=2)


def test_device_option_reaches_the_registry(tmp_path):
    """``--device`` goes from ServerConfig to the registry; a device torch cannot use is a
    configuration error, not a failure on first model load."""
    import torch

    from attention_lens.server import ConfigError, build_registry

    reg = build_registry(ServerConfig(models_dirs=[tmp_path], device="cpu"))
    assert reg.device == "cpu"
    with pytest.raises(ConfigError, match="not a torch device"):
        build_registry(ServerConfig(models_dirs=[tmp_path], device="banana"))
    if torch.cuda.is_available():
        assert build_registry(ServerConfig(models_dirs=[tmp_path], device="cuda")).device == \
            "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            build_registry(ServerConfig(models_dirs=[tmp_path], device="cuda"))
