"""The package's layers import only downward: entry points -> training -> data / diffusion /
weights -> models -> ops. Walks every module's imports (top level and inside functions)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rwkv_diffusion_rnn"
# rank of each layer; a module may import its own layer or a lower rank
RANKS = {"ops": 0, "models": 1, "weights": 2, "diffusion": 2, "data": 2, "training": 3, "": 4}


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


def test_no_module_imports_from_a_layer_above_or_beside_it():
    assert upward_imports() == []


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
