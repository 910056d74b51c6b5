"""Reusable Dash pieces: the app shell, page scaffolding, graphs with export, help panels.

How to add a page (three files, plus their tests)
=================================================
1. ``attention_lens/analysis/x.py``: a pure function ``x(lm, fp, ...) -> XResult`` (a frozen
   dataclass of numpy arrays, shapes documented); bad input raises ``AnalysisError``.
2. ``attention_lens/figures/x.py``: ``x_figure(result) -> go.Figure`` with
   ``template=TEMPLATE``.
3. ``attention_lens/pages/x.py``, in this order:

   .. code-block:: python

       import dash
       from dash import Input, callback
       from ..app import registry
       from ..components import page as P

       PAGE = "x"
       dash.register_page(__name__, path="/x", order=20, name="X", title="X · Attention Lens")
       CONTROLS = {"k": P.IntParam(10, 1, 100)}      # query-string parameters of the page

       def panels(state: dict, query: dict) -> list[P.Panel]:
           fp = registry().forward(state["text"], state["model"])   # fetch (cached)
           res = x(registry().get(state["model"]), fp, k=query["k"])  # analyse
           return [P.Panel("x", x_figure(res), res)]                  # draw

       P.register_panels(PAGE, panels)        # "Export page" and CSV/JSON use it too

       def layout(**query):
           q, problems = P.parse_query(CONTROLS, query)
           return P.page_layout(PAGE, "X", controls=[P.number_control(PAGE, "k", q["k"])],
                                body=[P.graph(PAGE, "x")], help_md=HELP, query=q,
                                problems=problems)

       @callback(*P.main_outputs(PAGE, ["x"]), *P.main_inputs(PAGE, CONTROLS))
       @P.analysis_callback(PAGE, CONTROLS)
       def update(state, query):
           return P.figures_of(panels(state, query))

   The page gets a navbar entry, the shared prompt/model, URL sync of its controls
   (``?model=..&text=..&k=..``), alerts for errors, PNG/SVG/CSV/JSON buttons on each graph
   and the "Export page" zip without touching any other file.

Shared state: ``shell.STATE`` (a ``dcc.Store``) holds ``{"model", "text", "pos"}`` — the
analysed prompt; every page's main callback takes it as its first input. ``pos`` is the
token position pinned on ``/tokens``; pages with a position control read ``pos`` from their
query string. The URL is rewritten from the state and the page's query store (a clientside
callback), and back/forward re-render the page from the URL.
"""
