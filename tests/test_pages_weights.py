"""Callbacks of the weight pages called directly (no browser): weights, eigenvalues,
induction, embeddings, analogy, on the shipped models and the default prompt."""

from __future__ import annotations

import json
import sys
from contextvars import copy_context

import dash
import numpy as np
import plotly.graph_objects as go
import pytest
from dash._callback_context import context_value
from dash._utils import AttributeDict

from attention_lens import export
from attention_lens.server.app import create_app
from attention_lens.components import page as P
from attention_lens.components.shell import DEFAULT_PROMPT

#: Pages that read weight analyses (others may too: found by what their panels ask for).
WEIGHT_PAGES = ("weights", "eigenvalues", "induction", "embeddings")


@pytest.fixture(scope="module")
def pages(registry):
    """The declarations of an app built over the shipped models, by page name."""
    create_app(registry)
    return {s.page: s for s in P.declared_pages()}


def module_of(page: str):
    """The module Dash imported for ``page`` (its own callbacks and helpers)."""
    key = next(k for k, p in dash.page_registry.items()
               if getattr(p.get("attention_lens"), "page", None) == page)
    return sys.modules[key]


def state(model: str = "attn-only-2l", text: str = DEFAULT_PROMPT) -> dict:
    """The shell's shared state for a prompt."""
    return {"model": model, "text": text, "pos": None}


def figure_named(fig: go.Figure, name: str):
    """The trace called ``name``."""
    return next(t for t in fig.data if t.name == name)


# --------------------------------------------------------------------------- weights
def test_weights_spectra_and_directions(pages, model_2l):
    d = pages["weights"].render(state())
    spectra, norms, directions = (d.figures[k] for k in ("spectra", "norms", "directions"))
    table, query = d.extras["table"], d.query
    assert d.errors == [] and d.notes == []
    assert len(spectra.data) == 24  # 2 layers x 12 heads, all selected by default
    for trace in spectra.data:
        s = np.asarray(trace.y)
        assert s.shape == (model_2l.cfg.d_head,) and np.all(np.diff(s) <= 1e-9)
    assert spectra.layout.yaxis.type == "log"
    assert np.asarray(norms.data[0].z).shape == (2, 12)
    # default table head: the largest sigma_1; its heatmaps hold dirs x k tokens
    assert np.asarray(directions.data[0].z).shape == (3, 8)
    assert "L" in directions.layout.title.text and query["circuit"] == "OV"
    assert "top tokens" in str(table.children[0].children)


def test_weights_selection_and_qk(pages):
    d = pages["weights"].render(state(), circuit="QK", layers=[1], heads=[5, 0], layer=1,
                                head=5, dirs=2, k=4, scale="linear")
    spectra, directions, query = d.figures["spectra"], d.figures["directions"], d.query
    assert d.errors == []
    assert [t.name for t in spectra.data] == ["L1H0", "L1H5"]
    assert "W_QK" in spectra.layout.title.text and spectra.layout.yaxis.type == "linear"
    assert directions.layout.title.text.startswith("L1H5")
    assert np.asarray(directions.data[1].z).shape == (2, 4)
    assert query["layers"] == [1] and query["heads"] == [0, 5]


def test_weights_bad_controls_give_alerts(pages):
    for controls, words in (({"layers": [7]}, "layers: 7 does not exist (0-1)"),
                            ({"head": 12, "layer": 0}, "head 12 is above the largest allowed"),
                            ({"heads": "x,y"}, "whole numbers")):
        texts = " ".join(pages["weights"].render(state(), **controls).errors)
        assert words in texts, (controls, texts)


def test_weights_url_parameters(pages):
    layout = pages["weights"].layout(model="attn-only-2l", layers="0,1", circuit="XY")
    text = str(layout)
    assert "Link parameter: circuit must be one of OV, QK" in text
    q, problems = pages["weights"].query({"layers": "1,0", "heads": "3"}, None)
    assert q["layers"] == [0, 1] and q["heads"] == [3] and not problems


# ----------------------------------------------------------------------- eigenvalues
def test_eigenvalues_page(pages, registry, model_2l):
    d = pages["eigenvalues"].render(state(), layer=1, head=5, order="position")
    spectrum, circuits, copying = (d.figures[k] for k in ("pattern-spectrum",
                                                          "circuit-eigenvalues", "copying"))
    assert d.errors == []
    assert "W_pos are left out" in " ".join(d.notes)  # full QK: token embeddings only
    fp = registry.forward(DEFAULT_PROMPT, "attn-only-2l")
    diag = fp.cache["blocks.1.attn.hook_pattern"][5].diagonal().double().numpy()
    assert np.allclose(np.asarray(spectrum.data[0].y), diag)  # eigenvalues = the diagonal
    assert "diagonal" in spectrum.layout.title.text
    assert len(circuits.data) == 4
    assert all(len(t.x) == model_2l.cfg.d_head for t in circuits.data)
    assert [np.asarray(t.z).shape for t in copying.data] == [(2, 12), (2, 12)]
    z = np.asarray(copying.data[0].z)
    assert np.all((z >= -1) & (z <= 1)) and z[1, 5] > 0.7  # the induction head copies
    help_text = pages["eigenvalues"].help_md
    assert "diagonal" in help_text and "lower-triangular" in help_text


def test_eigenvalues_default_head_and_bad_head(pages):
    spectrum = pages["eigenvalues"].render(state()).figures["pattern-spectrum"]
    assert spectrum.layout.title.text.startswith("L1H")  # highest full-OV copying head
    d = pages["eigenvalues"].render(state(), layer=2, head=0)  # clamped to the last layer
    assert "layer 2 is above the largest allowed value 1" in " ".join(d.errors)
    assert d.figures["pattern-spectrum"].layout.title.text.startswith("L1H0")


# ------------------------------------------------------------------------- induction
def test_induction_grids_labels_examples(pages):
    d = pages["induction"].render(state())
    scores, labels, examples, comp_q, comp_k, comp_v = d.figures.values()
    assert d.errors == [] and d.notes == []
    probe = figure_named(scores, "probe: induction")
    z = np.asarray(probe.z)
    assert z.shape == (2, 12) and z[1, 5] > 0.8 and z[0].max() < 0.1
    assert len(scores.data) == 6
    text = labels.data[0].text
    assert text[1][5] == "induction" and text[0][2] == "previous-token"
    # default example head: the strongest probe inductor, with query <- key entries
    assert examples.layout.title.text.startswith("L1H")
    ys = list(examples.data[0].y)
    assert ys and all("←" in y for y in ys)
    # composition: 12 layer-0 heads x 12 layer-1 heads, baseline in the title
    for fig, kind in ((comp_q, "Q"), (comp_k, "K"), (comp_v, "V")):
        assert np.asarray(fig.data[0].z).shape == (12, 12)
        assert f"{kind}-composition (random baseline" in fig.layout.title.text
    k = np.asarray(comp_k.data[0].z)
    assert k[2, 5] > 2 * float(comp_k.layout.title.text.split("baseline ")[1].rstrip(")"))


def test_induction_selected_head_and_prompt_labels(pages):
    d = pages["induction"].render(state(), layer=0, head=2, kind="previous_token",
                                  labels="prompt", n=3)
    examples, labels = d.figures["examples"], d.figures["labels"]
    assert examples.layout.title.text == "L0H2: strongest previous-token entries"
    assert len(examples.data[0].y) == 3
    assert "from the prompt" in labels.layout.title.text
    assert all(float(w) > 0.5 for w in examples.data[0].x)


def test_induction_one_layer_model_says_no_composition(pages):
    d = pages["induction"].render(state("attn-only-1l"))
    scores, labels, examples, comp_q, comp_k, comp_v = d.figures.values()
    assert d.errors == []
    assert np.asarray(figure_named(scores, "probe: induction").z).shape == (1, 12)
    assert "one layer" in " ".join(d.notes)
    for fig in (comp_q, comp_k, comp_v):
        assert "one layer" in fig.layout.annotations[0].text
    bad = pages["induction"].render(state("attn-only-1l"), src=0)
    assert "one layer" in " ".join(bad.errors)


def test_induction_bad_controls(pages):
    d = pages["induction"].render(state(), layer=0, head=40)
    assert "head 40 is above the largest allowed value 11" in " ".join(d.errors)
    d = pages["induction"].render(state(), src=1)
    assert "source layer must be between 0 and 0" in " ".join(d.errors)


# ------------------------------------------------------------------------ embeddings
def test_embeddings_map_prompt_and_search(pages, registry):
    fp = registry.forward(DEFAULT_PROMPT, "attn-only-2l")
    d = pages["embeddings"].render(state(), clusters=5, n=500, search="Harry", neighbours=7)
    mp, variance, neighbours = d.figures.values()
    assert d.errors == []
    clusters = [t for t in mp.data if t.name.startswith("cluster")]
    assert len(clusters) == 5 and sum(len(t.x) for t in clusters) == 500
    assert all(t.type == "scattergl" for t in mp.data)
    prompt = figure_named(mp, "prompt tokens")
    assert len(prompt.x) == len(fp.token_ids)
    assert len(figure_named(mp, "neighbours").x) == 7
    assert len(neighbours.data[0].y) == 7
    r = np.asarray(variance.data[0].y)
    assert r.shape == (10,) and np.all(r > 0) and r.sum() <= 1 and np.all(np.diff(r) <= 1e-12)
    assert "%" in mp.layout.xaxis.title.text  # explained variance on the axes


def test_embeddings_unembedding_and_filters(pages):
    d = pages["embeddings"].render(state(), matrix="W_U", filter="whole_word", n=300, search="")
    mp, neighbours, query = d.figures["map"], d.figures["neighbours"], d.query
    assert d.errors == []
    assert "W_U^T" in mp.layout.title.text and query["filter"] == "whole_word"
    tokens = [s for t in mp.data if t.name.startswith("cluster") for s in t.text]
    assert tokens and all(s.startswith("·") for s in tokens)
    assert "Type a word" in neighbours.layout.annotations[0].text


def test_embeddings_bad_controls(pages):
    d = pages["embeddings"].render(state(), search="x" * 90)
    assert "tokens long" in " ".join(d.errors)
    d = pages["embeddings"].render(state(), clusters=0)
    assert "below the smallest allowed value 1" in " ".join(d.errors)


# --------------------------------------------------------------------------- analogy
def test_analogy_default_equation(pages):
    d = pages["analogy"].render(state())
    fig, table, query = d.figures["results"], d.extras["table"], d.query
    assert d.errors == []
    assert len(fig.data[0].y) == 10
    assert "England + French − English" in fig.layout.title.text
    answers = [str(r.children[1].children.children) for r in table.children[1].children]
    assert len(answers) == 10 and "·England" not in answers and "·English" not in answers
    # the default shows something true about the shipped model: the answer is France
    assert answers[0] == "·France"
    assert query["plus"] == ["England", "French"] and query["minus"] == ["English"]
    assert "England + French − English" in str(d.extras["caption"])
    # ' woman' is two tokens for this vocabulary: the page says so
    d = pages["analogy"].render(state(), plus=["king", "woman"], minus=["man"])
    assert any("woman" in n and "2 tokens" in n for n in d.notes)


def test_analogy_method_and_errors(pages):
    fig = pages["analogy"].render(state(), method="3cosmul", k=3, plus=["France", "Paris"],
                                  minus=[]).figures["results"]
    assert "3CosMul" in fig.layout.title.text and len(fig.data[0].y) == 3
    d = pages["analogy"].render(state(), plus=[], minus=["man"])
    assert "at least one word" in " ".join(d.errors)
    d = pages["analogy"].render(state(), plus=["Supercalifragilisticexpialidocious" * 2])
    assert "tokens long" in " ".join(d.errors)
    q, _ = pages["analogy"].query({"plus": "king, ,woman", "minus": "man"}, None)
    assert q["plus"] == ["king", "woman"]


def _with_trigger(prop_id: str, fn, *args):
    def call():
        context_value.set(AttributeDict(triggered_inputs=[{"prop_id": prop_id, "value": 1}]))
        return fn(*args)
    return copy_context().run(call)


def test_analogy_builder_adds_and_removes_terms(pages):
    mod = module_of("analogy")
    rows = _with_trigger("analogy-add-plus.n_clicks", mod.edit_plus, 1, [0, 0],
                         ["king", "woman"])
    assert len(rows) == 3
    remove = '{"index":0,"sign":"minus","type":"analogy-remove"}.n_clicks'
    rows = _with_trigger(remove, mod.edit_minus, None, [1, 0], ["man", "boy"])
    assert len(rows) == 1
    assert rows[0].children[1].value == "boy"
    assert mod.term_tokens("woman", state()).startswith("2 tokens")
    assert mod.term_tokens("king", state()) == "1 token: ·king"


# ------------------------------------------------------------------- every page
def test_weight_pages_are_the_ones_asking_for_weight_analyses(pages, bg):
    """The pages reading weight analyses, found by running them with an empty store."""
    asking = []
    for name, spec in pages.items():
        request = spec.render(state(), compute=False).request
        if isinstance(request, dict):
            asking.append(name)
            bg.slots.release(request["token"])  # the job is not run here
    assert bg.slots.active() == []
    assert set(WEIGHT_PAGES) <= set(asking)
    prompt_only = {"predictions", "tokens", "attention", "logit-lens", "attribution",
                   "ablation", "analogy"}
    assert not prompt_only & set(asking), asking


def test_every_panel_exports(pages):
    for name, spec in pages.items():
        panels = P.page_panels(name, state(), {}, compute=True)
        assert panels and all(isinstance(p.figure, go.Figure) for p in panels), name
        assert [p.name for p in panels] == list(spec.graphs), name
        for panel in panels:
            if not panel.figure.data:  # a placeholder must say why it is empty
                assert panel.figure.layout.annotations[0].text
                continue
            assert export.figure_csv(panel.figure).count("\n") > 1
            body = json.loads(export.panel_json(panel, state()))
            assert body["figure"] == panel.name and body["model"] == "attn-only-2l", name
            assert body["prompt"] == DEFAULT_PROMPT and body["data"], (name, panel.name)
        assert spec.help_md.count("$") >= 4, name  # the formula is in the help
