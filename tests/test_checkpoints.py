"""Checkpoints: exact round trip, atomic save, keep-last, corruption reports, resume resolution."""

import ast
import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.checkpoints import check_config_compatible, epoch_dir_name, latest_checkpoint, list_checkpoints, load_checkpoint, load_config, resolve_resume, save_checkpoint, step_dir_name, verify_checkpoint
from rwkv_diffusion_rnn.common.errors import CheckpointError


class Tiny(nn.Module):
    """Embedding and output head share one weight, as in a tied language model."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))) * self.scale)


def make_run(seed=0, dim=6):
    torch.manual_seed(seed)
    model = Tiny(dim=dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, opt, sched, ema


def train(model, opt, sched, ema, steps):
    for _ in range(steps):
        x = torch.randint(0, 11, (3, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.1)


def quick_save(save_dir, name, step, **kw):
    model, opt, sched, ema = make_run(step)
    return save_checkpoint(save_dir, name, model=model, optimizer=opt, scheduler=sched, ema=ema,
                           trainer_state={"global_step": step, "epoch": 0}, **kw)


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_dir_names():
    assert epoch_dir_name(3) == "epoch_003"
    assert step_dir_name(200) == "step_0000200"


def test_round_trip_restores_every_part(tmp_path):
    model, opt, sched, ema = make_run(0)
    train(model, opt, sched, ema, 2)
    gen = torch.Generator().manual_seed(123)
    torch.randint(0, 100, (7,), generator=gen)
    state = {"global_step": 2, "epoch": 0, "batch_in_epoch": 2,
             "sampler": {"perm": [3, 1, 2], "offset": 2}, "metrics": {"loss": [1.5, 1.25]}}
    cfg = {"model": {"n_embd": 6, "mixer": "bi"}, "training": {"lr": 0.01}}
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save_checkpoint(tmp_path, step_dir_name(2), model=model, optimizer=opt, scheduler=sched, ema=ema,
                           trainer_state=state, extra_tensors={"data_rng": gen.get_state()}, config=cfg)
    expected_draws = draws()

    assert path == tmp_path / "step_0000002"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt",
                                      "rng.pt", "extra.pt", "trainer_state.json", "config.yaml", "metrics.json"}
    assert json.loads((path / "metrics.json").read_text()) == state["metrics"]
    assert load_config(path) == cfg
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # the tied weight is stored once
        assert len({"emb.weight", "head.weight"} & set(f.keys())) == 1
    for pt in path.glob("*.pt"):
        torch.load(pt, weights_only=True)

    model2, opt2, sched2, ema2 = make_run(99)
    train(model2, opt2, sched2, ema2, 1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    trainer_state, extra = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, ema=ema2)

    assert draws() == expected_draws
    assert trainer_state == state
    assert torch.equal(extra["data_rng"], gen.get_state())
    assert model2.head.weight is model2.emb.weight
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch == 2
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])

    # Training goes on identically from the restored state.
    torch.manual_seed(11)
    train(model, opt, sched, ema, 1)
    torch.manual_seed(11)
    train(model2, opt2, sched2, ema2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_save_refuses_values_that_safe_loading_cannot_read(tmp_path):
    model = Tiny()
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path, "step_0000001", model=model, trainer_state={"global_step": 1},
                        extra_tensors={"perm": np.arange(3)})
    assert not (tmp_path / "step_0000001").exists()


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    first = quick_save(tmp_path, step_dir_name(1), 1)
    real_record, calls = ckpt._record, []

    def failing_record(file):
        calls.append(file)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real_record(file)

    monkeypatch.setattr(ckpt, "_record", failing_record)
    with pytest.raises(OSError, match="No space"):
        quick_save(tmp_path, step_dir_name(2), 2)
    assert not (tmp_path / "step_0000002").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == first
    verify_checkpoint(first)


def test_killed_save_leaves_no_checkpoint_and_next_save_cleans_up(tmp_path):
    quick_save(tmp_path, step_dir_name(1), 1)
    script = textwrap.dedent(f"""
        import os, torch
        from rwkv_diffusion_rnn.training import checkpoints as ckpt
        real, n = ckpt._record, []
        def dying(file):
            n.append(file)
            if len(n) == 4:
                os._exit(17)  # killed after some files are written
            return real(file)
        ckpt._record = dying
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 3)
        ckpt.save_checkpoint({str(tmp_path)!r}, "step_0000002", model=model,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             trainer_state={{"global_step": 2}})
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, timeout=60)
    assert proc.returncode == 17
    assert len(list(tmp_path.glob(".tmp-step_0000002-*"))) == 1
    assert not (tmp_path / "step_0000002").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]

    quick_save(tmp_path, step_dir_name(3), 3)
    assert not list(tmp_path.glob(".*"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001", "step_0000003"]


def test_replacing_a_name_and_recovering_an_interrupted_replace(tmp_path):
    quick_save(tmp_path, "epoch_001", 10)
    path = quick_save(tmp_path, "epoch_001", 12)
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 12
    verify_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001"]

    # Killed between moving the old copy aside and moving the new one in.
    os.replace(path, tmp_path / ".old-epoch_001-999999")
    quick_save(tmp_path, "epoch_002", 20)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_001", "epoch_002"]
    verify_checkpoint(tmp_path / "epoch_001")


def test_keep_last_keeps_newest_by_global_step(tmp_path):
    # Names sort differently from steps: rotation must follow global_step.
    for name, step in [("c", 10), ("a", 30), ("d", 20), ("b", 40)]:
        quick_save(tmp_path, name, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["a", "b"]
    # The checkpoint just written survives even when it is not the newest.
    quick_save(tmp_path, "e", 5, keep_last=1)
    assert "e" in [p.name for p in list_checkpoints(tmp_path)]
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_name_file_and_intact_checkpoint(tmp_path, damage):
    first = quick_save(tmp_path, step_dir_name(1), 1)
    second = quick_save(tmp_path, step_dir_name(2), 2)
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))

    model, opt, sched, ema = make_run(3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(resolve_resume("latest", tmp_path), model=model, optimizer=opt, scheduler=sched, ema=ema)
    msg = str(err.value)
    assert str(weights) in msg
    assert f"training.resume={first.resolve()}" in msg
    with pytest.raises(CheckpointError, match="intact"):
        verify_checkpoint(second)
    load_checkpoint(first, model=model, optimizer=opt, scheduler=sched, ema=ema)


def test_unreadable_safetensors_is_a_checkpoint_error(tmp_path):
    path = quick_save(tmp_path, "epoch_001", 1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt._load_weights(weights, Tiny())


def test_missing_manifest_is_not_complete(tmp_path):
    first = quick_save(tmp_path, step_dir_name(1), 1)
    second = quick_save(tmp_path, step_dir_name(2), 2)
    (second / "manifest.json").unlink()
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(second), tmp_path)
    assert str(second) in str(err.value) and "manifest.json" in str(err.value)
    assert str(first.resolve()) in str(err.value)


def test_weights_that_do_not_fit_the_model(tmp_path):
    path = quick_save(tmp_path, "epoch_001", 1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=Tiny(dim=8))
    msg = str(err.value)
    assert "mid.weight: file [6, 6] vs model [8, 8]" in msg and "model.safetensors" in msg


def test_resolve_resume(tmp_path):
    save_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=str(save_dir)):
        resolve_resume("latest", save_dir)
    save_dir.mkdir()
    with pytest.raises(CheckpointError, match=str(save_dir)):
        resolve_resume("latest", save_dir)
    missing = save_dir / "epoch_009"
    with pytest.raises(CheckpointError, match=str(missing)):
        resolve_resume(str(missing), save_dir)
    a = quick_save(save_dir, "epoch_001", 1)
    b = quick_save(save_dir, "epoch_002", 2)
    assert resolve_resume("latest", save_dir) == b
    assert resolve_resume(str(a), save_dir) == a
    assert resolve_resume("epoch_001", save_dir) == a


def test_check_config_compatible_names_differing_keys():
    saved = {"model": {"n_embd": 128, "mixer": {"kind": "bi"}, "latent_dim": 32}, "training": {"lr": 1e-3}}
    check_config_compatible(saved, copy.deepcopy(saved))
    current = copy.deepcopy(saved)
    current["model"]["n_embd"] = 256
    current["model"]["mixer"]["kind"] = "causal"
    current["training"]["lr"] = 5e-4
    with pytest.raises(CheckpointError) as err:
        check_config_compatible(saved, current)
    msg = str(err.value)
    assert "model.n_embd: checkpoint 128, config 256" in msg
    assert "model.mixer.kind: checkpoint bi, config causal" in msg
    assert "training.lr" not in msg and "new run" in msg


def test_every_torch_load_is_weights_only():
    tree = ast.parse(Path(ckpt.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "load" and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]
    assert calls
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
