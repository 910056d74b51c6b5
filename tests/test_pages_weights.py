"""Callbacks of the weight pages called directly (no browser): weights, eigenvalues,
induction, embeddings, analogy, on the shipped models and the default prompt."""

from __future__ import annotations

import sys
from contextvars import copy_context

import numpy as np
import plotly.graph_objects as go
import pytest
from dash._callback_context import context_value
from dash._utils import AttributeDict

from attention_lens import export
from attention_lens.app import create_app
from attention_lens.components import page as P
from attention_lens.components.shell import DEFAULT_PROMPT

PAGES = ("weights", "eigenvalues", "induction", "embeddings", "analogy")


@pytest.fixture(scope="module")
def pages(registry):
    """The page modules of an app built over the shipped models."""
    create_app(registry)
    return {name: sys.modules[f"attention_lens.pages.{name}"] for name in PAGES}


def state(model: str = "attn-only-2l", text: str = DEFAULT_PROMPT) -> dict:
    """The shell's shared state for a prompt."""
    return {"model": model, "text": text, "pos": None}


def run(module, st: dict, **controls) -> tuple:
    """Call a page's main callback like Dash would: the state, then each control's value."""
    q, _ = P.parse_query(module.CONTROLS, {})
    q.update(controls)
    return module.update(st, *[q[k] for k in module.CONTROLS])


def alert_texts(alerts) -> list[str]:
    """The messages of the alerts a callback returned."""
    return [str(a.children) for a in alerts or []]


def figure_named(fig: go.Figure, name: str):
    """The trace called ``name``."""
    return next(t for t in fig.data if t.name == name)


# --------------------------------------------------------------------------- weights
def test_weights_spectra_and_directions(pages, model_2l):
    outs = run(pages["weights"], state())
    spectra, norms, directions, table, note, job, alerts, query = outs
    assert alert_texts(alerts) == [] and job is None  # called directly: no pending job
    assert len(spectra.data) == 24  # 2 layers x 12 heads, all selected by default
    for trace in spectra.data:
        s = np.asarray(trace.y)
        assert s.shape == (model_2l.cfg.d_head,) and np.all(np.diff(s) <= 1e-9)
    assert spectra.layout.yaxis.type == "log"
    assert np.asarray(norms.data[0].z).shape == (2, 12)
    # default table head: the largest sigma_1; its heatmaps hold dirs x k tokens
    assert np.asarray(directions.data[0].z).shape == (3, 8)
    assert "L" in directions.layout.title.text and query["circuit"] == "OV"
    assert note is None and "top tokens" in str(table.children[0].children)


def test_weights_selection_and_qk(pages):
    spectra, _, directions, _, _, _, alerts, query = run(
        pages["weights"], state(), circuit="QK", layers=[1], heads=[5, 0], layer=1, head=5,
        dirs=2, k=4, scale="linear")
    assert alert_texts(alerts) == []
    assert [t.name for t in spectra.data] == ["L1H0", "L1H5"]
    assert "W_QK" in spectra.layout.title.text and spectra.layout.yaxis.type == "linear"
    assert directions.layout.title.text.startswith("L1H5")
    assert np.asarray(directions.data[1].z).shape == (2, 4)
    assert query["layers"] == [1] and query["heads"] == [0, 5]


def test_weights_bad_controls_give_alerts(pages):
    for controls, words in (({"layers": [7]}, "layer 7"), ({"head": 12, "layer": 0}, "head"),
                            ({"heads": "x,y"}, "whole numbers")):
        outs = run(pages["weights"], state(), **controls)
        texts = " ".join(alert_texts(outs[-2]))
        assert words in texts, (controls, texts)


def test_weights_url_parameters(pages):
    layout = pages["weights"].layout(model="attn-only-2l", layers="0,1", circuit="XY")
    text = str(layout)
    assert "Link parameter: circuit must be one of OV, QK" in text
    q, problems = P.parse_query(pages["weights"].CONTROLS, {"layers": "1,0", "heads": "3"})
    assert q["layers"] == [0, 1] and q["heads"] == [3] and not problems


# ----------------------------------------------------------------------- eigenvalues
def test_eigenvalues_page(pages, registry, model_2l):
    spectrum, circuits, copying, note, job, alerts, _ = run(pages["eigenvalues"], state(), layer=1,
                                                 head=5, order="position")
    assert alert_texts(alerts) == [] and job is None
    assert "W_pos are left out" in str(note)  # full QK: token embeddings only
    fp = registry.forward(DEFAULT_PROMPT, "attn-only-2l")
    diag = fp.cache["blocks.1.attn.hook_pattern"][5].diagonal().double().numpy()
    assert np.allclose(np.asarray(spectrum.data[0].y), diag)  # eigenvalues = the diagonal
    assert "diagonal" in spectrum.layout.title.text
    assert len(circuits.data) == 4
    assert all(len(t.x) == model_2l.cfg.d_head for t in circuits.data)
    assert [np.asarray(t.z).shape for t in copying.data] == [(2, 12), (2, 12)]
    z = np.asarray(copying.data[0].z)
    assert np.all((z >= -1) & (z <= 1)) and z[1, 5] > 0.7  # the induction head copies
    help_text = pages["eigenvalues"].HELP
    assert "diagonal" in help_text and "lower-triangular" in help_text


def test_eigenvalues_default_head_and_bad_head(pages):
    spectrum, *_ = run(pages["eigenvalues"], state())
    assert spectrum.layout.title.text.startswith("L1H")  # highest full-OV copying head
    outs = run(pages["eigenvalues"], state(), layer=2, head=0)
    assert "layer must be between 0 and 1" in " ".join(alert_texts(outs[-2]))
    assert outs[0] is not None and not isinstance(outs[0], go.Figure)  # no_update


# ------------------------------------------------------------------------- induction
def test_induction_grids_labels_examples(pages):
    outs = run(pages["induction"], state())
    scores, labels, examples, comp_q, comp_k, comp_v, note, job, alerts, _ = outs
    assert alert_texts(alerts) == [] and note is None and job is None
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
    outs = run(pages["induction"], state(), layer=0, head=2, kind="previous_token",
               labels="prompt", n=3)
    examples, labels = outs[2], outs[1]
    assert examples.layout.title.text == "L0H2: strongest previous-token entries"
    assert len(examples.data[0].y) == 3
    assert "from the prompt" in labels.layout.title.text
    assert all(float(w) > 0.5 for w in examples.data[0].x)


def test_induction_one_layer_model_says_no_composition(pages):
    outs = run(pages["induction"], state("attn-only-1l"))
    scores, labels, examples, comp_q, comp_k, comp_v, note, job, alerts, _ = outs
    assert alert_texts(alerts) == []
    assert np.asarray(figure_named(scores, "probe: induction").z).shape == (1, 12)
    assert "one layer" in str(note.children)
    for fig in (comp_q, comp_k, comp_v):
        assert "one layer" in fig.layout.annotations[0].text
    bad = run(pages["induction"], state("attn-only-1l"), src=0)
    assert "one layer" in " ".join(alert_texts(bad[-2]))


def test_induction_bad_controls(pages):
    outs = run(pages["induction"], state(), layer=0, head=40)
    assert "head must be between 0 and 11" in " ".join(alert_texts(outs[-2]))
    outs = run(pages["induction"], state(), src=1)
    assert "source layer must be between 0 and 0" in " ".join(alert_texts(outs[-2]))


# ------------------------------------------------------------------------ embeddings
def test_embeddings_map_prompt_and_search(pages, registry):
    fp = registry.forward(DEFAULT_PROMPT, "attn-only-2l")
    mp, variance, neighbours, job, alerts, _ = run(pages["embeddings"], state(), clusters=5,
                                              n=500, search="Harry", neighbours=7)
    assert alert_texts(alerts) == []
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
    mp, _, neighbours, _, alerts, query = run(pages["embeddings"], state(), matrix="W_U",
                                           filter="whole_word", n=300, search="")
    assert alert_texts(alerts) == []
    assert "W_U^T" in mp.layout.title.text and query["filter"] == "whole_word"
    tokens = [s for t in mp.data if t.name.startswith("cluster") for s in t.text]
    assert tokens and all(s.startswith("·") for s in tokens)
    assert "Type a word" in neighbours.layout.annotations[0].text


def test_embeddings_bad_controls(pages):
    outs = run(pages["embeddings"], state(), search="x" * 90)
    assert "tokens long" in " ".join(alert_texts(outs[-2]))
    values = dict(zip(pages["embeddings"].CONTROLS, [None] * 7))
    values["clusters"] = 0
    outs = pages["embeddings"].update(state(), *values.values())
    assert "below the smallest allowed value 1" in " ".join(alert_texts(outs[-2]))


# --------------------------------------------------------------------------- analogy
def test_analogy_default_equation(pages):
    fig, table, notes, alerts, query = run(pages["analogy"], state())
    assert alert_texts(alerts) == []
    assert len(fig.data[0].y) == 10
    assert "England + French − English" in fig.layout.title.text
    answers = [str(r.children[1].children.children) for r in table.children[1].children]
    assert len(answers) == 10 and "·England" not in answers and "·English" not in answers
    # the default shows something true about the shipped model: the answer is France
    assert answers[0] == "·France"
    assert query["plus"] == ["England", "French"] and query["minus"] == ["English"]
    # ' woman' is two tokens for this vocabulary: the page says so
    *_, notes, alerts, _ = run(pages["analogy"], state(), plus=["king", "woman"],
                               minus=["man"])
    assert any("woman" in str(n.children) and "2 tokens" in str(n.children)
               for n in notes[1:])


def test_analogy_method_and_errors(pages):
    fig, *_ = run(pages["analogy"], state(), method="3cosmul", k=3, plus=["France", "Paris"],
                  minus=[])
    assert "3CosMul" in fig.layout.title.text and len(fig.data[0].y) == 3
    outs = run(pages["analogy"], state(), plus=[], minus=["man"])
    assert "at least one word" in " ".join(alert_texts(outs[-2]))
    outs = run(pages["analogy"], state(), plus=["Supercalifragilisticexpialidocious" * 2])
    assert "tokens long" in " ".join(alert_texts(outs[-2]))
    q, _ = P.parse_query(pages["analogy"].CONTROLS, {"plus": "king, ,woman", "minus": "man"})
    assert q["plus"] == ["king", "woman"]


def _with_trigger(prop_id: str, fn, *args):
    def call():
        context_value.set(AttributeDict(triggered_inputs=[{"prop_id": prop_id, "value": 1}]))
        return fn(*args)
    return copy_context().run(call)


def test_analogy_builder_adds_and_removes_terms(pages):
    mod = pages["analogy"]
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
@pytest.mark.parametrize("name", PAGES)
def test_every_panel_exports(pages, name):
    panels = P.page_panels(name, state(), {})
    assert panels and all(isinstance(p.figure, go.Figure) for p in panels)
    for panel in panels:
        if not panel.figure.data:  # a placeholder must say why it is empty
            assert panel.figure.layout.annotations[0].text
            continue
        assert export.figure_csv(panel.figure).count("\n") > 1
        assert export.panel_json(panel, state())
    assert pages[name].HELP.count("$") >= 4  # the formula is in the help


@pytest.mark.parametrize("name", PAGES)
def test_layout_renders_with_defaults_and_garbage(pages, name):
    assert pages[name].layout(model="attn-only-2l") is not None
    assert pages[name].layout(model="no-such-model", layer="x", k="-3") is not None
