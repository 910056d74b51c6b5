"""The README's TransformerLens snippet ("Model folders"), run exactly as written.

On the installed TransformerLens 3.9 it must take the ``HookedTransformer`` branch; in a fresh
environment with TransformerLens 4.x (slow: it installs one) the ``TransformerBridge`` branch.
Either way its logits on our folders must equal ours within 1e-4: the shipped attention-only
model, a small one with LayerNorm and GELU MLPs and a small Llama-style one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attention_lens.model import load_model, save_model
from attention_lens.registry import DEFAULT_WEIGHTS

README = Path(__file__).resolve().parent.parent / "README.md"
FOLDER_LINE = 'folder = "weights/attn-only-2l"\n'
ATOL = 1e-4


def readme_snippet() -> str:
    """The one Python block of the README's "Model folders" section that uses TransformerLens."""
    section = README.read_text(encoding="utf-8").split("\n## Model folders\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S)
              if "transformer_lens" in b]
    assert len(blocks) == 1, "the section must hold exactly one TransformerLens snippet"
    assert blocks[0].count(FOLDER_LINE) == 1, "the snippet names its folder on one line"
    return blocks[0]


def snippet_for(folder: Path) -> str:
    """The snippet with its folder line pointing at ``folder``; nothing else changed."""
    return readme_snippet().replace(FOLDER_LINE, f"folder = {str(folder)!r}\n")


def snippet_prompt() -> str:
    (prompt,) = re.findall(r'tokenizer\.encode\("([^"]*)"', readme_snippet())
    return prompt


def small_folders(root: Path) -> list[Path]:
    """The shipped attention-only model and two seeded random ones written in our format:
    LayerNorm + GELU MLPs, and Llama-style (RMSNorm, partial rotary, SwiGLU without MLP
    biases, as converted Llama models have none), and parallel attention + MLP (GPT-NeoX);
    norm scales and biases are non-trivial."""
    from conftest import TINY_TEXT, make_tiny

    from attention_lens.model import Tokenizer

    tokenizer = Tokenizer.train([TINY_TEXT], vocab_size=300)
    variants = {
        "tiny-ln-mlp": dict(normalization_type="LN", act_fn="gelu"),
        "tiny-llama": dict(normalization_type="RMS", act_fn="silu", gated_mlp=True,
                           final_rms=True, positional_embedding_type="rotary", rotary_dim=4),
        "tiny-parallel": dict(normalization_type="LN", act_fn="gelu", parallel_attn_mlp=True),
    }
    folders = [Path(DEFAULT_WEIGHTS) / "attn-only-2l"]
    for seed, (name, kw) in enumerate(variants.items(), start=3):
        lm = make_tiny(tokenizer, seed=seed, attn_only=False, d_mlp=48, name=name, **kw)
        with torch.no_grad():
            for key, p in lm.model.named_parameters():
                if key.endswith(".w"):
                    p.mul_(1 + 0.3 * torch.randn_like(p))
                if lm.cfg.gated_mlp and key.endswith((".mlp.b_in", ".mlp.b_out")):
                    p.zero_()
        folders.append(save_model(lm.model, lm.tokenizer, root / name))
    return folders


def check_against_ours(folder: Path, tokens: torch.Tensor, logits: torch.Tensor) -> float:
    """Max |logit difference| between the snippet's model and ours on the snippet's tokens."""
    lm = load_model(folder)
    assert tokens.tolist() == [lm.tokenizer.encode(snippet_prompt())]
    with torch.no_grad():
        ours = lm.model(tokens)
    assert logits.shape == ours.shape == (1, tokens.shape[1], lm.cfg.d_vocab)
    diff = (logits.float() - ours).abs().max().item()
    assert diff <= ATOL, f"{folder.name}: logits differ by {diff:.3g}"
    return diff


@pytest.mark.oracle
def test_snippet_runs_on_installed_transformer_lens_3(tmp_path):
    folders = small_folders(tmp_path)
    for folder in folders:
        ns: dict = {"__name__": "readme_snippet"}
        exec(compile(snippet_for(folder), "README.md", "exec"), ns)
        assert type(ns["model"]).__name__ == "HookedTransformer"
        assert ns["cache"]["blocks.1.attn.hook_pattern"].shape[-1] == ns["tokens"].shape[1]
        diff = check_against_ours(folder, ns["tokens"], ns["logits"].detach())
        print(f"TransformerLens 3.9, {folder.name}: max |logit diff| {diff:.3g}")


# Run in the TransformerLens 4.x environment: the snippet for each folder, in a fresh namespace,
# writing the tokens and logits it computed, and which class the snippet built.
DRIVER = """
import json, sys
import importlib.metadata
from safetensors.torch import save_file
jobs = json.loads(sys.argv[1])
report = {"version": importlib.metadata.version("transformer-lens"), "classes": []}
for code, out in jobs:
    ns = {"__name__": "readme_snippet"}
    try:
        exec(compile(code, "README.md", "exec"), ns)
    except NotImplementedError:
        report["classes"].append("NotImplementedError")
        continue
    assert ns["cache"]["blocks.1.attn.hook_pattern"].shape[-1] == ns["tokens"].shape[1]
    save_file({"tokens": ns["tokens"].contiguous(),
               "logits": ns["logits"].detach().float().contiguous()}, out)
    report["classes"].append(type(ns["model"]).__name__)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def tl4_python(tmp_path_factory) -> str:
    """A Python with TransformerLens 4.x: ATTENTION_LENS_TL4_PYTHON if set (an environment made
    before), else a fresh virtual environment with the torch we run on and transformer-lens 4."""
    given = os.environ.get("ATTENTION_LENS_TL4_PYTHON")
    if given:
        return given
    venv = tmp_path_factory.mktemp("tl4") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    subprocess.run([python, "-m", "pip", "install", "-q", torch_pin, "transformer-lens>=4,<5"],
                   check=True, timeout=3000)
    return python


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.timeout(3600)  # the first run installs TransformerLens 4 and its dependencies
def test_snippet_runs_on_transformer_lens_4(tl4_python, tmp_path):
    folders = small_folders(tmp_path)
    jobs = [(snippet_for(f), str(tmp_path / f"{f.name}.out.safetensors")) for f in folders]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the snippet downloads nothing
    run = subprocess.run([tl4_python, "-c", DRIVER, json.dumps(jobs)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["version"].split(".")[0] == "4", report
    expected = ["NotImplementedError" if load_model(f).cfg.parallel_attn_mlp else
                "TransformerBridge" for f in folders]
    assert report["classes"] == expected, report  # a parallel model is refused, not misrun
    for folder, (_, out) in zip(folders, jobs):
        if load_model(folder).cfg.parallel_attn_mlp:
            continue
        got = load_file(out)
        diff = check_against_ours(folder, got["tokens"], got["logits"])
        print(f"TransformerLens {report['version']}, {folder.name}: max |logit diff| {diff:.3g}")
