"""The Dash app factory: a multi-page app over one process-wide model registry.

``create_app()`` builds a ``use_pages`` Dash app whose pages live in
``attention_lens/pages/`` (Dash imports them itself) and whose shell (navbar, prompt,
model picker, shared state in the URL) lives in :mod:`attention_lens.components.shell`.
Everything is served from this process: the dark Bootstrap theme is vendored in
``assets/`` and no stylesheet or script comes from another host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import dash

from .. import background as background_module
from .. import jobhost
from .. import registry as registry_module
from ..components import downloads, page, shell
from ..registry import Registry

PACKAGE_DIR = Path(__file__).resolve().parent.parent
ASSETS_DIR = PACKAGE_DIR.parent / "assets"
PAGES_DIR = PACKAGE_DIR / "pages"


def _reset_pages_state() -> None:
    """Forget pages and global callbacks of a previous app in this process (tests build many)."""
    from dash import _callback, _pages

    _pages.PAGE_REGISTRY.clear()
    _callback.GLOBAL_CALLBACK_LIST.clear()
    _callback.GLOBAL_CALLBACK_MAP.clear()
    _callback.GLOBAL_INLINE_SCRIPTS.clear()


def create_app(reg: Optional[Registry] = None, *,
               background: Optional[background_module.Background] = None,
               max_tokens: Optional[int] = None,
               max_prompt_chars: Optional[int] = None,
               requests_pathname_prefix: Optional[str] = None,
               routes_pathname_prefix: Optional[str] = None,
               url_base_pathname: Optional[str] = None,
               pages_folder: Optional[Path | str] = None,
               **dash_kwargs: Any) -> dash.Dash:
    """Build the Dash app around ``reg`` (a default registry over ``weights/`` if None).

    Args:
        reg: the model registry; installed process-wide (:func:`registry.install`).
        background: the background-callback manager and shared stores (installed
            process-wide); the default is a disk cache under the user's cache folder.
        max_tokens: analyse at most this many tokens of a prompt (sets ``reg.max_tokens``).
        max_prompt_chars: longest prompt text accepted from the prompt box or a link.
        requests_pathname_prefix: URL prefix the browser uses (running behind a proxy).
        routes_pathname_prefix: URL prefix of the server's own routes.
        url_base_pathname: sets both prefixes at once.
        pages_folder: where the pages are (default: ``attention_lens/pages``).
        **dash_kwargs: passed on to :class:`dash.Dash`.
    """
    if reg is not None:
        registry_module.install(reg)
    reg = registry_module.current()
    bg = (background_module.install(background) if background is not None
          else background_module.current())
    if max_tokens is not None:
        reg.max_tokens = int(max_tokens)
    options = shell.AppOptions(**({} if max_prompt_chars is None
                                  else {"max_prompt_chars": int(max_prompt_chars)}))

    _reset_pages_state()
    prefixes = {k: v for k, v in dict(requests_pathname_prefix=requests_pathname_prefix,
                                        routes_pathname_prefix=routes_pathname_prefix,
                                        url_base_pathname=url_base_pathname).items()
                if v is not None}
    app = dash.Dash(
        "attention_lens",
        use_pages=True,
        pages_folder=str(pages_folder or PAGES_DIR),
        assets_folder=str(ASSETS_DIR),
        assets_ignore=r"screenshots/.*",
        external_stylesheets=[],
        external_scripts=[],
        serve_locally=True,
        suppress_callback_exceptions=True,
        title="Attention Lens",
        update_title=None,
        routing_callback_inputs={shell.NAV_KWARG: dash.Input(shell.NAV, "data")},
        background_callback_manager=bg.manager,
        meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}],
        **prefixes,
        **dash_kwargs,
    )
    shell.wrap_page_layouts()
    app.layout = shell.root_layout(options)
    shell.register_callbacks(app, options)
    page.register_callbacks(app)
    downloads.register_callbacks(app)
    # Dash finishes its setup on the first request (adding the background callbacks' Cancel
    # callbacks to its callback map); concurrent first requests race on that map, so do it
    # now, before any request
    with app.server.test_request_context("/"):
        app._setup_server()
    if isinstance(bg.manager, jobhost.JobManager):  # jobs are built from the same recipe
        bg.manager.recipe = jobhost.job_recipe(f"{__name__}:build_for_jobs", reg, bg,
                                               pages_folder=pages_folder,
                                               max_tokens=max_tokens)
    app._attention_lens_background = bg
    return app


def build_for_jobs(recipe: dict) -> dash.Dash:
    """In the job host: the app a web process described in ``recipe``
    (:func:`attention_lens.jobhost.job_recipe`), with its background and registry, so the
    host's job functions are the web process's."""
    bg = background_module.create(recipe.get("cache_dir"),
                                  max_jobs=int(recipe.get("max_jobs") or 2),
                                  deployment=recipe.get("deployment"))
    bg.slots.scope = str(recipe.get("slot_scope") or "")  # the web process's slot keys
    reg = Registry(**recipe["registry"])
    return create_app(reg, background=bg, **recipe.get("app", {}))
