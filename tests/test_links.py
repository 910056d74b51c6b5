"""Behind a proxy path (``--url-prefix /lens/``) every link of every page stays in the app.

The app is built by the lab server's factory under ``/lens/``; the links are collected from
the shell, every page's layout, every declared page's drawn panels (weight analyses
computed) and the callbacks that build links (the navbar, the overview's list, a click on
/attention's pattern, a click on /patching's grids); each must start with ``/lens/``, name a
registered page and answer 200.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import dash
import pytest
from conftest import restored_background

from attention_lens.components import page as P
from attention_lens.components import shell
from attention_lens.server import ServerConfig, create_server

PREFIX = "/lens/"
STATE = {"model": "attn-only-2l", "pos": None,
         "text": "Harry Potter went to the shop. Harry Potter bought a wand."}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app under /lens/; afterwards the process's Dash paths and pages are as before
    (Dash keeps the last app's prefix and page paths in module globals)."""
    from dash import _get_paths, _pages

    saved = (_get_paths.CONFIG, _pages.CONFIG,
             {k: dict(v) for k, v in dash.page_registry.items()})
    with restored_background():
        yield create_server(ServerConfig(url_prefix=PREFIX, cache_size=8,
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    _get_paths.CONFIG, _pages.CONFIG, pages = saved
    dash.page_registry.clear()
    dash.page_registry.update(pages)


def hrefs(tree) -> list[str]:
    """Every ``href`` in a component tree (lists and tuples of components too)."""
    if isinstance(tree, (list, tuple)):
        return [h for part in tree for h in hrefs(part)]
    if not isinstance(tree, dash.development.base_component.Component):
        return []
    found = [getattr(c, "href", None) for c in [tree, *tree._traverse()]]
    return [h for h in found if isinstance(h, str)]


def collect(app) -> dict[str, set[str]]:
    """Links by where they were found."""
    pages = list(dash.page_registry.values())
    out: dict[str, set[str]] = {}
    layout = app.layout() if callable(app.layout) else app.layout
    out["shell"] = set(hrefs(layout))
    for page in pages:
        found = page["layout"]() if callable(page["layout"]) else page["layout"]
        out[f"{page['path']} layout"] = set(hrefs(found))
    for spec in P.declared_pages():
        drawn = spec.render(STATE, compute=True)
        assert not drawn.errors, (spec.page, drawn.errors)
        out[f"/{spec.page} panels"] = set(hrefs(list(drawn.extras.values())))
    ids = [{"type": shell.NAVLINK, "path": p["path"]} for p in pages]
    out["navbar"] = set(shell.nav_links(STATE, PREFIX + "qk", ids)[0])
    from attention_lens.pages import overview, patching, qk

    out["overview"] = set(hrefs(overview.update(STATE)[1]))
    attention = P.spec_of("attention").render(STATE, compute=False)
    figure = attention.figures["pattern"].to_plotly_json()
    click = {"points": [{"pointNumber": [4, 2]}]}
    out["/attention click"] = {qk.cell_href(click, figure, STATE, {})}
    grid = {"points": [{"x": 5, "y": "L1H5"}]}
    out["/patching click"] = {patching.open_head(grid, None, STATE, STATE["text"])}
    return out


def test_every_link_stays_under_the_url_prefix_and_opens_a_page(app):
    client = app.server.test_client()
    with app.server.app_context():
        links = collect(app)
    paths = {p["path"] for p in dash.page_registry.values()}
    every = {h for found in links.values() for h in found}
    # the links the pages build between each other are all there
    assert len(links["navbar"]) == len(paths) and len(every) > 2 * len(paths), links
    for where in ("/qk panels", "/graph panels", "/heads panels", "/attention click",
                  "/patching click", "overview"):
        assert links[where], where
    # a download carried in the page (data: URL) is not a link to another page
    downloads = {h for h in every if h.startswith("data:")}
    every -= downloads
    outside = {where: sorted(h for h in found - downloads if not h.startswith(PREFIX))
               for where, found in links.items()}
    assert not any(outside.values()), {k: v for k, v in outside.items() if v}
    for href in sorted(every):
        url = urlsplit(href)
        page = "/" + url.path[len(PREFIX):]
        assert page in paths, href
        r = client.get(href)
        assert r.status_code == 200 and b"_dash-config" in r.data, href
    # a click on /attention's pattern opens that head and cell on /qk
    (cell,) = links["/attention click"]
    query = parse_qs(urlsplit(cell).query)
    assert urlsplit(cell).path == PREFIX + "qk"
    assert (query["query"], query["key"], query["model"]) == (["4"], ["2"], ["attn-only-2l"])
    assert {"layer", "head"} <= set(query)
