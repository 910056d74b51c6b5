"""Crafted links: every page renders whatever its URL's controls hold (integers past 2**64,
negative, thousands of digits, not numbers), with a message naming the control; never a
blank page (the router callback refused)."""

from __future__ import annotations

import json

import dash
import pytest
from test_browser import MODEL, lens, url, wait  # noqa: F401 - fixture

from attention_lens.components import controls
from attention_lens.server import ServerConfig, create_server

HOSTILE = ["18446744073709551616", "-18446744073709551616", "1" * 5000, "abc",
           "1,2,99999999999999999999"]
#: Values that are not whole numbers, or no bound of any page admits.
OUT_OF_RANGE = {"18446744073709551616", "-18446744073709551616", "1" * 5000}


@pytest.fixture(scope="module")
def app():
    app = create_server(ServerConfig())
    assert app.server.test_client().get("/").status_code == 200
    return app


@pytest.fixture(scope="module")
def route(app):
    """Open a path with a query string the way the browser's router does."""
    client = app.server.test_client()
    key = next(k for k in app.callback_map if "_pages_content.children" in k)

    def open_(path: str, search: str) -> tuple[int, str]:
        body = {"output": key,
                "outputs": [{"id": "_pages_content", "property": "children"},
                            {"id": "_pages_store", "property": "data"}],
                "inputs": [{"id": "_pages_location", "property": "pathname", "value": path},
                           {"id": "_pages_location", "property": "search", "value": search},
                           {"id": "shell-nav", "property": "data", "value": None}],
                "changedPropIds": ["_pages_location.pathname"]}
        r = client.post("/_dash-update-component", json=body)
        return r.status_code, r.get_data(as_text=True)

    return open_


def pages():
    specs = [p["attention_lens"] for p in dash.page_registry.values() if "attention_lens" in p]
    assert len(specs) >= 15
    return specs


def integer_controls(spec) -> list[str]:
    return [c.name for c in spec.controls if isinstance(c, (controls.Int, controls.IntList))]


def test_every_page_renders_any_url_control_value(app, route):
    refused, unsaid, n = [], [], 0
    for spec in pages():
        path = dash.page_registry[f"attention_lens.pages.{spec.page.replace('-', '_')}"]["path"]
        ints = integer_controls(spec)
        for value in HOSTILE:  # one link sets every control of the page to the value
            n += 1
            status, text = route(path, "?" + "&".join(f"{c}={value}"
                                                      for c in spec.control_names))
            if status != 200 or f"{spec.page}-{spec.control_names[0]}" not in text:
                refused.append((path, value[:24], status))
                continue
            shown = json.dumps(json.loads(text)["response"]["_pages_content"]["children"])
            unsaid += [(path, c, value[:24]) for c in ints if value in OUT_OF_RANGE
                       and f"Link parameter: {c} " not in shown
                       and f"Link parameter: {c}: " not in shown]
    print(f"{n} crafted links, {len(refused)} refused, {len(unsaid)} without a message")
    assert not refused, refused
    assert not unsaid, unsaid


@pytest.mark.parametrize("path,control", [
    ("/ablation", "pos"), ("/attribution", "pos"), ("/logit-lens", "pos"),
    ("/compare", "layer"), ("/compare", "head"), ("/compare", "position"),
    ("/heads", "query"), ("/induction", "src"), ("/patching", "position")])
def test_a_huge_integer_falls_back_with_a_message_on_the_control(route, path, control):
    status, text = route(path, f"?{control}=18446744073709551616")
    assert status == 200, text[:300]
    shown = json.dumps(json.loads(text)["response"]["_pages_content"]["children"])
    assert f"Link parameter: {control} 18446744073709551616 is" in shown, shown[:500]


def test_integer_parsing():
    pos = controls.Int("pos", None)
    assert pos.parse("12") == (12, None) and pos.parse(" -3 ") == (-3, None)
    assert pos.parse(7.0) == (7, None) and pos.parse(2**31 - 1) == (2**31 - 1, None)
    value, problem = pos.parse("1" * 5000)  # never converted: no 4300-digit ValueError
    assert value is None and "more than 40 digits" in problem
    value, problem = pos.parse("123456789012345678901234567")
    assert value is None and "1234567890… (27 digits)" in problem
    for bad in ("abc", "1_000", "١٢", "2.5", True, "0x10"):
        value, problem = pos.parse(bad)
        assert value is None and "whole number" in problem, bad
    layer = controls.Int("layer", 0, 0, lambda cfg: cfg)
    assert layer.parse("-" + "9" * 60, 3)[0] == 0 and layer.parse("9" * 60, 3)[0] == 3
    heads = controls.IntList("heads", count=lambda cfg: 4)
    assert heads.parse("1,3,99999999999999999999999", 4)[0] == [1, 3]
    assert heads.parse(",".join(["1"] * 5000), 4)[0] == []


@pytest.mark.browser
def test_a_crafted_link_in_the_browser_shows_the_page_and_the_message(lens):  # noqa: F811
    lens.driver.get(url(lens, "/compare", model=MODEL, layer="18446744073709551616",
                        position="-18446744073709551616", text="Hello there"))
    wait(lens, "document.body.innerText.includes('Link parameter: layer 18446744073709551616')",
         timeout=60, what="the message on the layer control")
    shown = lens.driver.execute_script("return document.body.innerText")
    assert "Link parameter: position -18446744073709551616" in shown, \
        [line for line in shown.splitlines() if "Link" in line]
    # the controls are there, holding their defaults (layer: automatic, position: last)
    assert lens.find_element("#compare-layer").get_attribute("value") == ""
    assert lens.find_element("#compare-position").get_attribute("value") == "-1"
