"""The package's layers import only downward: entry points -> training -> data / diffusion /
weights -> models -> ops -> common, and no module takes part in an import cycle. Walks every
module's imports (top level and inside functions)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rwkv_diffusion_rnn"
# rank of each layer; a module may import its own layer or a lower rank
RANKS = {"common": -1, "ops": 0, "models": 1, "weights": 2, "diffusion": 2, "data": 2, "training": 3, "": 4}


def layer_of(module: str) -> str:
    """'rwkv_diffusion_rnn.training.builders' -> 'training'; root modules -> ''."""
    parts = module.split(".")[1:]
    return parts[0] if parts and parts[0] in RANKS else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """Absolute names of the package modules ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("rwkv_diffusion_rnn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("rwkv_diffusion_rnn"):
                target = node.module
            else:
                continue
            yield target
            for a in node.names:   # "from . import checkpoints" names a module
                yield f"{target}.{a.name}"


def upward_imports():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for target in imported_modules(path):
            theirs = layer_of(target)
            if target == "rwkv_diffusion_rnn" and mine:
                bad.append((me, target))       # the package root is the top layer
            elif theirs != mine and RANKS[theirs] >= RANKS[mine]:
                bad.append((me, target))
    return bad


def import_graph():
    """module -> the package modules it imports (names that are not modules, e.g. a class
    imported from a module, are dropped)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    return {me: {t for t in imported_modules(p) if t in modules and t != me} for me, p in modules.items()}


def import_cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_from_a_layer_above_or_beside_it():
    assert upward_imports() == []


def test_no_import_cycle():
    """A package __init__ importing its own submodules is how a package exposes them, not a
    cycle; every other loop is."""
    graph = import_graph()
    for pkg in [m for m in graph if (PKG.parent / m.replace(".", "/") / "__init__.py").exists()]:
        for child in graph:
            if child.startswith(pkg + "."):
                graph[child] = graph[child] - {pkg}
    assert import_cycles(graph) == []


def test_the_cycle_walk_sees_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_error_type_lives_in_the_errors_module():
    """One home for the project's error types: no other module defines an exception class."""
    import ast
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "common" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                found.append(f"{module_name(path)}.{node.name}")
    assert found == []


def test_the_walk_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a models module importing training is reported."""
    fake = PKG / "models" / "_layer_probe.py"
    fake.write_text("from ..training import builders\n")
    try:
        assert ("rwkv_diffusion_rnn.models._layer_probe", "rwkv_diffusion_rnn.training.builders") in upward_imports()
    finally:
        fake.unlink()


def test_the_package_and_its_public_api_import():
    code = ("import rwkv_diffusion_rnn as r; "
            "print(r.load_rwkv7, r.wkv7, r.MultimodalRWKVDenoiser, r.DenoiserConfig, r.generate_text, "
            "r.generate_latent)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("module", ["train_rwkv", "preprocess_tokenize_text", "prepare_latents", "demo"])
def test_every_entry_point_answers_help(module):
    out = subprocess.run([sys.executable, "-m", f"rwkv_diffusion_rnn.{module}", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or "hydra" in out.stdout.lower()
