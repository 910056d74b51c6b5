"""Suite 1: every per-prompt analysis on a 128-token prompt with the shipped two-layer
model, the forward pass cached by the registry, and every weight analysis of that model."""

from __future__ import annotations

from typing import Callable, Optional

from ..model import LoadedModel
from ..model.texts import BENCH_TEXT
from ..registry import DEFAULT_WEIGHTS, Registry
from .measure import _header, _optional, _row, measure


def bench_prompt(reps: int) -> None:
    """Per-prompt analyses on a 128-token prompt with the shipped two-layer model."""
    from ..analysis.composition import composition_scores
    from ..analysis.eigen import attention_spectrum
    from ..analysis.embeddings import project_tokens
    from ..analysis.forward import run_forward
    from ..analysis.heads import head_detection, probe_head_scores

    reg = Registry([DEFAULT_WEIGHTS])
    lm = reg.get("attn-only-2l")
    ids = lm.tokenizer.encode(BENCH_TEXT)[:128]
    text = lm.tokenizer.decode(ids)
    fp = reg.forward(text, lm.name)
    _header(f"Per-prompt analyses, {lm.name}, {fp.n_tokens}-token prompt "
            f"(forward pass cached by the registry)")
    _row("forward pass (cold, run_forward)", measure(lambda: run_forward(lm, text), reps))
    _row("forward pass (registry cache hit)", measure(lambda: reg.forward(text, lm.name), reps))
    from .. import weight_analyses as W

    store = W.store()  # the shared store of weight analyses (computed once, then kept)
    probe, eigen, pca = store.get_or_compute(lm, W.probe_head_scores(), W.circuit_eigenvalues(),
                                             W.embedding_pca(n_components=2))
    cases: list[tuple[str, Optional[Callable], dict]] = [
        ("predictions.next_token", _optional("predictions", "next_token"), dict(k=10)),
        ("predictions.token_predictions", _optional("predictions", "token_predictions"),
         dict(k=5)),
        ("attention.attention_patterns", _optional("attention", "attention_patterns"), {}),
        ("attention.residual_stream", _optional("attention", "residual_stream"), {}),
        ("attention.head_outputs", _optional("attention", "head_outputs"), {}),
        ("logit_lens.logit_lens", _optional("logit_lens", "logit_lens"), dict(k=5)),
        ("attribution.logit_attribution", _optional("attribution", "logit_attribution"), {}),
        ("ablation.ablate_heads (2 heads, zero)", _optional("ablation", "ablate_heads"),
         dict(heads=[(1, 5), (1, 0)])),
        ("eigen.attention_spectrum", attention_spectrum, {}),
        ("heads.head_detection (cached probe/eigen)", head_detection,
         dict(probe=probe, eigen=eigen)),
    ]
    for name, fn, kwargs in cases:
        if fn is not None:
            _row(name, measure(lambda fn=fn, kw=kwargs: fn(lm, fp, **kw), reps))
    _row("embeddings.project_tokens (prompt)",
         measure(lambda: project_tokens(lm, pca, fp.token_ids), reps))
    lens = _optional("logit_lens", "logit_lens")
    if lens is not None:
        def second_page() -> None:
            lens(lm, reg.forward(text, lm.name), k=5)

        def without_cache() -> None:
            lens(lm, run_forward(lm, text), k=5)
        a, b = measure(second_page, reps), measure(without_cache, reps)
        _row("second page: cache hit + logit_lens", a,
             f"(vs {b['median_s'] * 1e3:.1f} ms with a fresh forward pass)")

    _header(f"Weight analyses, {lm.name} (computed once per model, then cached)")
    weight_cases = _weight_cases(lm, include_vocab=True)
    weight_cases.append(("probe_head_scores (T=50, B=10)", lambda: probe_head_scores(lm)))
    weight_cases.append(("composition_scores", lambda: composition_scores(lm)))
    for name, fn in weight_cases:
        _row(name, measure(fn, reps))
    _row("weight store hit (in-process memo)", measure(
        lambda: store.get(lm, W.circuit_eigenvalues()), reps))


def _weight_cases(lm: LoadedModel, include_vocab: bool) -> list[tuple[str, Callable]]:
    from ..analysis.analogy import analogy
    from ..analysis.circuits import circuit_svd
    from ..analysis.eigen import circuit_eigenvalues, copying_score, full_ov_eigenvalues
    from ..analysis.embeddings import embedding_pca, nearest_neighbours

    cases = [
        ("OV SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "OV")),
        ("QK SVD (all heads, 3 directions read)", lambda: circuit_svd(lm, "QK")),
        ("full-OV eigenvalues + copying scores",
         lambda: copying_score(full_ov_eigenvalues(lm))),
        ("all circuit eigenvalues (OV, full OV, QK, full QK)",
         lambda: circuit_eigenvalues(lm)),
    ]
    if include_vocab:
        cases += [
            ("embedding_pca (2000 frequent tokens, k=8)", lambda: embedding_pca(lm)),
            ("nearest_neighbours", lambda: nearest_neighbours(lm, "king")),
            ("analogy 3CosAdd", lambda: analogy(lm, ["king", "woman"], ["man"])),
        ]
    return cases
