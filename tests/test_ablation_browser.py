"""/ablation on a GPT-2-small-shaped random model at 256 tokens in the browser: the chosen
heads' panels draw at once while every head's sweep runs as background work with progress,
the sweep then draws, and a second visit draws everything from the caches."""

from __future__ import annotations

import json
import time

import pytest
from test_browser_scale import (  # noqa: F401 - fixtures
    COLD_S,
    big,
    check_page,
    gpt2_small,
    open_page,
    wait_drawn,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1800)]


def drawn(duo) -> dict:
    """Traces drawn in each graph of the page, by graph name."""
    out = {}
    for name in ("predictions", "positions", "sweep"):
        gid = json.dumps({"name": name, "page": "ablation", "type": "al-graph"},
                         separators=(",", ":"))
        out[name] = duo.driver.execute_script(
            f"const e = document.getElementById({json.dumps(gid)});"
            "const g = e && (e.classList.contains('js-plotly-plot') ? e :"
            " e.querySelector('.js-plotly-plot'));"
            "return g && g._fullData ? g._fullData.length : 0")
    return out


def test_ablation_panels_draw_while_the_sweep_runs(big):  # noqa: F811 - the fixture
    duo, text, reg = big
    model = reg.default
    open_page(duo, "/ablation", model, text)
    duo.wait_for_element(".al-page", timeout=60)
    end = time.time() + COLD_S
    while time.time() < end:
        seen = drawn(duo)
        if seen["predictions"] and seen["positions"]:
            break
        time.sleep(0.5)
    # the chosen heads' panels are drawn and the sweep is still running in the background,
    # its progress strip shown
    assert seen["predictions"] and seen["positions"] and not seen["sweep"], seen
    # the progress strip shows while the sweep has not drawn; before the sweep arrives it
    # names the job and its bar has moved
    strip = duo.driver.find_element("id", "ablation-job-strip")
    end = time.time() + 60
    while not strip.is_displayed() and time.time() < end:
        time.sleep(0.2)
    assert strip.is_displayed() and not drawn(duo)["sweep"], drawn(duo)

    def strip_text() -> str:
        return duo.driver.find_element("id", "ablation-job-text").text

    end = time.time() + COLD_S
    while "zero-ablation of each head" not in strip_text() and not drawn(duo)["sweep"] \
            and time.time() < end:
        time.sleep(0.3)
    assert "zero-ablation of each head" in strip_text() and not drawn(duo)["sweep"], \
        strip_text()
    value = duo.driver.execute_script(
        "return document.querySelector('#ablation-job-bar .progress-bar')"
        ".getAttribute('aria-valuenow')")
    assert 0 < float(value) <= 100, value
    wait_drawn(duo, COLD_S, "/ablation sweep")
    gid = json.dumps({"name": "sweep", "page": "ablation", "type": "al-graph"},
                     separators=(",", ":"))
    rows, cols = duo.driver.execute_script(
        f"const g = document.getElementById({json.dumps(gid)}).querySelector('.js-plotly-plot');"
        "const z = g._fullData[0].z; return [z.length, z[0].length]")
    assert (rows, cols) == (12, 12)
    check_page(duo, "ablation")
    # a second visit draws every panel from the caches
    t0 = time.time()
    open_page(duo, "/ablation", model, text)
    duo.wait_for_element(".al-page", timeout=60)
    wait_drawn(duo, 120, "/ablation on a second visit")
    print(json.dumps({"ablation_second_visit_s": round(time.time() - t0, 2)}))
