r"""Reusable Dash pieces: the app shell, the page declaration, controls, the job strip.

How to add a page (three files, plus their tests)
=================================================
1. ``attention_lens/analysis/x.py``: a pure function ``x(lm, fp, ...) -> XResult`` (a frozen
   dataclass of numpy arrays, shapes documented); bad input raises ``AnalysisError``. An
   analysis of the weights alone is named once in ``attention_lens/weight_analyses.py``
   (its cache key and how to compute it), so it is computed once per deployment.
2. ``attention_lens/figures/x.py``: ``x_figure(result) -> go.Figure`` with
   ``template=TEMPLATE``.
3. ``attention_lens/pages/x.py``: a declaration. This one is complete (the tests build it):

   .. code-block:: python

       # /top-copying: the next token beside every head's copying score
       from attention_lens import weight_analyses as W
       from attention_lens.analysis.predictions import next_token
       from attention_lens.components import page as P
       from attention_lens.components.controls import Choice, Int
       from attention_lens.figures.eigen import copying_scores_figure
       from attention_lens.figures.predictions import next_token_figure

       HELP = (r"The top-$k$ next tokens, and $\mathrm{Re}(\sum\lambda)/\sum|\lambda|$ of "
               "each head's circuit (near 1: the head copies what it attends to).")


       def panels(ctx: P.PageContext, query: dict) -> list:
           top = next_token(ctx.model, ctx.forward, k=query["k"])  # fetch (cached), analyse
           eig = ctx.weight(W.circuit_eigenvalues())  # a background job the first time
           return [P.Panel("next", next_token_figure(top), top),  # draw
                   P.Panel("copying", copying_scores_figure(eig, query["circuit"]),
                           {"copying": eig.copying[query["circuit"]]}),
                   P.Notice(f"Showing the top {query['k']} tokens.")]


       P.register_page(
           __name__, path="/top-copying", name="Top copying", order=90,
           heading="Next token and copying heads", help_md=HELP, panels=panels,
           graphs=["next", "copying"],
           controls=[Int("k", 10, 1, 100, label="top k"),
                     Choice("circuit", "full_ov", ("ov", "full_ov"), label="circuit")])

   That is the whole page. The scaffolding gives it a navbar entry, the shared prompt and
   model, its controls rendered from their declarations and kept in the URL
   (``?model=..&text=..&k=..``), warnings for bad link parameters, alerts for errors (never
   a traceback), PNG/SVG/CSV/JSON buttons under each graph, "Export page", and, when a
   weight analysis is not computed yet, a background job with a progress bar, Cancel and
   Run again (bounded in number: over the bound the page says the server is busy). Export
   and the tests find it through ``dash.page_registry``.

   ``panels(ctx, query)`` returns ``P.Panel(name, figure, data)`` for each graph,
   ``P.Html(name, children)`` for each name in ``extras=[...]`` (tables, lists) and
   ``P.Notice(text)`` for notes; ``body=lambda parts: [...]`` arranges ``parts[name]`` in
   rows (each placed once), ``prepare=lambda query, cfg: query`` adapts defaults to the
   model. ``ctx.model`` and ``ctx.forward`` are the model and the cached forward pass;
   ``ctx.weight(...)`` a weight analysis. A page never imports the app module.

   An analysis declared in ``analysis/`` (:mod:`attention_lens.analysis.declare`) gives the
   page its controls: ``register_page(..., analysis=X)`` adds one per parameter (its URL
   name, default, bounds and label), ``panels`` reads ``ctx.run(X, query)`` (cached with the
   forward pass, or a background job when its estimated work is large), and the same
   declaration answers ``POST /api/<name>``.

Shared state: ``shell.STATE`` (a ``dcc.Store``) holds ``{"model", "text", "pos"}`` — the
analysed prompt; every page's main callback takes it as its first input. ``pos`` is the
token position pinned on ``/tokens``; pages with a position control read ``pos`` from their
query string. The URL is rewritten from the state and the page's query store (a clientside
callback), and back/forward re-render the page from the URL.
"""
