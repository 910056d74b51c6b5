"""Shared fixtures: a seeded tiny random model, the shipped models, a registry."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from attention_lens import background
from attention_lens.model import HookedTransformer, LoadedModel, ModelConfig, Tokenizer
from attention_lens.registry import DEFAULT_WEIGHTS, Registry

ROOT = Path(__file__).resolve().parent.parent
# background jobs and weight analyses of the tests live in a folder of this run, never in the
# user's cache (subprocesses started by tests inherit it)
os.environ["ATTENTION_LENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="al-cache-")
# float32 results depend on how many threads split a reduction: one fixed number, whatever
# the machine's cores or the run's CPU affinity (``taskset -c 0`` gives torch one by default)
TORCH_THREADS = int(os.environ.get("ATTENTION_LENS_TEST_THREADS", "2"))
torch.set_num_threads(TORCH_THREADS)
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Harry Potter went to the shop, "
    "and Harry Potter bought a wand. Mr and Mrs Dursley were proud to say that they "
    "were perfectly normal, thank you very much.\n\tTabs and emoji 🙂 too. "
) * 4


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on a few sentences."""
    return Tokenizer.train([TINY_TEXT], vocab_size=300)


def make_tiny(tokenizer: Tokenizer, seed: int = 0, **overrides) -> LoadedModel:
    """A seeded random model; ``overrides`` change the config (e.g. normalization_type)."""
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=64,
               d_vocab=tokenizer.vocab_size, attn_only=True, name="tiny")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = HookedTransformer(ModelConfig(**cfg)).init_weights(seed, std=0.2).eval()
    with torch.no_grad():  # non-zero biases so every identity is exercised
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b"):
                p.normal_(0, 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=cfg["name"], model=model, tokenizer=tokenizer)


@pytest.fixture
def tiny(tiny_tokenizer) -> LoadedModel:
    """Two-layer attention-only random model."""
    return make_tiny(tiny_tokenizer)


@pytest.fixture
def tiny_ln(tiny_tokenizer) -> LoadedModel:
    """Two-layer model with LayerNorm and GELU MLPs."""
    return make_tiny(tiny_tokenizer, seed=1, attn_only=False, d_mlp=64, act_fn="gelu",
                     normalization_type="LN", name="tiny-ln")


@pytest.fixture(scope="session")
def registry() -> Registry:
    """A registry over the shipped weights."""
    return Registry([DEFAULT_WEIGHTS])


@pytest.fixture(scope="session")
def model_2l(registry) -> LoadedModel:
    """The shipped two-layer model."""
    return registry.get("attn-only-2l")


@pytest.fixture(scope="session")
def model_1l(registry) -> LoadedModel:
    """The shipped one-layer model."""
    return registry.get("attn-only-1l")


@pytest.fixture
def tmp_copy(tmp_path):
    """Copy a shipped model folder into tmp_path (for corruption tests)."""
    def copy(name: str = "attn-only-1l") -> Path:
        dst = tmp_path / name
        shutil.copytree(DEFAULT_WEIGHTS / name, dst)
        return dst
    return copy


# ----------------------------------------------------------------- browser tests
try:  # the hook exists only with dash[testing]; the model and analysis tests run without it
    import dash.testing  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    import socket

    from dash.testing.application_runners import BaseDashRunner

    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # dash_duo numbers its servers from 8050 upwards; start at a free port instead so that
    # two test runs on one machine (or a developer's app on 8050) never collide.
    BaseDashRunner._next_port = _free_port()

    def pytest_setup_options():
        """Chromium options for dash_duo (Debian chromium, headless, no background network)."""
        from selenium.webdriver.chrome.options import Options

        opts = Options()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    # Bootstrap scrolls smoothly; a test that scrolls and then reads a
                    # position must not read it mid-scroll (clicks then land elsewhere)
                    "--force-prefers-reduced-motion",
                    f"--user-data-dir={tempfile.mkdtemp(prefix='al-chrome-')}"):
            opts.add_argument(arg)
        return opts


@contextlib.contextmanager
def restored_background():
    """Put back the process's background after code that installs its own (an app factory)."""
    old = background._CURRENT
    try:
        yield
    finally:
        background._CURRENT = old


@pytest.fixture
def bg(tmp_path):
    """A fresh background (disk caches in a temporary folder), installed for the test."""
    with restored_background():
        yield background.install(background.create(tmp_path / "cache", max_jobs=2))


@pytest.fixture
def client(registry, bg):
    """A test client of the app with its API (``/api``) over the test registry and a fresh
    background (the declared analyses' endpoints, pages and caches together)."""
    from attention_lens.server.api import create_api
    from attention_lens.server.app import create_app

    app = create_app(registry, background=bg)
    app.server.register_blueprint(create_api(registry), url_prefix="/api")
    return app.server.test_client()


@pytest.fixture(autouse=True)
def _fresh_export_browser_after_browser_tests(request):
    """dash_duo stops its server by killing every thread started during the test, the
    shared export browser's threads included: throw that browser away after such a test."""
    yield
    if "dash_duo" in request.fixturenames:
        from attention_lens import export

        export._RENDERER.reset()


# ------------------------------------------------------------------------ tiers
#: Files whose tests drive a real Chromium without dash_duo (figure export through kaleido).
BROWSER_FILES = {"test_security_export.py"}
#: Files whose tests start real servers (gunicorn, Redis, Celery workers) as subprocesses.
SERVER_FILES = {"test_background.py", "test_security_server.py", "test_server_slow.py",
                "test_store_lock.py",
                "test_memory_soak.py"}
#: Files that build GPT-2-shaped models or long prompts (seconds to minutes a test).
SCALE_FILES = {"test_attention_scale.py", "test_browser_scale.py", "test_figures_scale.py",
               "test_heads_scale.py", "test_registry_memory.py"}
#: Names in a test module that build the app, its server or its pages' callbacks.
CALLBACK_NAMES = {"create_app", "create_server", "create_api", "page_panels", "spec_of",
                  "page_registry"}
#: Fixtures that stand for the app or its background.
CALLBACK_FIXTURES = {"bg", "client", "server", "app", "pages", "recipe_app"}
#: The oracle's entry points (``tests/tl_oracle.py`` and TransformerLens itself).
ORACLE_NAMES = {"to_transformer_lens", "tl_tokens", "HookedTransformerConfig", "detect_head",
                "transformer_lens"}
#: Exactness checks that recompute every head, cell or pair by an independent route (the
#: model rerun once per head, a two-pass reference, the whole grid unchunked): the slowest
#: in-process tests (each over 20 s on a loaded 2-core machine), grouped with the
#: TransformerLens comparisons so the fast tier leaves them out.
REFERENCE_CHECKS = {
    "test_ablation_sweep.py::test_sweep_equals_each_single_head_rerun",
    "test_qk_attribution.py::test_induction_heads_read_the_previous_token_head",
    "test_patching.py::test_path_patching_equals_two_pass_reference",
    "test_patching.py::test_self_patch_changes_nothing",
    "test_patching.py::test_denoising_the_embedding_reproduces_the_clean_metric",
    "test_patching.py::test_pairs_average_the_per_pair_grids",
    "test_patching.py::test_attribution_is_exact_where_the_metric_is_linear",
    "test_patching.py::test_path_table_matches_single_senders",
    "test_logit_lens_chunks.py::test_chunked_lens_equals_full_computation_on_shipped_models",
    "test_first_sight.py::test_pca_of_2000_rows_is_exact",
    "test_head_metrics.py::test_shipped_ranking_agrees_with_probe",
    "test_compare.py::test_icl_score_on_the_dataset",
    "test_circuit.py::test_acdc_matches_a_hook_replay",
    "test_circuit.py::test_circuit_equals_explicit_hooks",
    "test_circuit.py::test_eap_equals_transformer_lens",
    "test_patching.py::test_path_patching_variants_equal_transformer_lens_hooks",
    "test_head_metrics.py::test_metrics_equal_plain_loops_on_shipped_windows",
    # transformers' own loaders and tokenizers are the reference for GGUF and HF folders
    "test_gguf.py::test_llama_logits_equal_transformers_in_every_quantization",
    "test_gguf.py::test_other_architectures_equal_transformers",
    "test_gguf.py::test_tokenizer_equals_transformers",
    "test_gguf.py::test_sentencepiece_tokenizer_equals_transformers",
    "test_hf.py::test_matches_transformers",
}
#: Sweeps over every page (on every model family, following every link, or exporting every
#: panel, with every analysis computed): minutes on a loaded 2-core machine; the fast tier
#: draws every page once on the default model (test_pages.py) instead.
SWEEPS = {
    "test_families.py::test_every_page_runs",
    "test_links.py::test_every_link_stays_under_the_url_prefix_and_opens_a_page",
    "test_pages_weights.py::test_every_panel_exports",
}
TIERS = ("browser", "server", "scale", "oracle", "callback", "unit")


def tier_of(item) -> str:
    """One tier per test, the first that applies: a tier marker the test names itself, browser
    (a real Chromium), server (subprocess servers), scale (GPT-2-shaped work), oracle
    (TransformerLens or a per-head reference recomputes it), slow (a ``slow`` test is never
    in the fast tier), callback (the app, its pages or API in process), else unit."""
    named = [t for t in TIERS if item.get_closest_marker(t)]
    if named:
        return named[0]
    fixtures = set(getattr(item, "fixturenames", ()))
    file = item.path.name
    if "dash_duo" in fixtures or file in BROWSER_FILES:
        return "browser"
    if file in SERVER_FILES:
        return "server"
    if file in SCALE_FILES or f"{file}::{getattr(item, 'originalname', '')}" in SWEEPS:
        return "scale"
    code = getattr(getattr(item, "function", None), "__code__", None)
    names = set(code.co_names + code.co_varnames) if code is not None else set()
    if ORACLE_NAMES & names or any(f.startswith("tl_") for f in fixtures) \
            or f"{file}::{item.originalname}" in REFERENCE_CHECKS:
        return "oracle"
    if item.get_closest_marker("slow"):
        return "slow"
    module = set(vars(getattr(item, "module", None) or object))
    if fixtures & CALLBACK_FIXTURES or CALLBACK_NAMES & (module | names):
        return "callback"
    return "unit"


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier (new files get one without editing them); skip browser
    tests without Chromium, except under CI where that is a failure."""
    for item in items:
        tier = tier_of(item)
        if tier != "slow":  # a slow test without another tier keeps just its slow marker
            item.add_marker(getattr(pytest.mark, tier))
    have = shutil.which("chromium") and shutil.which("chromedriver")
    if have or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason="Chromium/chromedriver not installed (apt install chromium "
                                   "chromium-driver); under CI=true this is a failure instead")
    for item in items:
        if "browser" in item.keywords or "dash_duo" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
