"""What a person can read: every page at 1440 and 390 px, in the dark and the light theme.

Every page is loaded once (Debian Chromium, one test a page) and looked at four times: desktop and phone in the dark theme, then (the theme button clicked) phone and
desktop in the light one. The test fails when

- two tick labels of one axis of one subplot overlap (their rotated boxes, from the SVG's
  own geometry, intersect),
- any visible text is smaller than 11 px (HTML text and the figures' SVG text),
- text contrast against its effective background is below 4.5:1 (WCAG AA: relative
  luminance from the computed colours, the background found by walking up the page, alpha
  and opacity composited), for HTML text and the figures' titles, axes and legends,
- a slider's value bubble covers one of its marks,

and, on /graph, when a really clicked node's details appear outside the viewport or two
nodes of one (position, layer) cell are drawn on top of each other. The layout itself
(figures against their boxes, overlaps) is :mod:`test_geometry`'s.

Screenshots: ``ATTENTION_LENS_LEGIBILITY_SHOTS=DIR`` (every page, width and theme, full
size) and ``ATTENTION_LENS_LEGIBILITY_ROW_SHOTS=assets/screenshots/legibility`` (the small
pictures kept in the repository); ``ATTENTION_LENS_LEGIBILITY_PAGES=/graph,/qk`` limits the
pages while debugging.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_browser import url
from test_geometry import (
    SIZES,
    TIMEOUT,
    full_screenshot,
    graph_js,
    pages,
    real_click,
    set_size,
    wait,
)

from attention_lens.server.app import create_app
from attention_lens.components import shell
from attention_lens.figures.theme import LIGHT_PAPER, PAPER

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("ATTENTION_LENS_LEGIBILITY_SHOTS",
                            "/tmp/dash_artifacts/legibility"))
MODEL = "attn-only-2l"
#: With ATTENTION_LENS_LEGIBILITY_ROW_SHOTS=DIR, small pictures of these pages (dark theme,
#: both widths) land in DIR: the pages the legibility work changed, kept in the repository
#: (assets/screenshots/legibility).
#: Each picture is one screen from the element the row is about (a JS expression).
ROW_FOCUS = {
    "attention": graph_js("attention", "pattern"),
    "induction": graph_js("induction", "scores"),
    "logit-lens": graph_js("logit-lens", "logit-lens"),
    "eigenvalues": "document.querySelector('.al-graph')",
    "qk": graph_js("qk", "top"),
    "graph": "document.querySelector('#graph-detail .al-node-detail') || "
             "document.querySelector('.al-graph')",
    "embeddings": graph_js("embeddings", "map"),
    "weights": graph_js("weights", "spectra"),
    "patching": "document.querySelector('.al-pair')",
    "compare": "document.getElementById('compare-model_b')",
    "heads": "document.querySelector('a.btn.me-2')",
    "analogy": "document.querySelector('.al-terms')",
}
ROW_PAGES = tuple(ROW_FOCUS)
ROW_SCALE = {"desktop": 0.3, "phone": 0.45}


def row_screenshot(duo, path: Path, focus: str, scale: float) -> None:
    """One screen of the page from the element ``focus`` (a little above it), scaled."""
    import base64

    top = duo.driver.execute_script(
        f"const e = {focus}; if (!e) return 0;"
        "return Math.max(0, e.getBoundingClientRect().top + scrollY - 60);")
    size = duo.driver.execute_script("return [innerWidth, innerHeight]")
    shot = duo.driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": top, "width": size[0], "height": size[1], "scale": scale}})
    path.write_bytes(base64.b64decode(shot["data"]))
#: Smallest legible text (px) and WCAG AA's contrast for normal text.
MIN_FONT, MIN_CONTRAST = 11, 4.5

LEGIBILITY_JS = r"""
const MIN_FONT = arguments[0], MIN_CONTRAST = arguments[1];
const problems = [];
const say = p => { if (problems.length < 60 && !problems.includes(p)) problems.push(p); };
const short = s => (s || '').replace(/\s+/g, ' ').trim().slice(0, 30);
const figName = el => { const host = el.closest('.dash-graph') || el.closest('[id]');
  if (!host) return '?'; try { return JSON.parse(host.id).name; } catch (e) { return host.id; } };

// ---- colours: parse, composite, relative luminance (WCAG 2.x)
const parse = c => { const m = (c || '').match(/rgba?\(([^)]+)\)/);
  if (!m) return null;
  const v = m[1].split(/[ ,\/]+/).filter(x => x).map(parseFloat);
  return [v[0], v[1], v[2], v.length > 3 ? v[3] : 1]; };
const over = (top, below) => { const a = top[3];
  return [0, 1, 2].map(i => top[i] * a + below[i] * (1 - a)).concat([1]); };
const lum = c => { const f = x => { x /= 255;
  return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
const ratio = (a, b) => { const x = lum(a), y = lum(b);
  return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05); };
// the colour behind an element: its own background over its ancestors', composited
// (memoised: a page has thousands of text elements under a few hundred backgrounds)
const bgMemo = new Map(), opMemo = new Map();
const background = el => {
  if (!el || el.nodeType !== 1) return [255, 255, 255, 1];
  if (bgMemo.has(el)) return bgMemo.get(el);
  let bg = parse(getComputedStyle(el).backgroundColor);
  if (el.classList && el.classList.contains('main-svg') && el.style.background)
    bg = parse(el.style.background) || bg;
  const c = bg && bg[3] >= 1 ? bg : (bg && bg[3] > 0 ? over(bg, background(el.parentElement))
                                                     : background(el.parentElement));
  bgMemo.set(el, c);
  return c; };
const opacity = el => {
  if (!el || el.nodeType !== 1) return 1;
  if (opMemo.has(el)) return opMemo.get(el);
  const o = parseFloat(getComputedStyle(el).opacity || '1') * opacity(el.parentElement);
  opMemo.set(el, o);
  return o; };
const visible = el => { if (!el.getClientRects().length) return false;
  const cs = getComputedStyle(el);
  if (cs.visibility === 'hidden' || opacity(el) < 0.05) return false;
  if (el.closest('details:not([open]) > :not(summary)')) return false;
  const r = el.getBoundingClientRect(); return r.width > 1 && r.height > 1; };
const check = (el, text, where, colour) => {
  const cs = getComputedStyle(el);
  const size = parseFloat(cs.fontSize);
  if (size < MIN_FONT - 0.01) say(`${where}: '${short(text)}' is ${size} px`);
  let fg = parse(colour || cs.color);
  if (!fg) return;
  fg = [fg[0], fg[1], fg[2], fg[3] * opacity(el)];
  if (fg[3] < 0.05) return;  // transparent text (a sizing shadow) is not read
  const bg = background(el), r = ratio(over(fg, bg), bg);
  if (r < MIN_CONTRAST) say(`${where}: '${short(text)}' contrast ${r.toFixed(2)}:1 ` +
    `(${cs.color} on rgb(${bg.slice(0, 3).map(Math.round).join(',')}))`); };

// ---- HTML text (figures apart)
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const seen = new Set();
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (!el || seen.has(el) || !n.textContent.trim()) continue;
  seen.add(el);
  if (el.closest('svg, script, style, noscript, option, title, .js-plotly-plot')) continue;
  if (!visible(el)) continue;
  const page = el.closest('.al-page') ? 'page' : 'frame';
  check(el, n.textContent, `${page} ${el.tagName.toLowerCase()}` +
        (el.className && typeof el.className === 'string' ?
         '.' + el.className.split(' ')[0] : ''));
}
document.querySelectorAll('input[type=text], input[type=number], input:not([type]), textarea, ' +
                          'select').forEach(el => {
  if (!visible(el) || !(el.value || '').trim()) return;
  check(el, el.value, 'input#' + el.id.slice(0, 40));
});

// ---- figures: SVG text size, contrast of titles, axes and legends, tick label overlap
const corners = t => { const b = t.getBBox(), m = t.getScreenCTM();
  return [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height],
          [b.x, b.y + b.height]].map(([x, y]) => [m.a * x + m.c * y + m.e,
                                                  m.b * x + m.d * y + m.f]); };
const shrink = (p, d) => { const cx = p.reduce((s, q) => s + q[0], 0) / 4,
  cy = p.reduce((s, q) => s + q[1], 0) / 4;
  return p.map(([x, y]) => { const l = Math.hypot(x - cx, y - cy) || 1;
    return [x - d * (x - cx) / l, y - d * (y - cy) / l]; }); };
const separated = (a, b) => { // separating axis test on two convex quadrilaterals
  for (const poly of [a, b]) for (let i = 0; i < 4; i++) {
    const p = poly[i], q = poly[(i + 1) % 4], nx = q[1] - p[1], ny = p[0] - q[0];
    const pa = a.map(v => v[0] * nx + v[1] * ny), pb = b.map(v => v[0] * nx + v[1] * ny);
    if (Math.max(...pa) <= Math.min(...pb) || Math.max(...pb) <= Math.min(...pa))
      return true; }
  return false; };
document.querySelectorAll('.js-plotly-plot').forEach(gd => {
  const id = figName(gd);
  gd.querySelectorAll('svg text, svg tspan').forEach(t => {
    if (!t.textContent.trim() || !visible(t)) return;
    const size = parseFloat(getComputedStyle(t).fontSize) * Math.hypot(
      t.getScreenCTM().a, t.getScreenCTM().b);
    if (size < MIN_FONT - 0.01) say(`figure ${id}: '${short(t.textContent)}' is ` +
                                    `${Math.round(size * 10) / 10} px`);
  });
  gd.querySelectorAll('.gtitle, .xtick text, .ytick text, .g-xtitle text, .g-ytitle text, ' +
                      '[class*=title] text, .legendtext, .cbaxis text').forEach(t => {
    if (!t.textContent.trim() || !visible(t)) return;
    let fg = parse(t.style.fill || getComputedStyle(t).fill);
    if (!fg) return;
    const paper = parse((gd.querySelector('.main-svg') || gd).style.background) ||
                  [255, 255, 255, 1];
    const bg = over(paper, background(gd));
    fg = [fg[0], fg[1], fg[2], fg[3] * parseFloat(t.style.fillOpacity || '1') * opacity(t)];
    const r = ratio(over(fg, bg), bg);
    if (r < MIN_CONTRAST) say(`figure ${id}: '${short(t.textContent)}' contrast ` +
                              `${r.toFixed(2)}:1`); });
  // tick labels, one axis of one subplot at a time
  gd.querySelectorAll('.xaxislayer-above, .yaxislayer-above').forEach(layer => {
    const ticks = [...layer.querySelectorAll('.xtick text, .ytick text')]
      .filter(t => t.textContent.trim() && visible(t))
      .map(t => ({t: t, p: shrink(corners(t), 0.5)}));
    for (let i = 0; i < ticks.length; i++) for (let j = i + 1; j < ticks.length; j++)
      if (!separated(ticks[i].p, ticks[j].p)) {
        say(`figure ${id}: tick labels '${short(ticks[i].t.textContent)}' and ` +
            `'${short(ticks[j].t.textContent)}' overlap`);
        return; }
  });
});
// ---- a slider's value bubble never covers one of its marks
document.querySelectorAll('.dash-slider-tooltip').forEach(tip => {
  if (!visible(tip)) return;
  const a = tip.getBoundingClientRect();
  const root = tip.closest('.al-control') || document;
  root.querySelectorAll('.dash-slider-mark').forEach(m => {
    const b = m.getBoundingClientRect();
    if (Math.min(a.right, b.right) - Math.max(a.left, b.left) > 1 &&
        Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 1)
      say(`slider value '${short(tip.textContent)}' covers the mark '${short(m.textContent)}'`);
  }); });
return problems;
"""


@pytest.fixture
def lens(dash_duo, registry):
    """The app over the shipped weights, served on a local port."""
    dash_duo.start_server(create_app(registry))
    dash_duo.driver.set_script_timeout(120)  # a busy machine's browser answers slowly
    return dash_duo


def legibility(duo) -> list[str]:
    """What cannot be read on the page now shown (figures drawn first)."""
    return duo.driver.execute_script(LEGIBILITY_JS, MIN_FONT, MIN_CONTRAST)


def graph_click_problems(duo) -> list[str]:
    """Click a head node of /graph; its details must appear inside the viewport."""
    gd = graph_js("graph", "graph")
    n = duo.driver.execute_script(
        f"const d = {gd}.data; const t = d[d.length - 1];"
        "return (t.customdata || []).findIndex(c => c[0] === 'head');")
    if n is None or n < 0:
        return ["/graph: no head node to click"]
    duo.driver.execute_script(f"{gd}.scrollIntoView({{block: 'center'}});")
    time.sleep(0.5)
    nodes = f"{gd}.calcdata[{gd}.calcdata.length - 1]"
    x, y = duo.driver.execute_script(
        f"const gd = {gd}, r = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, "
        f"ya = gd._fullLayout.yaxis, p = {nodes}[{n}];"
        "return [r.left + xa._offset + xa.l2p(p.x), r.top + ya._offset + ya.l2p(p.y)];")
    # no two nodes of one (position, layer) cell drawn on top of each other (centres closer
    # than the smaller marker's radius)
    crowded = duo.driver.execute_script(
        f"const gd = {gd}, xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;"
        f"const pts = {nodes}.map(p => [xa.l2p(p.x), ya.l2p(p.y), p.ms || 6,"
        "                               Math.round(p.x), Math.round(p.y)]);"
        "const out = [];"
        "for (let i = 0; i < pts.length; i++) for (let j = i + 1; j < pts.length; j++) {"
        "  if (pts[i][3] !== pts[j][3] || pts[i][4] !== pts[j][4]) continue;"
        "  const d = Math.hypot(pts[i][0] - pts[j][0], pts[i][1] - pts[j][1]);"
        "  if (d < Math.min(pts[i][2], pts[j][2]) / 2) out.push([i, j, Math.round(d)]); }"
        "return out;")
    problems = [f"/graph: nodes {i} and {j} of one (position, layer) cell are drawn {d} px "
                "apart, on top of each other" for i, j, d in crowded[:5]]
    real_click(duo, x, y)
    wait(duo, "document.querySelector('#graph-detail .al-node-detail')",
         what="the clicked node's details")
    time.sleep(1.0)  # any scrolling into view has finished
    where = duo.driver.execute_script(
        "const r = document.querySelector('#graph-detail .al-node-detail')"
        ".getBoundingClientRect(); return [r.top, r.bottom, innerHeight];")
    top, bottom, height = where
    if top < 0 or bottom > height:
        problems.append(f"/graph: the clicked node's details are at y {round(top)}–"
                        f"{round(bottom)}, outside the {height} px viewport")
    return problems


#: Every figure on the page has drawn (a trace, a title or a message) in the theme's paper
#: colour, and no graph is waiting for its callback.
DRAWN_JS = """
const paper = arguments[0];
const figs = [...document.querySelectorAll('.al-graph .js-plotly-plot')];
if (figs.length < document.querySelectorAll('.al-graph').length) return false;
if (document.querySelector('.al-graph [data-dash-is-loading="true"]')) return false;
return figs.every(g => g._fullLayout && !g.classList.contains('dash-graph--pending') &&
  (g._fullLayout.paper_bgcolor || '').toLowerCase() === paper &&
  ((g._fullData || []).length > 0 || (g.layout.title && g.layout.title.text) ||
   (g.layout.annotations || []).length > 0));
"""


def drawn(duo, theme: str, what: str) -> None:
    """Wait until every figure of the page is drawn in ``theme``, then let it settle."""
    paper = LIGHT_PAPER if theme == "light" else PAPER
    end = time.time() + TIMEOUT
    while not duo.driver.execute_script(DRAWN_JS, paper.lower()):
        if time.time() > end:
            raise AssertionError(f"{what}: the figures were not drawn in the {theme} theme")
        time.sleep(0.2)
    time.sleep(0.6)  # thinned tick labels are drawn one relayout later


def settled(duo, settle: float = 3.0) -> list[str]:
    """The page's legibility problems once figures stop redrawing (tick labels are thinned
    one relayout at a time after a figure draws or its window changes size)."""
    end = time.time() + settle
    problems = legibility(duo)
    while problems and time.time() < end:
        time.sleep(0.4)
        problems = legibility(duo)
    return problems


#: Every page, in navbar order (checked against the app's registry below): one test each,
#: so that a slow page (the dataset analyses of /heads on a first visit) has its own time.
PAGES = ("/", "/predictions", "/tokens", "/attention", "/embeddings", "/logit-lens",
         "/attribution", "/weights", "/ablation", "/eigenvalues", "/induction", "/qk",
         "/analogy", "/graph", "/patching", "/circuit", "/heads", "/compare")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_legible(lens, path):
    """The page loaded once: desktop and phone in the dark theme, then (the theme button
    clicked) phone and desktop in the light one."""
    if path == PAGES[0]:
        assert tuple(pages()) == PAGES, "a page was added or moved: list it in PAGES"
    SHOTS.mkdir(parents=True, exist_ok=True)
    shots = os.environ.get("ATTENTION_LENS_LEGIBILITY_SHOTS")
    rows = os.environ.get("ATTENTION_LENS_LEGIBILITY_ROW_SHOTS")
    failures: dict[str, list[str]] = {}
    steps = [("dark", "desktop"), ("dark", "phone"), ("light", "phone"), ("light", "desktop")]
    set_size(lens, *SIZES["desktop"])
    lens.driver.get(url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT))
    lens.wait_for_element(".al-page", timeout=TIMEOUT)
    name = path.strip("/") or "overview"
    for theme, size in steps:
        width, height = SIZES[size]
        if theme == "light" and size == "phone":
            # the navbar may be folded on a phone: the button is clicked where it is
            lens.driver.execute_script(f"document.getElementById('{shell.THEME}').click()")
        set_size(lens, width, height)
        wait(lens, f"document.documentElement.getAttribute('data-al-theme') === '{theme}'",
             what=f"the {theme} theme")
        drawn(lens, theme, path)
        problems = settled(lens)
        if path == "/graph" and (theme, size) in (("dark", "desktop"), ("light", "phone")):
            problems += graph_click_problems(lens)
        if shots:
            full_screenshot(lens, SHOTS / f"{name}-{size}-{theme}.png", width, height)
        if rows and theme == "dark" and name in ROW_PAGES:
            row_screenshot(lens, Path(rows) / f"{name}-{size}.png", ROW_FOCUS[name],
                           ROW_SCALE[size])
        if problems:
            failures[f"{path} ({size}, {theme})"] = problems
    (SHOTS / f"failures-{name}.json").write_text(
        json.dumps(failures, indent=1, ensure_ascii=False))
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)
