"""Import structure of the package, found by walking every module's imports (no lists by hand).

Data flows down: nothing imports the app factory module except the entry points, no import
cycle anywhere in the package (imports inside functions count too), and the layers keep to
their libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attention_lens"
#: The modules that may build the app: the server factory and the command line.
# the job host is the entry point of the clean process every one-machine job is forked from:
# it builds the same app as the server
ENTRY_POINTS = {"attention_lens.server", "attention_lens.cli", "attention_lens.jobhost"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports (absolute or relative, anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the deepest package module the import names (``from . import page`` -> page)
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_the_walk_sees_the_package(graph):
    assert len(graph) > 40
    assert "attention_lens.components.page" in graph["attention_lens.pages.weights"]
    assert "attention_lens.registry" in graph["attention_lens.components.page"]


def test_nothing_imports_the_app_module_but_the_entry_points(graph):
    users = sorted(m for m, deps in graph.items() if "attention_lens.server.app" in deps)
    assert set(users) <= ENTRY_POINTS, users


def test_no_import_cycle(graph):
    """Depth-first search over every import edge; any back edge is a cycle."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    # a package's __init__ importing its own submodules is not a loop back up
    real = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c)]
    assert real == [], real


def third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def loaded_by(modules: list[str]) -> set[str]:
    """Top-level packages loaded by importing every one of ``modules`` in a fresh process
    (what the layer pulls in through the package's other modules too)."""
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n" \
           "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize("layer,banned", [("analysis", {"dash", "plotly", "flask"}),
                                          ("figures", {"torch", "dash", "flask"}),
                                          ("model", {"dash", "plotly", "flask"})])
def test_layers_keep_to_their_libraries(layer, banned):
    """Neither a layer's own imports nor what they load at run time reach a banned library."""
    paths = sorted((PACKAGE / layer).rglob("*.py"))
    assert len(paths) >= 3, layer
    for path in paths:
        assert not third_party(path) & banned, (path.name, third_party(path) & banned)
    names = [module_name(p) for p in paths]
    assert not loaded_by(names) & banned, (layer, loaded_by(names) & banned)


def test_pages_never_import_the_app_registry_or_server(graph):
    for mod, deps in graph.items():
        if mod.startswith("attention_lens.pages."):
            bad = deps & {"attention_lens.server.app", "attention_lens.server", "attention_lens.cli",
                          "attention_lens.registry", "attention_lens.server.api"}
            assert not bad, (mod, bad)


#: The README's "Code layout", top (0) to bottom: a module imports only its own layer or above.
LAYERS = {"paths": 0, "data": 0, "model": 0, "analysis": 1, "training": 1, "cache": 1,
          "figures": 2, "api_json": 2, "registry": 3, "background": 3, "jobhost": 3,
          "weight_analyses": 3, "components": 4, "export": 4, "prompt_links": 4, "pages": 5,
          "server": 6, "cli": 7, "bench": 8}


def test_every_import_goes_up_the_layers_the_readme_names(graph):
    def layer(mod: str) -> int:
        parts = mod.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS, f"{mod}: not in the README's layout"
        return LAYERS[parts[1]] if len(parts) > 1 else -1

    down = sorted((a, b) for a, deps in graph.items() for b in deps if layer(b) > layer(a))
    assert down == [], down


def test_no_runtime_module_imports_the_bench(graph):
    """The bench and the load test measure the runtime; nothing in it imports them (the models
    and texts they share with the tests live in ``model``)."""
    bench = {m for m in graph if m.split(".")[:2] == ["attention_lens", "bench"]}
    assert {"attention_lens.bench.__main__", "attention_lens.bench.load",
            "attention_lens.bench.flow"} <= bench
    users = sorted((m, sorted(deps & bench)) for m, deps in graph.items()
                   if m not in bench and deps & bench)
    assert users == [], users
