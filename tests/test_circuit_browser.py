"""/circuit in a real Chromium on the shipped two-layer model: the background job draws the
induction circuit position by position and the faithfulness curve beside random circuits;
the exports download and parse; a real click on a head in the drawing opens it on
/attention. One browser session."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from selenium.webdriver.common.by import By
from test_browser import has_traces, url, wait
from test_geometry import cell_point, graph_js, real_click
from test_head_metrics import full_screenshot, geometry_problems

from attention_lens.analysis import patching as PT
from attention_lens.server.app import create_app

pytestmark = pytest.mark.browser

MODEL = "attn-only-2l"
SHOTS = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/screenshots"))


def downloaded(duo, name: str, timeout: float = 30) -> str:
    """The path of a finished download called ``name``."""
    end = time.time() + timeout
    while time.time() < end:
        files = [f for f in glob.glob(os.path.join(duo.download_path, name))
                 if not f.endswith(".crdownload")]
        if files and os.path.getsize(files[0]) > 0:
            time.sleep(0.2)
            return files[0]
        time.sleep(0.2)
    raise AssertionError(f"no {name} in {duo.download_path}: {os.listdir(duo.download_path)}")


def click_element(duo, element) -> None:
    """A trusted pointer click at the middle of ``element`` (scrolled into view)."""
    duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    time.sleep(0.3)
    x, y = duo.driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left + r.width / 2, r.top + r.height / 2];", element)
    real_click(duo, x, y)


def test_circuit_page_in_the_browser(dash_duo, registry, bg):
    dash_duo.start_server(create_app(registry, background=bg))
    d = dash_duo.driver
    d.set_window_size(1440, 1000)
    d.get(url(dash_duo, "/circuit", model=MODEL, text="Harry Potter went."))
    for name in ("circuit", "faithfulness", "edges"):
        wait(dash_duo, has_traces("circuit", name), timeout=120, what=f"the {name} figure")
    gd = graph_js("circuit", "circuit")
    # the drawn circuit, per position: each edge marker names "sender -> receiver @ position"
    drawn = wait(dash_duo, f"""(() => {{ const out = [];
        {gd}.data.forEach(t => (t.customdata || []).forEach(c => {{
            if (typeof c === 'string') out.push(c); }}));
        return out.length ? out : null; }})()""", what="the circuit's edges")
    edges = {c.split(" @ ")[0]: int(c.split(" @ ")[1]) for c in drawn}
    assert "L0H2 -> L1H5.k" in edges and "L0H2 -> L1H6.k" in edges, drawn
    assert edges["L0H2 -> L1H5.k"] == edges["input -> L0H2.v"] + 1
    assert {"L1H5 -> logits", "L1H6 -> logits"} <= set(edges)
    names = d.execute_script(f"return {graph_js('circuit', 'faithfulness')}.data"
                             ".map(t => t.name)")
    for ablation in ("resample", "mean", "zero"):
        assert {f"{ablation}: circuit", f"{ablation}: random mean",
                f"{ablation}: random 5–95 %"} <= set(names), names
    alerts = d.find_element(By.CSS_SELECTOR, "#circuit-alerts").text
    assert "reach 80 % of the metric" in alerts, alerts
    time.sleep(1.0)
    assert geometry_problems(d) == []
    SHOTS.mkdir(parents=True, exist_ok=True)
    full_screenshot(d, SHOTS / "circuit.png")

    # the exports, downloaded by real clicks, parse
    links = {a.get_attribute("download"): a for a in
             d.find_elements(By.CSS_SELECTOR, "a[download]")}
    click_element(dash_duo, links[f"{MODEL}-circuit.json"])
    circuit = json.load(open(downloaded(dash_duo, f"{MODEL}-circuit.json"), encoding="utf-8"))
    assert {"nodes", "edges", "settings", "faithfulness", "curve"} <= set(circuit)
    assert {"L0H2", "L1H5", "L1H6", "logits"} <= set(circuit["nodes"])
    kept = {(e["sender"], e["receiver"], e["input"]): e["score"] for e in circuit["edges"]}
    assert ("L0H2", "L1H5", "k") in kept and all(isinstance(v, float) for v in kept.values())
    assert circuit["settings"]["model"] == MODEL and circuit["settings"]["method"] == "eap"
    assert circuit["settings"]["k"] == 20 and circuit["settings"]["search"] == "top_k"
    click_element(dash_duo, links[f"{MODEL}-circuit-edges.csv"])
    with open(downloaded(dash_duo, f"{MODEL}-circuit-edges.csv"), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == circuit["n_edges_total"] == 529
    assert sum(int(r["in_circuit"]) for r in rows) == circuit["n_edges_kept"] == len(kept)
    row = next(r for r in rows if (r["sender"], r["receiver"], r["input"]) ==
               ("L0H2", "L1H5", "k"))
    assert abs(float(row["score"]) - kept[("L0H2", "L1H5", "k")]) <= 1e-6 * abs(
        float(row["score"]))
    click_element(dash_duo, links[f"{MODEL}-circuit-curves.csv"])
    with open(downloaded(dash_duo, f"{MODEL}-circuit-curves.csv"), encoding="utf-8") as fh:
        curves = list(csv.DictReader(io.StringIO(fh.read())))
    assert {r["ablation"] for r in curves} == {"resample", "mean", "zero"}
    sizes = len(circuit["curve"]["k"])
    assert len(curves) == 3 * sizes
    ours = [float(r["faithfulness"]) for r in curves if r["ablation"] == "resample"]
    assert ours == pytest.approx(circuit["curve"]["faithfulness"][0], rel=1e-5)

    # a real click on L0H2 in the drawing opens it on /attention
    point = d.execute_script(f"""const t = {gd}.data.find(t => t.name &&
        t.name.startsWith('heads'));
        const i = t.customdata.findIndex(c => c[0] === 0 && c[1] === 2 && c[2] === {
            edges["L0H2 -> L1H5.k"]});
        return i < 0 ? null : [t.x[i], t.y[i]];""")
    assert point is not None
    x, y = cell_point(dash_duo, gd, *point)
    real_click(dash_duo, x, y)
    wait(dash_duo, "window.location.pathname === '/attention' && "
                   "window.location.search.includes('layer=0') && "
                   "window.location.search.includes('head=2')", timeout=20,
         what="L0H2 on /attention")
    wait(dash_duo, has_traces("attention", "pattern"), timeout=60, what="its pattern")
    # on the pair's clean prompt
    assert parse_qs(urlparse(d.current_url).query)["text"] == [PT.DEFAULT_CLEAN]
    assert [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"] == []


def test_circuit_curve_as_a_second_job(dash_duo, registry, bg, monkeypatch):
    """Where the curve is too much work for the circuit's job (forced here), the circuit is
    drawn first and the page starts the curve's job by itself."""
    monkeypatch.setenv("ATTENTION_LENS_CIRCUIT_INLINE_FLOP", "0")
    dash_duo.start_server(create_app(registry, background=bg))
    d = dash_duo.driver
    d.set_window_size(1440, 1000)
    d.get(url(dash_duo, "/circuit", model=MODEL, text="Harry Potter went.", k=15))
    wait(dash_duo, has_traces("circuit", "circuit"), timeout=120, what="the circuit")
    names = wait(dash_duo, f"""(() => {{ const g = {graph_js('circuit', 'faithfulness')};
        return g && g._fullData && g._fullData.length ? g._fullData.map(t => t.name) : null;
        }})()""", timeout=180, what="the faithfulness curve")
    assert "resample: circuit" in names, names
