"""Browser tests (dash_duo + Debian Chromium): every page, URL state, downloads, safety, phone."""

from __future__ import annotations

import glob
import io
import json
import os
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import dash
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from attention_lens.server.app import create_app
from attention_lens.components import shell

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
#: Screenshots of every page land here (set ATTENTION_LENS_SCREENSHOTS=assets/screenshots to
#: refresh the README's pictures).
SHOTS = Path(os.environ.get("ATTENTION_LENS_SCREENSHOTS", "/tmp/dash_artifacts/screenshots"))
MODEL = "attn-only-2l"
TIMEOUT = 20
#: A first visit may wait for background jobs (weight and dataset analyses in a new process).
FIRST_VISIT = 90


@pytest.fixture
def lens(dash_duo, registry):
    """The app over the shipped weights, served on a local port."""
    dash_duo.start_server(create_app(registry))
    dash_duo.driver.set_script_timeout(120)  # a busy machine's browser answers slowly
    return dash_duo


def url(duo, path: str = "/", **params) -> str:
    """An app URL with query parameters."""
    q = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return f"{duo.server_url}{path}" + (f"?{q}" if q else "")


def wait(duo, js: str, timeout: float = TIMEOUT, what: str = ""):
    """Wait until the JavaScript expression ``js`` is truthy; return its value."""
    end = time.time() + timeout
    value = None
    while time.time() < end:
        value = duo.driver.execute_script(f"return ({js});")
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or js} (last value {value!r})")


def graph_js(page: str, name: str) -> str:
    """JS expression for the plotly div of a page's graph."""
    gid = json.dumps({"name": name, "page": page, "type": "al-graph"}, separators=(",", ":"))
    return (f"(document.getElementById({json.dumps(gid)}) || document.body)"
            ".querySelector('.js-plotly-plot')")


def drawn(page: str, name: str) -> str:
    """JS: the number of points of the graph's first trace once drawn (bars, scatter)."""
    gd = graph_js(page, name)
    return f"({gd} && {gd}._fullData && {gd}._fullData.length > 0 && {gd}._fullData[0]._length)"


def has_traces(page: str, name: str) -> str:
    """JS: true once the graph shows at least one trace (the placeholder has none)."""
    gd = graph_js(page, name)
    return f"({gd} && {gd}._fullData && {gd}._fullData.length > 0)"


def by_id(duo, component_id: dict):
    """The DOM element of a component with a dict id (Dash sorts the keys)."""
    gid = json.dumps(component_id, sort_keys=True, separators=(",", ":"))
    el = duo.driver.execute_script("return document.getElementById(arguments[0])", gid)
    assert el is not None, gid
    return el


def severe_logs(duo) -> list:
    """Severe browser console messages (favicon noise excluded)."""
    return [e for e in duo.get_logs() or [] if e.get("level") == "SEVERE"
            and "favicon" not in e.get("message", "")]


def page_alerts(duo) -> list[str]:
    """Texts of the danger alerts currently shown."""
    return [e.text for e in duo.driver.find_elements(By.CSS_SELECTOR, ".alert-danger")]


def type_prompt(duo, text: str) -> None:
    """Replace the prompt box's text the way a user would (select all, type)."""
    box = duo.find_element("#shell-text")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    assert box.get_attribute("value") == text


def n_tokens(registry, text: str) -> int:
    """Tokens the shipped model reads for ``text``."""
    return registry.forward(text, MODEL).n_tokens


FIRST_GRAPH = {"predictions": "surprisal", "tokens": "tokens", "attention": "pattern",
               "logit-lens": "logit-lens", "attribution": "components", "ablation": "positions"}


def test_every_page_renders_without_console_errors(lens):
    pages = sorted(dash.page_registry.values(), key=lambda p: p.get("order") or 0)
    assert len(pages) >= 7
    SHOTS.mkdir(parents=True, exist_ok=True)
    for p in pages:
        lens.driver.get(url(lens, p["path"], model=MODEL, text=shell.DEFAULT_PROMPT))
        lens.wait_for_element(".al-page", timeout=TIMEOUT)
        name = p["path"].strip("/") or "overview"
        if name == "overview":
            lens.wait_for_element(".al-card", timeout=TIMEOUT)
        else:
            wait(lens, "document.querySelectorAll('.al-graph .js-plotly-plot').length > 0 && "
                       "Array.from(document.querySelectorAll('.al-graph .js-plotly-plot'))"
                       ".some(g => g._fullData && g._fullData.length > 0)",
                 timeout=FIRST_VISIT, what=f"a drawn figure on {p['path']}")
        time.sleep(0.5)
        assert page_alerts(lens) == [], p["path"]
        assert severe_logs(lens) == [], p["path"]
        lens.driver.save_screenshot(str(SHOTS / f"{name}.png"))


def test_new_prompt_updates_the_page_and_back_restores_it(lens, registry):
    lens.driver.get(url(lens, "/predictions", model=MODEL, text=shell.DEFAULT_PROMPT))
    n0 = n_tokens(registry, shell.DEFAULT_PROMPT)
    assert wait(lens, drawn("predictions", "surprisal")) == n0
    new = "The cat sat on the mat. The cat sat on the mat."
    type_prompt(lens, new)
    lens.find_element("#shell-analyse").click()
    n1 = n_tokens(registry, new)
    assert n1 != n0
    wait(lens, f"{drawn('predictions', 'surprisal')} === {n1}", what="redraw for new prompt")
    query = parse_qs(urlparse(lens.driver.current_url).query)
    assert query["text"] == [new] and query["model"] == [MODEL]
    # navbar links carry the prompt to the other pages
    lens.driver.find_element(By.LINK_TEXT, "Attention").click()
    gd = graph_js("attention", "pattern")
    wait(lens, f"{gd} && {gd}._fullLayout && {gd}._fullLayout.xaxis._categories && "
               f"{gd}._fullLayout.xaxis._categories.length === {n1}", what="attention axis")
    lens.driver.back()
    wait(lens, "location.pathname === '/predictions'")
    lens.driver.back()
    prompt = json.dumps(shell.DEFAULT_PROMPT)
    wait(lens, f"document.getElementById('shell-text').value === {prompt}",
         what="prompt restored by back")
    wait(lens, f"{drawn('predictions', 'surprisal')} === {n0}", what="redraw after back")
    assert severe_logs(lens) == []


def test_deep_link_reproduces_its_state(lens):
    text = "Alice met Bob. Alice met Bob."
    lens.driver.get(url(lens, "/attention", model="attn-only-1l", text=text, layer=0, head=3))
    gd = graph_js("attention", "pattern")
    # wait for the drawn figure (an empty graph's title placeholder is text too)
    wait(lens, has_traces("attention", "pattern"), what="the drawn pattern")
    title = lens.driver.execute_script(f"return {gd}._fullLayout.title.text;")
    assert "Layer 0, head 3" in title
    assert lens.find_element("#shell-text").get_attribute("value") == text
    assert lens.find_element("#shell-model").get_attribute("value") == "attn-only-1l"
    assert lens.find_element("#attention-head").get_attribute("value") == "3"
    # a bad parameter in a link is reported, the page still works
    lens.driver.get(url(lens, "/attention", model=MODEL, text=text, layer="two"))
    lens.wait_for_contains_text("#attention-url-alerts", "layer must be a whole number",
                                timeout=TIMEOUT)
    wait(lens, has_traces("attention", "pattern"))


def _downloaded(duo, pattern: str, timeout: float = 60) -> str:
    end = time.time() + timeout
    while time.time() < end:
        files = [f for f in glob.glob(os.path.join(duo.download_path, pattern))
                 if not f.endswith(".crdownload")]
        if files:
            return files[0]
        time.sleep(0.3)
    raise AssertionError(f"no {pattern} in {duo.download_path}: {os.listdir(duo.download_path)}")


def test_png_svg_csv_and_page_export_downloads(lens):
    lens.driver.get(url(lens, "/predictions", model=MODEL, text=shell.DEFAULT_PROMPT, k=5))
    wait(lens, drawn("predictions", "next-token"))
    gd = graph_js("predictions", "next-token")
    wait(lens, f"{gd}._context.toImageButtonOptions.filename.indexOf('{MODEL}') > 0",
         what="file name with the model in the modebar config")
    host = by_id(lens, {"name": "next-token", "page": "predictions", "type": "al-graph"})
    # real (trusted) clicks: Chromium blocks repeated downloads that no user gesture started
    lens.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", host)
    ActionChains(lens.driver).move_to_element(host).perform()
    camera = host.find_element(By.CSS_SELECTOR, ".modebar-btn[data-title^='Download plot']")
    camera.click()
    png = _downloaded(lens, "predictions-next-token-attn-only-2l-*.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    def click(kind: str, fmt: str) -> None:
        button = by_id(lens, {"fmt": fmt, "name": "next-token", "page": "predictions",
                              "type": kind})
        lens.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    click("al-img", "svg")
    svg = _downloaded(lens, "predictions-next-token-*.svg")
    assert "<svg" in open(svg, encoding="utf-8").read(500)
    click("al-data", "csv")
    csv = _downloaded(lens, "predictions-next-token-*.csv")
    assert open(csv, encoding="utf-8").readline().startswith("trace,name,type,x,y")

    export = by_id(lens, {"page": "predictions", "type": "al-export"})
    lens.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", export)
    # plotly's "Preparing image" notes sit over the top right corner for a moment
    wait(lens, "document.querySelectorAll('.notifier-note').length === 0", timeout=30,
         what="plotly's notes to close")
    export.click()
    zpath = _downloaded(lens, "predictions-page-*.zip", timeout=120)
    time.sleep(0.5)
    zf = zipfile.ZipFile(io.BytesIO(open(zpath, "rb").read()))
    names = set(zf.namelist())
    assert {"manifest.json", "next-token.png", "next-token.svg", "surprisal.png",
            "surprisal.svg", "surprisal.csv", "next-token.json"} <= names
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["model"] == MODEL and manifest["prompt"] == shell.DEFAULT_PROMPT
    assert manifest["settings"]["k"] == 5 and manifest["token_ids"]
    assert zf.read("next-token.png")[:4] == b"\x89PNG"


def test_html_in_the_prompt_is_shown_as_text(lens):
    evil = "<img src=x onerror=alert(1)>"
    lens.driver.get(url(lens, "/tokens", model=MODEL, text=shell.DEFAULT_PROMPT))
    wait(lens, has_traces("tokens", "tokens"))
    type_prompt(lens, evil)
    lens.find_element("#shell-analyse").click()
    wait(lens, "decodeURIComponent(location.search.replace(/\\+/g, ' '))"
               f".indexOf({json.dumps(evil)}) >= 0", what="URL with the new prompt")
    time.sleep(1.5)
    with pytest.raises(NoAlertPresentException):
        lens.driver.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    assert lens.driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length"
                                      ) == 0
    assert lens.find_element("#shell-text").get_attribute("value") == evil
    # the same prompt from a link
    lens.driver.get(url(lens, "/predictions", model=MODEL, text=evil))
    wait(lens, drawn("predictions", "surprisal"))
    with pytest.raises(NoAlertPresentException):
        lens.driver.switch_to.alert.text  # noqa: B018
    assert lens.driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length"
                                      ) == 0


def test_no_request_leaves_the_server(lens):
    for path in ("/", "/attention", "/logit-lens"):
        lens.driver.get(url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT))
        lens.wait_for_element(".al-page", timeout=TIMEOUT)
        time.sleep(1.5)
        entries = lens.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".concat([location.href])")
        origin = "{0.scheme}://{0.netloc}".format(urlparse(lens.server_url))
        foreign = [e for e in entries if not (e.startswith(origin) or e.startswith("data:")
                                              or e.startswith("blob:"))]
        assert foreign == [], foreign
        sheets = lens.driver.execute_script(
            "return Array.from(document.styleSheets).map(s => s.href).filter(Boolean)")
        assert any("bootstrap.min.css" in s for s in sheets)
        assert all(s.startswith(origin) for s in sheets)


def test_phone_width_has_no_horizontal_scroll(lens):
    lens.driver.set_window_size(390, 844)
    for path in ("/", "/predictions", "/attention", "/logit-lens"):
        lens.driver.get(url(lens, path, model=MODEL, text=shell.DEFAULT_PROMPT))
        lens.wait_for_element(".al-page", timeout=TIMEOUT)
        if path != "/":
            wait(lens, "document.querySelector('.al-graph .js-plotly-plot') && "
                       "document.querySelector('.al-graph .js-plotly-plot')._fullData")
        time.sleep(0.8)
        widths = lens.driver.execute_script(
            "return [document.body.scrollWidth, document.documentElement.clientWidth, "
            "window.innerWidth]")
        assert widths[0] <= widths[1], (path, widths)
        if path == "/attention":
            lens.driver.save_screenshot(str(SHOTS / "phone-attention.png"))


def test_background_job_progress_then_figure(dash_duo, bg):
    """A weight analysis that is not computed yet: it runs as a background job and the
    figures are drawn when the job finishes (a fresh store, so nothing is cached)."""
    from attention_lens.registry import DEFAULT_WEIGHTS, Registry

    dash_duo.start_server(create_app(Registry([DEFAULT_WEIGHTS]), background=bg))
    dash_duo.driver.get(url(dash_duo, "/weights", model=MODEL, text="Harry Potter"))
    wait(dash_duo, has_traces("weights", "spectra"), timeout=60, what="the drawn spectra")
    assert severe_logs(dash_duo) == []
