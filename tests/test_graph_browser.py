"""In the browser: a click on an attention cell opens its QK attribution; /graph draws, and a
click on a head node offers its QK attribution and OV read-out."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from test_browser import SHOTS, page_alerts, severe_logs, url, wait

from attention_lens.analysis.qk_attribution import default_cell
from attention_lens.server.app import create_app
from attention_lens.components import shell

pytestmark = pytest.mark.browser
MODEL = "attn-only-2l"


@pytest.fixture
def lens(dash_duo, registry):
    """The app over the shipped weights, served on a local port."""
    dash_duo.start_server(create_app(registry))
    return dash_duo


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


GEOMETRY_JS = """
const boxes = [], problems = [];
document.querySelectorAll('.al-graph .js-plotly-plot').forEach((gd, i) => {
  const svg = gd.querySelector('.main-svg');
  if (!svg) return;
  const outer = gd.getBoundingClientRect(), inner = svg.getBoundingClientRect();
  if (inner.height > outer.height + 2 || inner.width > outer.width + 2)
    problems.push(`figure ${i} overflows its box: ${inner.width}x${inner.height} in ` +
                  `${outer.width}x${outer.height}`);
  boxes.push([`figure ${i}`, gd.closest('.al-graph').getBoundingClientRect()]);
});
document.querySelectorAll('.al-page table, .al-page h1, .al-page h2, .al-page h6')
  .forEach((el, i) => boxes.push([`${el.tagName} ${i}`, el.getBoundingClientRect()]));
for (let a = 0; a < boxes.length; a++) for (let b = a + 1; b < boxes.length; b++) {
  const [na, ra] = boxes[a], [nb, rb] = boxes[b];
  const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
  const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
  if (w > 2 && h > 2 && !(na.startsWith('TABLE') && nb.startsWith('H6')))
    problems.push(`${na} overlaps ${nb}`);
}
// the page's own content stays within the window (the shared navbar is not this page's)
document.querySelectorAll('.al-page *').forEach(el => {
  const r = el.getBoundingClientRect();
  if (r.width > 0 && r.right > window.innerWidth + 1 && !el.closest('.js-plotly-plot') &&
      problems.length < 20)
    problems.push(`${el.tagName}.${el.getAttribute("class")} in ` +
                  `${el.parentElement.getAttribute("class")} reaches ${Math.round(r.right)}px`);
});
return problems;
"""


@pytest.mark.parametrize("width, height", [(1440, 1000), (390, 844)])
def test_graph_and_qk_pages_lay_out_without_overlap(lens, width, height):
    lens.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})
    try:
        for path, name, graph in (("/graph", "graph", "graph"), ("/qk", "qk", "terms")):
            lens.driver.get(url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT, layer=1,
                                head=5) if name == "qk" else
                            url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT))
            wait(lens, shown(name, graph), what=f"{path} drawn")
            time.sleep(1.0)
            problems = lens.driver.execute_script(GEOMETRY_JS)
            assert problems == [], (path, width, problems)
            assert page_alerts(lens) == [] and severe_logs(lens) == [], path
    finally:
        lens.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
