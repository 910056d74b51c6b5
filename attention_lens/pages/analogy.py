"""/analogy: an equation builder (a − b + c = ?) over unit-normalised token embeddings."""

from __future__ import annotations

from typing import Any, Optional

import dash_bootstrap_components as dbc
from dash import ALL, MATCH, Input, Output, State, callback, ctx, html
from dash.exceptions import PreventUpdate

from ..analysis.analogy import ANALOGY, MAX_TERMS, METHODS, Analogy
from ..analysis.embeddings import MATRICES, resolve_term
from ..analysis.errors import AnalysisError
from ..components import page as P
from ..components import shell
from ..components.controls import Choice, Int
from ..figures.analogy import analogy_figure
from ..figures.theme import number

PAGE = "analogy"
TERM, REMOVE, TOKENS = "analogy-term", "analogy-remove", "analogy-tokens"
METHOD_LABELS = {"3cosadd": "3CosAdd", "3cosmul": "3CosMul"}

HELP = r"""
Every token's row of $W_E$ (or $W_U^\top$) is scaled to unit length. **3CosAdd** ranks
each token $x$ by $\cos\!\big(x,\ \sum_{p \in +} p - \sum_{n \in -} n\big)$;
**3CosMul** (Levy & Goldberg 2014) by $\prod_{p} c(x, p) \,/\, \big(\prod_{n} c(x, n) +
\varepsilon\big)$ with $c = (\cos + 1)/2$ and $\varepsilon = 10^{-3}$. Every input token
is excluded from the answers, as are special and non-printable tokens; the table gives the
method's score and the cosine to the 3CosAdd target.

Words are looked up with a leading space (" king"), as byte-level BPE stores words inside
text. A word that is **several tokens** is represented by the normalised mean of its
tokens' unit rows, and the page says so: small models often have no single token for a
word, and their embedding space is far less linear than word2vec's.
"""


def term_row(sign: str, index: int, value: str) -> dbc.InputGroup:
    """One word of the equation with its sign, its tokenisation and a remove button."""
    return dbc.InputGroup([
        dbc.InputGroupText("+" if sign == "plus" else "−"),
        dbc.Input(id={"type": TERM, "sign": sign, "index": index}, value=value, type="text",
                  debounce=True, maxLength=60,
                  placeholder="a word to add" if sign == "plus" else "a word to subtract"),
        dbc.InputGroupText(html.Small(id={"type": TOKENS, "sign": sign, "index": index}),
                           className="al-term-tokens"),
        dbc.Button("×", id={"type": REMOVE, "sign": sign, "index": index}, n_clicks=0,
                   color="secondary", outline=True, title="remove this word"),
    ], size="sm", className="al-control al-term")


def term_rows(sign: str, words: list[str]) -> list[dbc.InputGroup]:
    """The rows of one side (one empty box when there are no words)."""
    return [term_row(sign, i, w) for i, w in enumerate(words or [""])]


class Terms:
    """Words of one side of the equation (``"a,b"`` in the URL; blanks dropped), edited as a
    list of boxes with add and remove buttons."""

    def __init__(self, name: str, default: tuple[str, ...], label: str) -> None:  # noqa: D107
        self.name, self.default, self.label = name, default, label  # name: "plus" or "minus"

    def parse(self, raw: Any, cfg: Any = None) -> tuple[list[str], Optional[str]]:
        """The non-blank words in ``raw`` (at most MAX_TERMS), and a problem or None."""
        if raw is None:
            return list(self.default), None
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        words = [str(w).strip()[:60] for w in items if w is not None and str(w).strip()]
        if len(words) > MAX_TERMS:
            return words[:MAX_TERMS], f"{self.name}: kept the first {MAX_TERMS} words"
        return words, None

    def input(self, page: str) -> Input:
        """Every box of this side (pattern-matched)."""
        return Input({"type": TERM, "sign": self.name, "index": ALL}, "value")

    def widget(self, page: str, value: list[str], cfg: Any = None) -> html.Div:
        """The boxes of this side and a button adding one."""
        add = "+ add a word" if self.name == "plus" else "− subtract a word"
        return html.Div([html.H6(self.label),
                         html.Div(term_rows(self.name, value), id=f"{PAGE}-{self.name}-terms"),
                         dbc.Button(add, id=f"{PAGE}-add-{self.name}", n_clicks=0, size="sm",
                                    color="secondary", outline=True)], className="al-terms")


def results_table(res: Analogy) -> dbc.Table:
    """The answers with their scores (whitespace shown as ·, ↵, →)."""
    head = html.Thead(html.Tr([html.Th(c) for c in ("rank", "token", "id",
                                                     METHOD_LABELS[res.method] + " score",
                                                     "cosine to target")]))
    body = html.Tbody([html.Tr([html.Td(i + 1), html.Td(html.Code(tok)), html.Td(int(tid)),
                                html.Td(number(score, ".4f")), html.Td(number(cos, ".4f"))])
                       for i, (tok, tid, score, cos) in enumerate(zip(
                           res.display, res.token_ids, res.scores, res.cosine))])
    return dbc.Table([head, body], size="sm", striped=True, hover=True, responsive=True,
                     className="al-table")


def equation_text(res: Analogy) -> str:
    """``king − man + woman`` as typed."""
    text = " + ".join(res.positive)
    for w in res.negative:
        text += f" − {w}"
    return text


def panels(ctx: P.PageContext, query: dict) -> list:
    """The top-k answers as bars and a table, what was solved, the multi-token notes."""
    if not query["plus"]:
        raise AnalysisError("Type at least one word to add (a + term).")
    # the declared analysis (POST /api/analogy): solved once per model, page and API alike
    res = ctx.run(ANALOGY, positive=query["plus"], negative=query["minus"],
                  top_k=query["k"], method=query["method"], matrix=query["matrix"])["result"]
    caption = html.P(["Answers to ", html.Code(equation_text(res)), " (",
                      METHOD_LABELS[res.method], ", ", res.matrix, ")"], className="small")
    return [*[P.Notice(n) for n in res.notes],
            P.Html("caption", caption),
            P.Panel("results", analogy_figure(res), res),
            P.Html("table", results_table(res))]


P.register_page(
    __name__, path="/analogy", order=12, name="Analogy", title="Analogy · Attention Lens",
    description="Vector arithmetic on embeddings: England − English + French = ?",
    heading="Analogy: vector arithmetic on embeddings",
    lead="Add and subtract words; the nearest tokens to the result are listed, inputs "
         "excluded. The page opens on England − English + French: each word is one token of "
         "the shipped models, and the two-layer model's token embeddings answer France "
         "(country ↔ language). The classic king − man + woman = queen is too much for a "
         "4,096-token model: ' queen' and ' woman' are not single tokens there.",
    help_md=HELP, panels=panels, graphs=["results"], extras=["caption", "table"],
    controls=[Terms("plus", ("England", "French"), "add"),
              Terms("minus", ("English",), "subtract"),
              Choice("method", "3cosadd", METHODS, label="method", labels=METHOD_LABELS),
              Choice("matrix", "W_E", MATRICES, label="matrix",
                     labels={"W_E": "W_E (embedding)", "W_U": "W_U^T (unembedding)"}),
              Int("k", 10, 1, 100, label="top k")],
    body=lambda parts: [parts["caption"],
                        dbc.Row([dbc.Col(parts["results"], lg=7),
                                 dbc.Col(parts["table"], lg=5)])])


def _edit(sign: str, words: list[Optional[str]], removes: list[Optional[int]]) -> list:
    trigger = ctx.triggered_id
    words = [w or "" for w in words]
    if trigger == f"{PAGE}-add-{sign}":
        if len(words) >= MAX_TERMS:
            raise PreventUpdate
        return term_rows(sign, words + [""])
    if isinstance(trigger, dict) and trigger.get("type") == REMOVE and \
            trigger.get("sign") == sign and any(removes):
        i = trigger["index"]
        return term_rows(sign, [w for j, w in enumerate(words) if j != i])
    raise PreventUpdate


@callback(Output(f"{PAGE}-plus-terms", "children"),
          Input(f"{PAGE}-add-plus", "n_clicks"),
          Input({"type": REMOVE, "sign": "plus", "index": ALL}, "n_clicks"),
          State({"type": TERM, "sign": "plus", "index": ALL}, "value"),
          prevent_initial_call=True)
def edit_plus(_: Optional[int], removes: list[Optional[int]], words: list[Optional[str]]
              ) -> list:
    """Add or remove a word to add."""
    return _edit("plus", words, removes)


@callback(Output(f"{PAGE}-minus-terms", "children"),
          Input(f"{PAGE}-add-minus", "n_clicks"),
          Input({"type": REMOVE, "sign": "minus", "index": ALL}, "n_clicks"),
          State({"type": TERM, "sign": "minus", "index": ALL}, "value"),
          prevent_initial_call=True)
def edit_minus(_: Optional[int], removes: list[Optional[int]], words: list[Optional[str]]
               ) -> list:
    """Add or remove a word to subtract."""
    return _edit("minus", words, removes)


@callback(Output({"type": TOKENS, "sign": MATCH, "index": MATCH}, "children"),
          Input({"type": TERM, "sign": MATCH, "index": MATCH}, "value"),
          Input(shell.STATE, "data"))
def term_tokens(word: Optional[str], state: Optional[dict]) -> str:
    """How the model tokenises one word ("1 token", or its pieces when there are several)."""
    if not word or not word.strip() or not state:
        return ""
    try:
        term = resolve_term(P.model(state["model"]), word)
    except AnalysisError as exc:
        return f"⚠ {exc}"
    if not term.multi_token:
        return f"1 token: {term.display[0]}"
    return f"{len(term.token_ids)} tokens: {' '.join(term.display)} (mean used)"
