"""The registry's caches hold their byte caps: forward passes with their per-prompt results,
weight analyses; concurrent requests for one prompt run the model once."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from attention_lens import registry as registry_module
from attention_lens.analysis.logit_lens import logit_lens
from attention_lens.registry import Registry, nbytes_of


@dataclass(frozen=True)
class Result:
    """A stand-in analysis result."""

    values: np.ndarray
    labels: np.ndarray
    tensor: torch.Tensor


def test_nbytes_of_counts_arrays_tensors_strings_and_shared_objects_once():
    arr = np.zeros((10, 10))
    labels = np.array([str(i) * 100 for i in range(3)], dtype=object)
    res = Result(arr, labels, torch.zeros(5, dtype=torch.float64))
    n = nbytes_of(res)
    assert n >= arr.nbytes + 3 * 100 + 40
    assert nbytes_of([res, res]) < 2 * n  # the same result listed twice counts once
    assert nbytes_of({"a": arr}) >= 800 and nbytes_of(None) == 0


@pytest.fixture
def reg(tiny):
    reg = Registry([])
    reg.add(tiny)
    return reg


PROMPTS = [f"Harry Potter went to shop number {i}, and Harry Potter bought a wand." for i in
           range(12)]


def test_forward_cache_holds_its_byte_cap_with_per_prompt_results(reg, tiny):
    one = reg.forward(PROMPTS[0], "tiny")
    lens = reg.per_prompt(one, ("lens", 3), lambda: logit_lens(tiny, one, k=3))
    assert reg.per_prompt(one, ("lens", 3), lambda: pytest.fail("recomputed")) is lens
    info = reg.cache_info()
    assert info["per_prompt"] == 1
    assert info["forward_bytes"] == one.nbytes + nbytes_of(lens)
    # room for about three passes with their lens: older ones go, the cap holds
    reg.max_forward_bytes = 3 * (one.nbytes + nbytes_of(lens)) + 1000
    for text in PROMPTS:
        fp = reg.forward(text, "tiny")
        reg.per_prompt(fp, ("lens", 3), lambda fp=fp: logit_lens(tiny, fp, k=3))
        assert reg.cache_info()["forward_bytes"] <= reg.max_forward_bytes
    assert 2 <= reg.cache_info()["forward"] <= 4
    # an evicted pass's results went with it
    fresh = reg.forward(PROMPTS[0], "tiny")
    assert fresh is not one
    calls = []
    reg.per_prompt(fresh, ("lens", 3), lambda: calls.append(1) or logit_lens(tiny, fresh, k=3))
    assert calls == [1]


def test_per_prompt_results_of_a_pass_no_longer_cached_are_not_kept(reg, tiny):
    fp = reg.forward(PROMPTS[0], "tiny")
    reg.max_forward = 1
    reg.forward(PROMPTS[1], "tiny")  # evicts fp
    reg.per_prompt(fp, "x", lambda: np.zeros(10))
    assert reg.cache_info()["per_prompt"] == 0


def test_weight_cache_holds_its_byte_cap(reg):
    reg.max_weights_bytes = 10 * 8000 + 5000
    for i in range(30):
        reg.weights("tiny", ("w", i), lambda lm: np.zeros(1000))  # 8,000 bytes each
        assert reg.cache_info()["weights_bytes"] <= reg.max_weights_bytes
    assert reg.cache_info()["weights"] == 10
    calls = []
    reg.weights("tiny", ("w", 29), lambda lm: calls.append(1))
    reg.weights("tiny", ("w", 0), lambda lm: calls.append(2) or np.zeros(1))
    assert calls == [2]  # the newest stayed, the oldest was recomputed


def test_concurrent_requests_for_one_prompt_run_the_model_once(reg, monkeypatch):
    calls = []
    real = registry_module.run_forward
    gate = threading.Event()

    def slow(*args, **kwargs):
        calls.append(1)
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry_module, "run_forward", slow)
    out = []
    threads = [threading.Thread(target=lambda: out.append(reg.forward(PROMPTS[3], "tiny")))
               for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(out) == 4 and all(fp is out[0] for fp in out)


def test_memory_bound_adds_the_caps_and_the_models(reg, tiny):
    params = sum(t.numel() * t.element_size() for t in tiny.model.state_dict().values())
    assert reg.memory_bound() == reg.max_forward_bytes + reg.max_weights_bytes + params


def test_logit_lens_page_reuses_the_lens_cached_with_its_forward_pass(registry):
    from attention_lens.server.app import create_app
    from attention_lens.components import page as P

    create_app(registry)
    state = {"model": "attn-only-2l", "text": "Ron met Luna. Ron met",
             "pos": None}
    before = registry.cache_info()["per_prompt"]
    first = P.page_panels("logit-lens", state, {})
    assert registry.cache_info()["per_prompt"] == before + 1
    again = P.page_panels("logit-lens", state, {})
    assert registry.cache_info()["per_prompt"] == before + 1
    assert again[0].data is first[0].data  # the same result object, not recomputed
