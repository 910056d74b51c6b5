"""The page recipe of the package docs, built as a throwaway page; jobs, slots and the store."""

from __future__ import annotations

import io
import json
import re
import textwrap
import zipfile

import dash
import pytest

from attention_lens import background, components
from attention_lens import weight_analyses as W
from attention_lens.server.app import create_app
from attention_lens.components import job_strip
from attention_lens.components import page as P


def recipe_code() -> str:
    """The code block of the recipe in ``attention_lens.components``' docstring."""
    doc = components.__doc__
    match = re.search(r"\.\. code-block:: python\n\n(.*?)\n\n   That is the whole page", doc,
                      re.S)
    assert match, "the recipe's code block is missing"
    return textwrap.dedent(match.group(1))


@pytest.fixture
def recipe_app(tmp_path, registry, bg):
    """An app whose only page is the recipe's, written to a throwaway pages folder."""
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "top_copying.py").write_text(recipe_code(), encoding="utf-8")
    app = create_app(registry, background=bg, pages_folder=pages)
    yield app


def the_spec() -> P.PageSpec:
    (spec,) = P.declared_pages()
    return spec


STATE = {"model": "attn-only-2l", "text": "Harry Potter and Harry Potter", "pos": None}


def test_recipe_page_is_found_through_the_page_registry(recipe_app):
    spec = the_spec()
    assert spec.page == "top-copying" and spec.graphs == ("next", "copying")
    entry = next(p for p in dash.page_registry.values() if p["path"] == "/top-copying")
    assert entry["attention_lens"] is spec
    layout = entry["layout"](k="7", circuit="ov", model="attn-only-2l")
    text = str(layout)
    for wanted in ("top-copying-k", "top-copying-circuit", "top-copying-job-cancel",
                   "al-export", "'name': 'next'", "'name': 'copying'"):
        assert wanted in text, wanted
    bad = str(entry["layout"](k="1000"))
    assert "k 1000 is above the largest allowed value 100" in bad


def test_recipe_page_runs_a_job_then_draws_from_the_store(recipe_app, registry, bg):
    spec = the_spec()
    # the main callback: the eigenvalues are not computed, so it asks for a job
    out = spec.update(STATE, 5, "full_ov", 0, None)
    n = len(spec.graphs)
    figures, alerts, query, request, after, note = out[:n], out[n], out[n + 1], *out[n + 2:]
    assert all(f is dash.no_update for f in figures) and alerts == []
    assert after == job_strip.HIDDEN and note == ""
    assert request["labels"] == ["circuit eigenvalues"] and request["token"]
    assert query == {"k": 5, "circuit": "full_ov", "_src": "url"}
    assert len(bg.slots.active()) == 1  # the job's slot is reserved
    # the job: computes with progress in its slot, then draws
    seen = []
    res = spec.run_job(seen.append, request, STATE, 5, "full_ov")
    figs = res[:n]
    assert [type(f).__name__ for f in figs] == ["Figure", "Figure"]
    assert len(figs[0].data[0].x) == 5
    assert seen and seen[-1][0] == 100 and "circuit eigenvalues" in seen[-1][2]
    assert bg.slots.active() == []  # given back
    lm = registry.get("attn-only-2l")
    assert W.store().stats(lm, W.circuit_eigenvalues())["computed"] == 1
    # now the main callback draws at once, with the recipe's notice
    again = spec.update(STATE, 3, "ov", 0, request)
    assert len(again[0].data[0].x) == 3 and again[n + 2] is dash.no_update
    assert "Showing the top 3 tokens." in str(again[n])
    assert W.store().stats(lm, W.circuit_eigenvalues())["computed"] == 1


def test_recipe_page_over_the_job_bound_says_busy(recipe_app, bg):
    spec = the_spec()
    held = [bg.slots.reserve("other") for _ in range(bg.max_jobs)]
    assert all(held) and bg.slots.reserve("one more") is None
    out = spec.update(STATE, 5, "full_ov", 0, None)
    n = len(spec.graphs)
    assert out[n + 2] is dash.no_update  # no job request
    assert "The server is busy" in str(out[n]) and "Try again" in str(out[n])
    assert out[n + 3] == job_strip.SHOWN  # "Run again" offered
    for token in held:
        bg.slots.release(token)
    assert bg.slots.active() == []


def test_forged_job_request_runs_nothing(recipe_app, registry, bg):
    spec = the_spec()
    forged = {"token": "guessed-token", "labels": ["circuit eigenvalues"]}
    res = spec.run_job(lambda _: None, forged, STATE, 5, "full_ov")
    assert "The server is busy" in str(res[len(spec.graphs)])
    lm = registry.get("attn-only-2l")
    assert W.store().stats(lm, W.circuit_eigenvalues())["computed"] == 0


def test_recipe_page_exports_and_downloads(recipe_app, registry, bg):
    from attention_lens import export

    spec = the_spec()
    panels = P.page_panels("top-copying", STATE, {"k": "4", "_src": "url"}, compute=True)
    assert [p.name for p in panels] == ["next", "copying"]
    data = export.page_zip("top-copying", panels, STATE, {"k": 4}, images=False)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"next.csv", "copying.json", "manifest.json"} <= set(names)
    body = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("copying.json"))
    assert len(body["data"]["copying"]) == registry.get("attn-only-2l").cfg.n_layers
    assert spec.page in [s.page for s in P.declared_pages()]


def test_slots_expire_when_a_job_dies(bg, monkeypatch):
    import time

    monkeypatch.setattr(background, "STALE_S", 0.5)
    assert bg.slots.n == 2
    # two jobs that claimed their slots and died without giving them back (no heartbeat)
    for i in range(2):
        token = bg.slots.reserve(f"job {i}")
        assert bg.slots.claim(token, expire=0.5)
    assert [s["state"] for s in bg.slots.active()] == ["starting", "starting"]
    assert bg.slots.reserve("refused") is None  # every slot is taken
    time.sleep(0.8)
    assert bg.slots.active() == []
    # the dead jobs' slots are free again for new work
    fresh = [bg.slots.reserve("new a"), bg.slots.reserve("new b")]
    assert all(fresh) and len(set(fresh)) == 2
    assert {s["label"] for s in bg.slots.active()} == {"new a", "new b"}
    assert bg.slots.reserve("third") is None


@pytest.mark.browser
def test_recipe_page_in_the_browser_runs_its_job_and_draws(dash_duo, tmp_path, registry, bg):
    """The background callback really runs (a forked job process) and its result is drawn."""
    import time

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "top_copying.py").write_text(recipe_code(), encoding="utf-8")
    dash_duo.start_server(create_app(registry, background=bg, pages_folder=pages))
    dash_duo.driver.get(f"{dash_duo.server_url}/top-copying?model=attn-only-2l&k=6")
    js = ("(() => {const h = document.getElementById(JSON.stringify({name: 'copying', "
          "page: 'top-copying', type: 'al-graph'})); const gd = h && "
          "h.querySelector('.js-plotly-plot'); return gd && gd._fullData && "
          "gd._fullData.length && gd._fullData[0].type === 'heatmap';})()")
    end = time.time() + 60
    while time.time() < end and not dash_duo.driver.execute_script(f"return {js};"):
        time.sleep(0.3)
    assert dash_duo.driver.execute_script(f"return {js};"), "the job's figure never arrived"
    lm = registry.get("attn-only-2l")
    stats = W.store().stats(lm, W.circuit_eigenvalues())
    assert stats["computed"] == 1
    import os

    assert stats["computed_by"]["pid"] != os.getpid()  # computed in the job's own process
    assert bg.slots.active() == []
    assert "Showing the top 6 tokens." in dash_duo.driver.find_element(
        "id", "top-copying-alerts").text
