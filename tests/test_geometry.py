"""What a person sees: every page laid out on first load, and real clicks (Debian Chromium).

For every page, at 1440×1000 and at 390×844, set before the first load (no resize), the
test reads each figure's box and its container's in the browser and fails when a figure is
taller or wider than its box, overlaps another figure, table or heading, has a title or a
tick label cut by its edge, or has its title under the toolbar; and, at 390 px, when the
page scrolls sideways. Clicks are real pointer events (Selenium ActionChains at the cell's
pixel position, read from the figure's own axes), never forged callback payloads.

Screenshots of every page at both widths land in ``$ATTENTION_LENS_SCREENSHOTS`` (default
``/tmp/dash_artifacts/geometry``): look at them. With ``ATTENTION_LENS_README_SHOTS=DIR``
the test also writes the README's small pictures of :data:`README_PAGES` into DIR::

    ATTENTION_LENS_README_SHOTS=assets/screenshots .venv/bin/python -m pytest \
        tests/test_geometry.py -k laid_out
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import dash
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from test_browser import url
from test_browser import wait as browser_wait

from attention_lens.server.app import create_app
from attention_lens.components import shell

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/geometry"))
MODEL = "attn-only-2l"
TIMEOUT = 60
SIZES = {"desktop": (1440, 1000), "phone": (390, 844)}
#: Pages pictured in the README, and the scale of their pictures (kept small).
README_PAGES = ("attention", "induction", "logit-lens", "ablation")
README_SCALE = {"desktop": 0.5, "phone": 0.6}
README_SHOTS = os.environ.get("ATTENTION_LENS_README_SHOTS")

#: Every figure against its box, every pair of figures, tables and headings, every title
#: and tick label against its figure's edge and the toolbar, and sideways page scroll.
GEOMETRY_JS = r"""
const box = e => { const r = e.getBoundingClientRect();
  return {l: r.left + scrollX, t: r.top + scrollY, r: r.right + scrollX, b: r.bottom + scrollY}; };
const area = (a, b) => Math.max(0, Math.min(a.r, b.r) - Math.max(a.l, b.l)) *
                       Math.max(0, Math.min(a.b, b.b) - Math.max(a.t, b.t));
const clip = (a, b) => ({l: Math.max(a.l, b.l), t: Math.max(a.t, b.t),
                         r: Math.min(a.r, b.r), b: Math.min(a.b, b.b)});
const label = el => { const h = el.closest('[id]');
  return el.tagName.toLowerCase() + (h ? '#' + h.id.slice(0, 60) : ''); };
const problems = [], items = [];
const figs = [...document.querySelectorAll('.al-graph .js-plotly-plot')];
figs.forEach(gd => {
  const host = gd.closest('.dash-graph') || gd.parentElement;
  let id = host.id; try { id = JSON.parse(host.id).name; } catch (e) {}
  const svg = gd.querySelector('.main-svg');
  if (!svg) { problems.push(id + ': nothing drawn'); return; }
  const s = box(svg), h = box(host);
  const scroller = gd.closest('.al-graph-scroll');
  const view = scroller ? box(scroller) : h;
  if (h.b - h.t < 1) problems.push(`${id}: its box is ${Math.round(h.b - h.t)} px tall`);
  if (s.b - s.t > h.b - h.t + 1)
    problems.push(`${id}: figure ${Math.round(s.b - s.t)} px tall in a ` +
                  `${Math.round(h.b - h.t)} px box`);
  if (s.r - s.l > h.r - h.l + 1)
    problems.push(`${id}: figure ${Math.round(s.r - s.l)} px wide in a ` +
                  `${Math.round(h.r - h.l)} px box`);
  items.push({what: 'figure ' + id, rect: clip(s, view), el: gd});
  gd.querySelectorAll('.gtitle, .xtick text, .ytick text, .g-xtitle text, ' +
    '.g-ytitle text, .cbtitle text, .cbaxis text, .legendtext, .annotation-text').forEach(t => {
    const r = box(t);
    if (r.r - r.l < 0.5) return;
    if (r.l < s.l - 1 || r.r > s.r + 1 || r.t < s.t - 1 || r.b > s.b + 1)
      problems.push(`${id}: '${(t.textContent || '').slice(0, 30)}' is cut by the ` +
                    "figure's edge"); });
  // inside the figure: titles, subplot titles, axis titles, legend and colour bars never
  // overlap each other, and a colour bar or the legend never covers a plot area
  const part = (sel, kind) => [...gd.querySelectorAll(sel)].map(e => ({kind: kind, e: e,
    r: box(e), name: kind + " '" + (e.textContent || '').slice(0, 24) + "'"}))
    .filter(p => p.r.r - p.r.l > 0.5 && p.r.b - p.r.t > 0.5);
  const texts = part('.gtitle', 'title').concat(part('.annotation-text', 'label'),
    part('.g-xtitle text, .g-x2title text, .g-x3title text, .g-x4title text', 'axis title'),
    part('.g-ytitle text, .g-y2title text, .g-y3title text, .g-y4title text', 'axis title'));
  const boxes = part('.legend', 'legend').concat(part('.colorbar', 'colour bar'));
  const plots = part('.nsewdrag', 'plot area');
  const inner = texts.concat(boxes);
  for (let i = 0; i < inner.length; i++) for (let j = i + 1; j < inner.length; j++) {
    if (inner[i].e.contains(inner[j].e) || inner[j].e.contains(inner[i].e)) continue;
    if (area(inner[i].r, inner[j].r) > 4)
      problems.push(`${id}: ${inner[i].name} overlaps ${inner[j].name}`); }
  boxes.concat(texts.filter(t => t.kind !== 'label')).forEach(b => plots.forEach(p => {
    if (area(b.r, p.r) > 4) problems.push(`${id}: ${b.name} covers a plot area ` +
      `(${[b.r.l, b.r.t, b.r.r, b.r.b].map(Math.round)} on ` +
      `${[p.r.l, p.r.t, p.r.r, p.r.b].map(Math.round)})`);
  }));
  const mb = gd.querySelector('.modebar');
  if (mb) gd.querySelectorAll('.gtitle').forEach(t => {
    if (area(box(mb), box(t)) > 1) problems.push(`${id}: the toolbar covers the title`); });
  if (innerWidth < 500) gd.querySelectorAll('.colorbar').forEach(c => {
    const r = box(c);
    if (r.r - r.l > 0.25 * Math.min(s.r - s.l, view.r - view.l))
      problems.push(`${id}: colour bar ${Math.round(r.r - r.l)} px wide on a phone`); });
});
// a DataTable draws several <table>s on top of each other: it counts as one table
document.querySelectorAll('.al-page table, .al-page .dash-table-container, .al-page h1, ' +
    '.al-page h2, .al-page h3, .al-page h4, .al-graph-toolbar, .al-choice, .al-controls')
  .forEach(e => {
    if (e.tagName === 'TABLE' && e.closest('.dash-table-container')) return;
    if (e.closest('details:not([open])')) return;  // a closed help panel's content
    if (e.offsetParent !== null) items.push({what: label(e), rect: box(e), el: e}); });
for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) {
  const a = items[i], b = items[j];
  if (a.el.contains(b.el) || b.el.contains(a.el)) continue;
  const x = area(a.rect, b.rect);
  if (x > 4) problems.push(`${a.what} overlaps ${b.what} (${Math.round(x)} px²)`);
}
const de = document.documentElement;
if (de.scrollWidth > de.clientWidth + 1)
  problems.push(`the page scrolls sideways (${de.scrollWidth} px in ${de.clientWidth} px)`);
return {figures: figs.length, problems: problems};
"""

#: Every graph on the page has drawn its analysis (the blank placeholder has no title).
DRAWN_JS = """
const figs = [...document.querySelectorAll('.al-graph .js-plotly-plot')];
if (figs.length < document.querySelectorAll('.al-graph').length) { return false; }
return figs.every(g => g._fullLayout && !g.classList.contains('dash-graph--pending') &&
                       ((g._fullData || []).length > 0 ||
                        (g.layout && g.layout.title && g.layout.title.text)));
"""


def wait(duo, js: str, timeout: float = TIMEOUT, what: str = ""):
    """:func:`test_browser.wait` with this file's longer default timeout."""
    return browser_wait(duo, js, timeout, what)


def set_size(duo, width: int, height: int) -> None:
    """The viewport of a phone or a desktop window, before the page loads."""
    duo.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})


def page_geometry(duo, settle: float = 4.0) -> dict:
    """Wait for every figure to draw, then the geometry report (problems allowed to settle:
    the graph boxes take their figures' sizes one callback after the figures arrive)."""
    end = time.time() + TIMEOUT
    while time.time() < end and not duo.driver.execute_script(DRAWN_JS):
        time.sleep(0.25)
    end = time.time() + settle
    report = duo.driver.execute_script(GEOMETRY_JS)
    while report["problems"] and time.time() < end:
        time.sleep(0.25)
        report = duo.driver.execute_script(GEOMETRY_JS)
    return report


def full_screenshot(duo, path: Path, width: int, height: int) -> None:
    """A screenshot of the whole page (the viewport grown to its height, then restored)."""
    full = duo.driver.execute_script("return document.documentElement.scrollHeight")
    set_size(duo, width, min(int(full), 6000))
    time.sleep(0.4)
    duo.driver.save_screenshot(str(path))
    set_size(duo, width, height)


def small_screenshot(duo, path: Path, scale: float) -> None:
    """The whole page as a PNG scaled by ``scale`` (Chromium scales it: no image library)."""
    import base64

    size = duo.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = duo.driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                 "scale": scale}})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture
def lens(dash_duo, registry):
    """The app over the shipped weights, served on a local port."""
    dash_duo.start_server(create_app(registry))
    dash_duo.driver.set_script_timeout(120)  # a busy machine's browser answers slowly
    return dash_duo


def pages() -> list[str]:
    """Every page's path, in navbar order."""
    return [p["path"] for p in sorted(dash.page_registry.values(),
                                      key=lambda p: (p.get("order") or 0, p["path"]))]


@pytest.mark.parametrize("size", list(SIZES))
def test_every_page_is_laid_out_on_first_load(lens, size):
    width, height = SIZES[size]
    SHOTS.mkdir(parents=True, exist_ok=True)
    failures = {}
    paths = pages()
    assert len(paths) >= 10
    for path in paths:
        set_size(lens, width, height)
        lens.driver.get(url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT))
        lens.wait_for_element(".al-page", timeout=TIMEOUT)
        report = page_geometry(lens)
        name = path.strip("/") or "overview"
        full_screenshot(lens, SHOTS / f"{name}-{size}.png", width, height)
        if README_SHOTS and name in README_PAGES:
            small_screenshot(lens, Path(README_SHOTS) / f"{name}-{size}.png",
                             README_SCALE[size])
        if path != "/":
            assert report["figures"] > 0, f"{path}: no figure"
        if report["problems"]:
            failures[path] = report["problems"]
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)


# ------------------------------------------------------------------------ real clicks
def cell_point(duo, gd_js: str, x: float, y: float, xaxis: str = "xaxis",
               yaxis: str = "yaxis") -> tuple[float, float]:
    """Viewport pixel of data point (x, y) of a figure, from its own axes (scrolled to it)."""
    duo.driver.execute_script(f"""
        const gd = {gd_js}, xa = gd._fullLayout['{xaxis}'], ya = gd._fullLayout['{yaxis}'];
        const r = gd.getBoundingClientRect();
        window.scrollBy(0, r.top + ya._offset + ya.l2p({y}) - innerHeight / 2);""")
    time.sleep(0.3)
    return duo.driver.execute_script(f"""
        const gd = {gd_js}, xa = gd._fullLayout['{xaxis}'], ya = gd._fullLayout['{yaxis}'];
        const r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p({x}), r.top + ya._offset + ya.l2p({y})];""")


def real_click(duo, x: float, y: float) -> None:
    """A trusted pointer click at viewport pixel (x, y)."""
    ActionChains(duo.driver).move_to_location(int(round(x)), int(round(y))).pause(0.2) \
        .click().perform()


def graph_js(page: str, name: str) -> str:
    """JS expression for the plotly div of a page's graph."""
    gid = json.dumps({"name": name, "page": page, "type": "al-graph"}, separators=(",", ":"))
    return (f"(document.getElementById({json.dumps(gid)}) || document.body)"
            ".querySelector('.js-plotly-plot')")


def test_clicking_a_token_pins_it_for_the_predictions_page(lens, registry):
    set_size(lens, *SIZES["desktop"])
    lens.driver.get(url(lens, "/tokens", model=MODEL, text=shell.DEFAULT_PROMPT))
    gd = graph_js("tokens", "tokens")
    wait(lens, f"{gd} && {gd}._fullData && {gd}._fullData.length > 1", what="the token grid")
    lens.wait_for_contains_text("#tokens-pinned", "No token pinned", timeout=TIMEOUT)
    per_row = int(lens.find_element("#tokens-per_row").get_attribute("value") or 16)
    pos = 30
    x, y = cell_point(lens, gd, pos % per_row, pos // per_row)
    real_click(lens, x, y)
    fp = registry.forward(shell.DEFAULT_PROMPT, MODEL)
    lens.wait_for_contains_text("#tokens-pinned", f"Pinned position {pos} ('{fp.display[pos]}')",
                                timeout=TIMEOUT)
    wait(lens, "new URLSearchParams(location.search).get('pos') === '30'", what="pos in the URL")
    # the pinned token is outlined in the grid
    wait(lens, f"({gd}.layout.shapes || []).length === 1", what="the pinned cell's outline")
    # ...and reaches the predictions page through the navbar link
    lens.driver.find_element(By.LINK_TEXT, "Predictions").click()
    nt = graph_js("predictions", "next-token")
    wait(lens, f"location.pathname === '/predictions' && {nt} && {nt}._fullLayout && "
               f"{nt}._fullLayout.title.text.indexOf('(position {pos})') >= 0",
         what="the predictions at the pinned position")
    assert lens.find_element("#predictions-pos").get_attribute("value") == str(pos)
    assert parse_qs(urlparse(lens.driver.current_url).query)["pos"] == [str(pos)]


def test_clicking_a_head_thumbnail_shows_that_head(lens):
    set_size(lens, *SIZES["desktop"])
    lens.driver.get(url(lens, "/attention", model=MODEL, text=shell.DEFAULT_PROMPT))
    pattern, grid = graph_js("attention", "pattern"), graph_js("attention", "all-heads")
    wait(lens, f"{pattern} && {pattern}._fullLayout && {pattern}._fullLayout.title.text"
               ".indexOf('Layer 1, head 0') === 0", what="the default head L1H0")
    lens.wait_for_contains_text("#attention-choice", "strongest induction head on this prompt",
                                timeout=TIMEOUT)
    wait(lens, f"{grid} && {grid}._fullData && {grid}._fullData.length === 24",
         what="the grid")
    # L0H2 is the third thumbnail of the first row: subplot 3
    x, y = cell_point(lens, grid, 20, 30, "xaxis3", "yaxis3")
    real_click(lens, x, y)
    wait(lens, f"{pattern}._fullLayout.title.text.indexOf('Layer 0, head 2') === 0",
         what="the main figure showing L0H2")
    assert lens.find_element("#attention-layer").get_attribute("value") == "0"
    assert lens.find_element("#attention-head").get_attribute("value") == "2"
    wait(lens, f"({grid}.layout.shapes || []).some(s => s.xref === 'x3 domain')",
         what="the outline on L0H2's thumbnail")
    # the main figure is brought into view
    wait(lens, "Math.abs(document.getElementById('attention-choice')"
               ".getBoundingClientRect().top) < 80", what="the main figure scrolled into view")
