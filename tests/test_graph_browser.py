"""In the browser: a click on an attention cell opens its QK attribution; /graph draws, and a
click on a head node offers its QK attribution and OV read-out."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

import pytest
from selenium.webdriver.common.action_chains import ActionChains

from attention_lens.analysis.qk_attribution import default_cell
from attention_lens.components import shell
from test_browser import SHOTS, lens, url, wait  # noqa: F401

pytestmark = pytest.mark.browser
MODEL = "attn-only-2l"


def strict_js(page: str, name: str) -> str:
    """JS for the plotly div of a page's graph, or null while that page is not shown."""
    gid = json.dumps(json.dumps({"name": name, "page": page, "type": "al-graph"},
                                separators=(",", ":")))
    return (f"(document.getElementById({gid}) && "
            f"document.getElementById({gid}).querySelector('.js-plotly-plot'))")


def shown(page: str, name: str) -> str:
    """JS: true once that page's graph shows a trace."""
    gd = strict_js(page, name)
    return f"({gd} && {gd}._fullData && {gd}._fullData.length > 0)"


def click_at(duo, gd_js: str, x_js: str, y_js: str) -> None:
    """Click the point of a plotly graph at data coordinates (the expressions use xa, ya)."""
    duo.driver.execute_script(f"{gd_js}.scrollIntoView({{block: 'center'}});")
    time.sleep(0.5)
    xy = duo.driver.execute_script(
        f"const gd = {gd_js}; const r = gd.getBoundingClientRect(), "
        "xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;"
        f"return [r.left + xa._offset + {x_js}, r.top + ya._offset + {y_js}];")
    ActionChains(duo.driver).move_to_location(int(xy[0]), int(xy[1])).click().perform()


def test_click_on_an_attention_cell_opens_its_qk_attribution(lens, registry):
    fp = registry.forward(shell.DEFAULT_PROMPT, MODEL)
    q, k = default_cell(fp, 1, 5)
    lens.driver.get(url(lens, "/attention", model=MODEL, text=shell.DEFAULT_PROMPT, layer=1,
                        head=5))
    wait(lens, shown("attention", "pattern"), what="the attention pattern")
    time.sleep(0.5)
    click_at(lens, strict_js("attention", "pattern"), f"xa.l2p({k})", f"ya.l2p({q})")
    wait(lens, "window.location.pathname === '/qk'", what="navigation to /qk")
    params = parse_qs(urlparse(lens.driver.current_url).query)
    assert params["layer"] == ["1"] and params["head"] == ["5"]
    assert params["query"] == [str(q)] and params["key"] == [str(k)]
    wait(lens, shown("qk", "terms"), what="the QK term heatmap")
    title = lens.driver.execute_script(f"return {strict_js('qk', 'terms')}.layout.title.text")
    assert title.startswith(f"L1H5 at query {q}") and f"key {k}" in title
    lens.driver.execute_script("window.scrollTo(0, 0);")
    time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    lens.driver.save_screenshot(str(SHOTS / "qk.png"))


def test_graph_page_and_a_click_on_a_head_node(lens):
    lens.driver.get(url(lens, "/graph", model=MODEL, text=shell.DEFAULT_PROMPT))
    wait(lens, shown("graph", "graph"), what="the attribution graph")
    gd = strict_js("graph", "graph")
    n = lens.driver.execute_script(
        f"const d = {gd}.data; const t = d[d.length - 1];"
        "return t.customdata.findIndex(c => c[0] === 'head');")
    assert n >= 0
    time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    lens.driver.save_screenshot(str(SHOTS / "graph.png"))
    # calcdata holds the decoded coordinates (data arrays travel base64-encoded)
    nodes = f"{gd}.calcdata[{gd}.calcdata.length - 1]"
    click_at(lens, gd, f"xa.l2p({nodes}[{n}].x)", f"ya.l2p({nodes}[{n}].y)")
    link = wait(lens, "Array.from(document.querySelectorAll('#graph-detail a'))"
                      ".map(a => a.getAttribute('href')).join(' ')",
                what="the clicked node's links")
    assert "/qk?" in link and "/weights?" in link
