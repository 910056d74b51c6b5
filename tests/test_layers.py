"""Layers stay in their rooms: analysis imports no dash/plotly; figures import no torch/dash."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import attention_lens.analysis
import attention_lens.figures


def _modules(pkg) -> list[str]:
    return [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


def _top_level_imports(modules: list[str]) -> set[str]:
    """Top-level packages loaded by importing every module of ``modules`` in a fresh process."""
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n" \
           "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("pkg, forbidden", [
    (attention_lens.analysis, {"dash", "plotly", "flask"}),
    (attention_lens.figures, {"dash", "flask", "torch"}),
])
def test_layer_imports(pkg, forbidden):
    modules = _modules(pkg)
    assert len(modules) >= 5
    assert not _top_level_imports(modules) & forbidden
