"""In the browser: a long prompt's shareable link carries a short id and brings the prompt back."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
from test_browser import MODEL, drawn, lens, type_prompt, url, wait  # noqa: F401 - fixture

from attention_lens import prompt_links

pytestmark = pytest.mark.browser


def test_a_long_prompt_link_carries_an_id_and_restores_the_prompt(lens):  # noqa: F811
    lens.driver.get(url(lens, "/predictions", model=MODEL))
    wait(lens, drawn("predictions", "surprisal"), timeout=60)
    long = " ".join(f"The cat number {i} sat on the mat." for i in range(120))[:3000]
    assert len(long) > prompt_links.LINK_TEXT_MAX
    type_prompt(lens, long)
    lens.find_element("#shell-analyse").click()
    wait(lens, "new URLSearchParams(location.search).has('t')", what="the link's prompt id")
    link = lens.driver.current_url
    query = parse_qs(urlparse(link).query)
    assert "text" not in query and query["t"] == [prompt_links.prompt_id(long)]
    assert len(link) < 300
    lens.driver.get("about:blank")
    lens.driver.get(link)  # the shared link, opened afresh
    wait(lens, f"(document.getElementById('shell-text') || {{}}).value?.length === {len(long)}",
         timeout=60, what="the prompt restored from the link")
    assert lens.find_element("#shell-text").get_attribute("value") == long
    # a short prompt still travels as text
    type_prompt(lens, "Hello there")
    lens.find_element("#shell-analyse").click()
    wait(lens, "new URLSearchParams(location.search).get('text') === 'Hello there'",
         what="a short prompt's link")
