"""Every page and the API on a real model: SmolLM2-135M-Instruct (GGUF Q4_1; 30 layers of 9
query heads sharing 3 key/value heads, rotary, RMSNorm, SwiGLU).

Needs the file: ``attention-lens models add smollm2`` puts it in the user's models folder,
or ``ATTENTION_LENS_SMOLLM2=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf`` names it. Nothing
is downloaded here; without the file these tests are skipped and say why.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PARIS = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
#: A page's second visit (its analyses cached) draws within this many seconds.
SECOND_VISIT_S = 3.0


def smollm2_file() -> Path | None:
    """The SmolLM2 GGUF named by ATTENTION_LENS_SMOLLM2, else the one in the user's folder."""
    from attention_lens.model.catalog import KNOWN
    from attention_lens.registry import user_models_dir

    named = os.environ.get("ATTENTION_LENS_SMOLLM2")
    path = Path(named) if named else user_models_dir() / KNOWN["smollm2"].file_name
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smol_path(tmp_path_factory) -> Path:
    path = smollm2_file()
    if path is None:
        pytest.skip("SmolLM2 is not on this machine: run `attention-lens models add smollm2` "
                    "(about 100 MB) or set ATTENTION_LENS_SMOLLM2 to its .gguf file")
    return path


@pytest.fixture(scope="module")
def registry(smol_path, tmp_path_factory):
    from attention_lens.registry import Registry

    cache = Path(os.environ.get("ATTENTION_LENS_CACHE_DIR")
                 or tmp_path_factory.mktemp("smol-cache"))
    return Registry([smol_path], default=smol_path.stem, cache_dir=cache, max_tokens=256)


@pytest.fixture(scope="module")
def app(registry):
    from attention_lens.server.app import create_app
    from attention_lens.registry import install

    app = create_app(registry)
    install(registry)
    return app


@pytest.fixture(scope="module")
def lm(registry):
    return registry.get(registry.default)


def _pages():
    from attention_lens.server.app import create_app
    from attention_lens.components import page as P
    from attention_lens.registry import Registry

    create_app(Registry())
    return [s.page for s in P.declared_pages()]


#: The prompt length the second-visit target is stated at.
LONG = 128


@pytest.mark.parametrize("text", [PARIS, IOI, LONG], ids=["paris", "ioi", f"{LONG}-tokens"])
@pytest.mark.parametrize("page_name", _pages())
def test_every_page_draws_on_smollm2_and_its_second_visit_is_quick(app, lm, page_name, text):
    from attention_lens.bench import flow_prompt
    from attention_lens.components import page as P

    if text == LONG:  # a distinct prompt of exactly LONG tokens
        text = flow_prompt(lm, LONG, variant=7)
        assert len(lm.tokenizer.encode(text)) == LONG
    spec = P.spec_of(page_name)
    state = {"model": lm.name, "text": text, "pos": None, "src": "url"}
    first = spec.render(state)  # the main callback, then its background job if it asked
    assert first.errors == [], (page_name, first.errors)
    assert first.drew, page_name
    if page_name == "circuit":
        from attention_lens.pages.circuit import curve_due

        if curve_due(first):  # the circuit drawn; the page starts the curve's job at once
            first = spec.render(state)
            assert first.errors == [] and first.drew and not curve_due(first)
    t0 = time.perf_counter()
    again = spec.render(state)
    took = time.perf_counter() - t0
    assert again.errors == [] and not isinstance(again.request, dict), page_name
    assert took <= SECOND_VISIT_S, f"{page_name}: second visit {took:.2f} s"


def test_predictions_and_logit_lens_find_paris(app, lm):
    from attention_lens.components import page as P

    state = {"model": lm.name, "text": PARIS, "pos": None, "src": "url"}
    d = P.spec_of("predictions").render(state)
    assert "Paris" in str(d.figures) and d.errors == []
    paris = lm.tokenizer.encode(" Paris")
    assert len(paris) == 1
    fp = P.forward(state)
    p = fp.logits[-1].double().softmax(-1)
    assert int(p.argmax()) == paris[0] and float(p[paris[0]]) == pytest.approx(0.773, abs=0.01)
    lens = P.spec_of("logit-lens").render(state)
    assert lens.errors == [] and "Paris" in str(lens.figures)


def test_attention_default_head_is_a_telling_choice(app, lm):
    """On the IOI prompt /attention opens on a name mover: the head that writes most toward
    " Mary" at the last position (direct logit attribution, recomputed here from its output)
    among those attending there to the earlier " Mary"."""
    from attention_lens.analysis.attention import head_results
    from attention_lens.analysis.defaults import COPY_MIN_ATTENTION
    from attention_lens.components import page as P

    state = {"model": lm.name, "text": IOI, "pos": None, "src": "url"}
    d = P.spec_of("attention").render(state)
    assert d.errors == []
    said = str(d.extras["choice"])
    fp = P.forward(state)
    n, mary = fp.n_tokens, lm.tokenizer.encode(" Mary")[0]
    assert fp.token_ids[1] == mary and int(fp.logits[-1].argmax()) == mary
    model = lm.model
    final = fp.cache["ln_final.hook_scale"][n - 1].double()
    direction = model.ln_final.w.detach().double() * model.W_U[:, mary].detach().double()
    best, best_value = None, -np.inf
    for layer in range(lm.cfg.n_layers):
        att = fp.cache[f"blocks.{layer}.attn.hook_pattern"][:, n - 1, 1].double()
        dla = (head_results(lm, fp, layer)[n - 1].double() / final) @ direction  # [H]
        for h in range(lm.cfg.n_heads):
            if att[h] >= COPY_MIN_ATTENTION and dla[h] > best_value:
                best, best_value = (layer, h), float(dla[h])
    assert best is not None and best_value > 0
    assert f"L{best[0]}H{best[1]}: the head that writes most directly toward" in said, said


def test_attention_default_head_on_a_fact_writes_the_answer(app, lm):
    """On "The capital of France is" (" Paris", nothing to copy) /attention opens on the head
    whose output at the last position has the largest direct logit attribution to " Paris"
    (recomputed here from its output), and that head reads " France" from there: not a
    previous-token head."""
    from attention_lens.analysis.attention import head_results
    from attention_lens.components import page as P

    state = {"model": lm.name, "text": PARIS, "pos": None, "src": "url"}
    d = P.spec_of("attention").render(state)
    assert d.errors == []
    said = str(d.extras["choice"])
    fp = P.forward(state)
    n, paris = fp.n_tokens, lm.tokenizer.encode(" Paris")[0]
    assert int(fp.logits[-1].argmax()) == paris and paris not in fp.token_ids.tolist()
    model = lm.model
    final = fp.cache["ln_final.hook_scale"][n - 1].double()
    direction = model.ln_final.w.detach().double() * model.W_U[:, paris].detach().double()
    dla = np.stack([((head_results(lm, fp, layer)[n - 1].double() / final) @ direction).numpy()
                    for layer in range(lm.cfg.n_layers)])
    layer, head = (int(i) for i in np.unravel_index(int(np.argmax(dla)), dla.shape))
    assert dla[layer, head] > 0
    assert f"Showing L{layer}H{head}: the head that writes most directly toward" in said, said
    row = fp.cache[f"blocks.{layer}.attn.hook_pattern"][head, n - 1]
    france = fp.display.index("·France")
    assert int(row.argmax()) == france and float(row[france]) >= 0.5
    assert "'·France' at position" in said, said


def test_patching_opens_on_the_ioi_pair_the_model_answers(app, lm):
    from attention_lens.analysis.defaults import answered_pair
    from attention_lens.components import page as P

    pair = answered_pair(lm)
    assert pair is not None
    assert (pair.clean, pair.corrupted, pair.correct, pair.wrong) == (IOI, IOI_CORRUPTED,
                                                                      " Mary", " John")
    state = {"model": lm.name, "text": PARIS, "pos": None, "src": "url"}
    d = P.spec_of("patching").render(state)
    assert d.errors == [], d.errors
    said = " ".join(d.notes)
    assert "indirect-object" in said and "Mary" in said, said
    answers = str(d.extras["answers"])
    assert "Mary" in answers and "John" in answers


def _hook_loop_cell(lm, clean_ids, corrupted_ids, layer, pos, head, correct, wrong) -> float:
    """Denoising, one cell by hand: run the corrupted prompt with head ``head``'s z at
    (layer, pos) taken from the clean run; the logit difference at the last position."""
    model = lm.model
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([clean_ids]),
                                        names_filter=f"blocks.{layer}.attn.hook_z")
        z_clean = cache[f"blocks.{layer}.attn.hook_z"]

        def patch(z, hook=None):
            z = z.clone()
            z[0, pos, head] = z_clean[0, pos, head]
            return z

        logits = model.run_with_hooks(torch.tensor([corrupted_ids]),
                                      fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
    last = logits[0, -1].double()
    return float(last[correct] - last[wrong])


@pytest.fixture(scope="module")
def ioi_grid(lm):
    """Activation patching head × position on the IOI pair (exact cells only), its progress
    reports and the seconds it took."""
    from attention_lens.analysis import patching as PT

    seen: list[float] = []
    t0 = time.perf_counter()
    grid = PT.activation_patching(lm, IOI, IOI_CORRUPTED, correct=" Mary", wrong=" John",
                                  granularity="head_out_by_pos",
                                  progress=lambda done, total: seen.append(done / max(total, 1)),
                                  attribution=False)
    return grid, seen, time.perf_counter() - t0


def test_head_by_position_patching_on_ioi_equals_a_hook_loop(lm, ioi_grid):
    from attention_lens.analysis import patching as PT

    clean, corrupted = PT.pair_tokens(lm, IOI, IOI_CORRUPTED)
    correct, wrong = lm.tokenizer.encode(" Mary")[0], lm.tokenizer.encode(" John")[0]
    grid, seen, took = ioi_grid
    assert seen and seen[-1] == pytest.approx(1.0)
    L, n, H = grid.values.shape
    assert (L, n, H) == (lm.cfg.n_layers, len(clean), lm.cfg.n_heads)
    assert grid.clean_metric > 0 > grid.corrupted_metric
    rng = np.random.default_rng(0)
    cells = {(int(rng.integers(L)), int(rng.integers(n)), int(rng.integers(H)))
             for _ in range(9)}
    # and the strongest cells, where the numbers are largest
    cells |= {c for c, _ in PT.strongest_cells(grid, 3)}
    while len(cells) < 12:
        cells.add((int(rng.integers(L)), n - 1, int(rng.integers(H))))
    for layer, pos, head in sorted(cells)[:12]:
        ref = _hook_loop_cell(lm, clean, corrupted, layer, pos, head, correct, wrong)
        assert grid.values[layer, pos, head] == pytest.approx(ref, abs=1e-4), (layer, pos, head)
    assert took <= 60, f"head x position patching took {took:.1f} s"


def test_api_on_smollm2(smol_path, tmp_path_factory):
    from attention_lens.server.config import ServerConfig
    from attention_lens.server import create_server

    cache = tmp_path_factory.mktemp("smol-api-cache")
    server = create_server(ServerConfig(model=str(smol_path), models_dirs=[smol_path.parent],
                                        cache_size=8, cache_dir=cache))
    client = server.server.test_client()
    assert client.get("/").status_code == 200
    name = smol_path.stem
    models = client.get("/api/models").get_json()
    assert name in str(models)
    r = client.post("/api/predict", json={"text": PARIS, "top_k": 3, "model": name})
    assert r.status_code == 200, r.data[:300]
    assert "Paris" in str(r.get_json())
    r = client.post("/api/attention", json={"text": IOI, "layer": 20, "head": 4, "model": name})
    assert r.status_code == 200, r.data[:300]
    r = client.post("/api/logit-lens", json={"text": PARIS, "top_k": 1, "model": name})
    assert r.status_code == 200 and "Paris" in str(r.get_json())
    r = client.post("/api/attention", json={"text": IOI, "layer": 30, "head": 0, "model": name})
    assert r.status_code == 400 and "layer" in str(r.get_json())


def _rows(component, header_word: str) -> list[list[str]]:
    """The body rows (cell texts) of the first table in a Dash component tree whose header
    holds ``header_word``."""
    from dash import html

    def text(c) -> str:
        if c is None:
            return ""
        if isinstance(c, (str, int, float)):
            return str(c)
        if isinstance(c, (list, tuple)):
            return "".join(text(x) for x in c)
        return text(getattr(c, "children", None))

    def walk(c):
        if isinstance(c, (list, tuple)):
            for x in c:
                yield from walk(x)
        elif c is not None and not isinstance(c, (str, int, float)):
            yield c
            yield from walk(getattr(c, "children", None))

    for table in (c for c in walk(component) if isinstance(c, html.Table)):
        head, body = table.children
        if header_word in text(head):
            return [[text(td) for td in tr.children] for tr in body.children]
    return []


def test_circuit_finds_the_ioi_name_movers(app, lm):
    """/circuit opens on the IOI pair; the circuit's job draws the circuit and lists the heads
    that attend from the last position to " Mary" and write it, each checked against the
    attention pattern and direct logit attribution computed here from the model's own hooks;
    the faithfulness curve comes in a second job, its sizes stated."""
    from attention_lens.analysis.circuit.discovery import MOVER_MIN_ATTENTION
    from attention_lens.components import page as P
    from attention_lens.pages.circuit import curve_due

    state = {"model": lm.name, "text": IOI, "pos": None, "src": "url"}
    spec = P.spec_of("circuit")
    t0 = time.perf_counter()
    d = spec.render(state)
    took = time.perf_counter() - t0
    assert d.errors == [], d.errors
    said = " ".join(d.notes)
    assert "indirect-object" in said and "Faithfulness curve sized from the model's cost" in said
    due = curve_due(d)  # on a 270-head model the curve is a job of its own (unless stored)
    assert due or len(d.figures["faithfulness"].data) > 0
    circuit_heads = {r[0] for r in _rows(d.extras["heads"], "inputs in the circuit")}
    movers = _rows(d.extras["heads"], "attention to")
    assert movers, str(d.extras["heads"])[:2000]
    ids = lm.tokenizer.encode(IOI)
    n = len(ids)
    mary, john = (lm.tokenizer.encode(w)[0] for w in (" Mary", " John"))
    at = [i for i in range(n - 1) if ids[i] == mary]
    model = lm.model
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]))
    scale = cache["ln_final.hook_scale"][0, n - 1].double()
    direction = model.ln_final.w.detach().double() * (model.W_U[:, mary]
                                                      - model.W_U[:, john]).detach().double()
    expected = {}
    for name in circuit_heads:
        layer, head = map(int, name[1:].split("H"))
        att = float(cache[f"blocks.{layer}.attn.hook_pattern"][0, head, n - 1, at].sum())
        z = cache[f"blocks.{layer}.attn.hook_z"][0, n - 1, head].double()
        dla = float((z @ model.blocks[layer].attn.W_O[head].detach().double()) / scale
                    @ direction)
        if att >= MOVER_MIN_ATTENTION:
            expected[name] = (att, dla)
    assert {r[0] for r in movers} == set(expected)
    for name, att, dla, role, links in (r[:5] for r in movers):
        assert float(att) == pytest.approx(expected[name][0], abs=0.006)
        assert float(dla) == pytest.approx(expected[name][1], abs=0.006)
        assert role == ("writes the answer" if expected[name][1] > 0 else "writes against it")
        assert links == "attention · QK · path patching"
    # a name mover: attends to " Mary" from the last position and writes " Mary" − " John"
    writers = [n_ for n_, (a, w) in expected.items() if w > 0]
    assert writers and max(expected[w][0] for w in writers) >= 0.5, expected
    curve = spec.render(state) if due else d  # the second job: the faithfulness curve
    assert curve.errors == [] and not curve_due(curve)
    fig = curve.figures["faithfulness"]
    assert len(fig.data) > 0 and "80 %" in str(fig.layout)
    print(f"circuit job {took:.1f} s; movers {movers}")


@pytest.mark.timeout(1800)
def test_readme_pictures_on_smollm2(dash_duo, registry, lm):
    """/patching on the IOI pair, the logit lens of " Paris", the name-mover
    head /attention opens on for the IOI prompt and /graph of " Mary", drawn in the browser
    with no error, and /circuit on the IOI pair with its faithfulness curve; with
    ATTENTION_LENS_README_SHOTS=DIR the pictures are written there
    (ATTENTION_LENS_README_PAGES=circuit,... takes only those)."""
    from test_browser import graph_js, url
    from test_geometry import set_size, small_screenshot

    from attention_lens.analysis.defaults import strongest_head
    from attention_lens.server.app import create_app

    # every graph drew: data, a title, or a placeholder saying what to do (the set-of-pairs
    # graph waits for an upload)
    DRAWN_JS = """
    const figs = [...document.querySelectorAll('.al-graph .js-plotly-plot')];
    if (figs.length < document.querySelectorAll('.al-graph').length) { return false; }
    return figs.every(g => g._fullLayout && !g.classList.contains('dash-graph--pending') &&
        ((g._fullData || []).length > 0 || (g.layout && g.layout.title && g.layout.title.text)
         || ((g.layout && g.layout.annotations) || []).some(a => (a.text || '').trim())));
    """
    chosen = strongest_head(lm, registry.forward(IOI, lm.name))
    assert chosen.kind == "copying", chosen.reason
    dash_duo.start_server(create_app(registry))
    shots = {
        "logit-lens": ("/logit-lens", {"text": PARIS}),
        "attention": ("/attention", {"text": IOI}),
        "graph": ("/graph", {"text": IOI}),
        "patching": ("/patching", {}),
        "circuit": ("/circuit", {}),
    }
    out = os.environ.get("ATTENTION_LENS_README_SHOTS")
    only = os.environ.get("ATTENTION_LENS_README_PAGES")  # e.g. "circuit,graph": retake some
    if only:
        shots = {k: v for k, v in shots.items() if k in only.split(",")}
    for name, (path, params) in shots.items():
        set_size(dash_duo, 1440, 1000)
        dash_duo.driver.get(url(dash_duo, path, model=lm.name, **{"text": IOI, **params}))
        dash_duo.wait_for_element(".al-page", timeout=60)
        end = time.time() + 600  # background jobs on 270 heads: minutes on a busy machine
        while time.time() < end and not dash_duo.driver.execute_script(DRAWN_JS):
            time.sleep(0.5)
        if not dash_duo.driver.execute_script(DRAWN_JS):
            dash_duo.driver.save_screenshot(f"/tmp/smollm2-{name}-not-drawn.png")
        assert dash_duo.driver.execute_script(DRAWN_JS), f"{path}: not drawn"
        if name == "circuit":  # the faithfulness curve comes in a second job
            curve_js = f"const g = {graph_js('circuit', 'faithfulness')}; " \
                       "return !!(g && g._fullData && g._fullData.length > 0);"
            while time.time() < end and not dash_duo.driver.execute_script(curve_js):
                time.sleep(0.5)
            assert dash_duo.driver.execute_script(curve_js), "/circuit: no faithfulness curve"
        time.sleep(2)
        errors = dash_duo.driver.execute_script(
            "return [...document.querySelectorAll('.alert-danger, .alert-warning')]"
            ".map(a => a.innerText)")
        assert not errors, (path, errors)
        if name == "attention":
            assert f"L{chosen.layer}H{chosen.head}" in dash_duo.driver.execute_script(
                "return document.body.innerText")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            small_screenshot(dash_duo, Path(out) / f"smollm2-{name}.png", 0.6)
