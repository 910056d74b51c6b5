"""``attention-lens models add | list | remove`` and the per-user models folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from gguf_files import QT, write_gguf  # noqa: E402

from attention_lens import cli  # noqa: E402
from attention_lens.model import catalog  # noqa: E402
from attention_lens.registry import Registry, user_models_dir  # noqa: E402


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("ATTENTION_LENS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "data"


def _fake(tmp_path: Path) -> tuple[catalog.KnownModel, Path]:
    """A known model whose wheel is a local file holding a small GGUF."""
    gguf_path = write_gguf(tmp_path / "Tiny.Q8_0.gguf", "llama", QT.Q8_0)
    data = gguf_path.read_bytes()
    known = catalog.KnownModel(
        key="tiny", package="llm-tiny", version="1.0", member="llm_tiny/Tiny.Q8_0.gguf",
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), license="MIT",
        description="a test model")
    wheel = tmp_path / "llm_tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_tiny/__init__.py", "")
        zf.writestr(known.member, data)
    return known, wheel


def test_add_list_remove(data_home, tmp_path, monkeypatch, capsys):
    known, wheel = _fake(tmp_path)
    monkeypatch.setitem(catalog.KNOWN, "tiny", known)
    monkeypatch.setattr(catalog, "download_wheel",
                        lambda k, into, quiet=False: wheel if k is known else None)
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "add", "tiny"])
    assert done.value.code == 0
    folder = user_models_dir()
    assert folder == data_home / "attention-lens" / "models"
    placed = folder / "Tiny.Q8_0.gguf"
    assert hashlib.sha256(placed.read_bytes()).hexdigest() == known.sha256
    card = json.loads((folder / "Tiny.Q8_0.card.json").read_text())
    assert card["version"] == "1.0" and card["license"] == "MIT"
    assert card["sha256"] == known.sha256 and "llm-tiny" in card["source"]
    # listed by the app with no flag, and its card reaches the loaded model
    reg = Registry([], user_models=True)
    assert "Tiny.Q8_0" in reg.names()
    lm = reg.get("Tiny.Q8_0")
    assert lm.card["license"] == "MIT" and lm.card["version"] == "1.0"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["models", "list"])
    out = capsys.readouterr().out
    assert "Tiny.Q8_0" in out and "GGUF Q8_0" in out
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "remove", "Tiny.Q8_0"])
    assert done.value.code == 0
    assert not placed.exists() and not (folder / "Tiny.Q8_0.card.json").exists()
    assert not list((tmp_path / "cache" / "gguf").glob(f"{known.sha256}*"))
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "remove", "Tiny.Q8_0"])
    assert done.value.code == 1


def test_wrong_hash_or_size_refused(data_home, tmp_path):
    known, wheel = _fake(tmp_path)
    bad = dataclasses.replace(known, sha256="0" * 64)
    with pytest.raises(catalog.CatalogError, match="sha256"):
        catalog.install_from_wheel(bad, wheel, tmp_path / "dest")
    assert not list((tmp_path / "dest").glob("*"))  # nothing left behind
    with pytest.raises(catalog.CatalogError, match="bytes"):
        catalog.install_from_wheel(dataclasses.replace(known, size=1), wheel, tmp_path / "d2")
    with pytest.raises(catalog.CatalogError, match="holds no"):
        catalog.install_from_wheel(dataclasses.replace(known, member="x/y.gguf"), wheel,
                                   tmp_path / "d3")


def test_unknown_model(data_home, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "add", "nonesuch"])
    assert done.value.code == 1
    assert "unknown model 'nonesuch'" in capsys.readouterr().err


def test_remove_stays_inside_the_folder(data_home, tmp_path):
    outside = tmp_path / "data" / "attention-lens" / "precious.gguf"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"x")
    user_models_dir().mkdir(parents=True)
    with pytest.raises(catalog.CatalogError):
        catalog.remove("../precious")
    assert outside.exists()


@pytest.mark.slow
def test_add_smollm2_from_the_package_index(data_home):
    """Downloads about 93 MB from the package index pip is configured with."""
    path = catalog.add("smollm2", quiet=True)
    known = catalog.KNOWN["smollm2"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == known.sha256
    reg = Registry([], user_models=True)
    name = Path(known.file_name).stem
    assert name in reg.names()
    fp = reg.forward("The capital of France is", name)
    lm = reg.get(name)
    probs = fp.logits[-1].softmax(-1)
    assert lm.tokenizer.token_text(int(probs.argmax())) == " Paris"
    assert float(probs[lm.tokenizer.encode(" Paris")[0]]) > 0.7
    # the same file through transformers' own GGUF loader: tokens and logits agree
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attention_lens.model.texts import REAL_PROMPTS, TOKENIZER_STRINGS

    htok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s in TOKENIZER_STRINGS:
        assert lm.tokenizer.encode(s) == htok.encode(s, add_special_tokens=False), s
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    import torch

    for prompt in REAL_PROMPTS:
        ids = torch.tensor([lm.tokenizer.encode(prompt)])
        with torch.no_grad():
            assert float((lm.model(ids) - hf(ids).logits).abs().max()) < 1e-4, prompt


def test_job_host_registry_scans_the_same_folders(data_home, tmp_path):
    """The job processes build their registry from the web process's recipe: the user's
    models folder, the Hugging Face cache switch and the dequantized-weights cache go with
    it (else a model from `models add` is unknown to the jobs of its heavy pages)."""
    from types import SimpleNamespace

    from attention_lens.jobhost import job_recipe
    from attention_lens.registry import Registry

    reg = Registry(user_models=True, cache_dir=tmp_path / "c", hf_cache=False)
    bg = SimpleNamespace(cache_dir=None, max_jobs=1, deployment="one-machine", slots=None)
    recipe = job_recipe("attention_lens.server.app:create_app", reg, bg)
    again = Registry(**recipe["registry"])
    assert again.user_models and again.cache_dir == reg.cache_dir and not again.hf_cache
    assert again.names() == reg.names()
