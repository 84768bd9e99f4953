"""Checkpoint faults: nothing lost, nothing silently wrong.

A full disk, non-finite weights, an invalid config.yaml, a file given as training.resume, a newest
checkpoint without its manifest, and pickles the safe loader refuses: each is a CheckpointError
that names the file and the fix, and no complete checkpoint is lost.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.checkpoints import clean_save_dir, list_checkpoints, load_checkpoint, load_config, read_saved_config, resolve_resume, save_checkpoint, step_dir_name, verify_checkpoint
from rwkv_diffusion_rnn.common.errors import CheckpointError, CheckpointWriteError, NonFiniteError
from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, random_blinkdl_state_dict

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.emb = nn.Embedding(7, dim)
        self.mid = nn.Linear(dim, dim)


def save(save_dir, step, name=None, *, model=None, ema=None, **kw):
    torch.manual_seed(step)
    model = model if model is not None else Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return save_checkpoint(save_dir, name or step_dir_name(step), model=model, optimizer=opt, ema=ema,
                           trainer_state={"global_step": step, "epoch": 0}, config={"model": {"dim": 4}}, **kw)


def snapshot(save_dir):
    """Every file under save_dir with its bytes: what 'nothing existing touched' compares."""
    return {str(p.relative_to(save_dir)): p.read_bytes() for p in sorted(Path(save_dir).rglob("*")) if p.is_file()}


def rerecord(path, fname):
    """Make the manifest agree with a file changed on purpose, so the damage is not caught by sha256."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][fname] = ckpt._record(path / fname)
    (path / "manifest.json").write_text(json.dumps(manifest))


def fail_on(monkeypatch, target, attr, fname, error):
    """Patch ``target.attr`` (a writer taking the file second or as self) to raise ``error`` for ``fname``."""
    real = getattr(target, attr)

    def writer(*args, **kwargs):
        files = [a for a in args if isinstance(a, (str, Path))]
        if any(Path(f).name == fname for f in files):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, writer)


def free_space(monkeypatch, free):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - free, free))


# ----------------------------------------------------------------------------------------------
# 1. disk full during a save


NO_SPACE_ERRORS = {
    "safetensors weights": (ckpt, "save_file", "model.safetensors", SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
    "torch.save optimizer": (torch, "save", "optimizer.pt", RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")),
    "write_text trainer state": (Path, "write_text", "trainer_state.json",
                                 OSError(errno.ENOSPC, "No space left on device")),
    "write_text over quota": (Path, "write_text", "config.yaml", OSError(errno.EDQUOT, "Disk quota exceeded")),
}


@pytest.mark.parametrize("case", sorted(NO_SPACE_ERRORS))
def test_a_full_disk_names_the_save_dir_and_the_intact_previous_checkpoint(tmp_path, monkeypatch, case):
    first = save(tmp_path, 1)
    before = snapshot(tmp_path)
    target, attr, fname, error = NO_SPACE_ERRORS[case]
    fail_on(monkeypatch, target, attr, fname, error)
    free_space(monkeypatch, 0)  # torch's zip writer does not say why: the free space decides
    with pytest.raises(CheckpointWriteError) as err:
        save(tmp_path, 2)
    msg = str(err.value)
    assert f"no space left on {tmp_path}; the previous checkpoint {first} is intact" in msg
    assert fname in msg and "0 bytes free" in msg
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, OSError)
    assert err.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert snapshot(tmp_path) == before  # the half-written directory is gone, nothing else changed
    verify_checkpoint(first)


def test_a_full_disk_before_any_checkpoint_says_no_earlier_checkpoint_exists(tmp_path, monkeypatch):
    fail_on(monkeypatch, torch, "save", "rng.pt", RuntimeError("PytorchStreamWriter failed writing file data/0"))
    free_space(monkeypatch, 512)
    with pytest.raises(CheckpointWriteError, match=f"no space left on {tmp_path}; no earlier checkpoint exists"):
        save(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_an_unexplained_writer_failure_with_room_left_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    before = snapshot(tmp_path)
    fail_on(monkeypatch, torch, "save", "optimizer.pt", RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                    "unexpected pos 4288 vs 4176"))
    free_space(monkeypatch, 5 << 30)
    with pytest.raises(CheckpointWriteError) as err:
        save(tmp_path, 2)
    msg = str(err.value)
    assert "no space left" not in msg and "torch's writer does not say why" in msg and "5.0 GiB free" in msg
    assert f"writing {tmp_path}/.tmp-step_0000002-{os.getpid()}/optimizer.pt failed" in msg
    assert f"The previous checkpoint {first} is intact" in msg
    assert snapshot(tmp_path) == before


def test_any_other_write_error_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    before = snapshot(tmp_path)
    fail_on(monkeypatch, Path, "write_text", "manifest.json", PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(CheckpointWriteError) as err:
        save(tmp_path, 2)
    msg = str(err.value)
    assert "manifest.json failed (PermissionError: [Errno 13] Permission denied)" in msg
    assert f"The previous checkpoint {first} is intact" in msg and err.value.errno == errno.EACCES
    assert snapshot(tmp_path) == before


def test_an_interrupt_mid_save_passes_through_and_removes_the_half_written_directory(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    fail_on(monkeypatch, torch, "save", "optimizer.pt", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [first] and not list(tmp_path.glob(".tmp-*"))


def _small_filesystem_available(tmp_path):
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f"mount -t tmpfs -o size=64k tmpfs {probe} && touch {probe}/x"
    ok = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, timeout=20).returncode == 0
    probe.rmdir()
    return ok


def test_a_real_full_filesystem_keeps_the_previous_checkpoint(tmp_path):
    """On a 256 KiB tmpfs in a private mount namespace (unshare -rm, no root needed where user
    namespaces are allowed): a small checkpoint fits, a big one does not."""
    if not _small_filesystem_available(tmp_path):
        pytest.skip("cannot mount a small tmpfs here (unshare -rm refused)")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import json, torch
        from rwkv_diffusion_rnn.training import checkpoints as ckpt
        first = ckpt.save_checkpoint({str(disk)!r}, "step_0000001", model=torch.nn.Linear(3, 3),
                                     trainer_state={{"global_step": 1}})
        big = torch.nn.Linear(300, 300)  # 360 KB of weights
        try:
            ckpt.save_checkpoint({str(disk)!r}, "step_0000002", model=big, trainer_state={{"global_step": 2}})
            out = {{"raised": None}}
        except ckpt.CheckpointError as e:
            out = {{"raised": type(e).__name__, "msg": str(e)}}
        ckpt.verify_checkpoint(first)
        out["left"] = sorted(p.name for p in first.parent.iterdir())
        print(json.dumps(out))
    """)
    cmd = f'mount -t tmpfs -o size=256k tmpfs {disk} && exec "$0" -c "$1"'
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd, sys.executable, script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raised"] == "CheckpointWriteError"
    assert f"no space left on {disk}; the previous checkpoint {disk}/step_0000001 is intact" in out["msg"]
    assert out["left"] == ["step_0000001"]


# ----------------------------------------------------------------------------------------------
# 2. non-finite weights


@pytest.mark.parametrize("where", ["model", "ema"])
def test_non_finite_weights_are_never_written(tmp_path, where):
    first = save(tmp_path, 1)
    before = snapshot(tmp_path)
    model, ema = Tiny(), Tiny()
    with torch.no_grad():
        (model if where == "model" else ema).mid.bias[1] = float("nan")
        (model if where == "model" else ema).mid.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        save(tmp_path, 2, model=model, ema=ema)
    msg = str(err.value)
    assert f"{where} tensor 'mid.weight' holds 1 NaN/inf values of 16" in msg
    assert f"The previous checkpoint {first} is intact" in msg
    assert snapshot(tmp_path) == before


def test_every_written_manifest_records_finite_weights(tmp_path):
    path = save(tmp_path, 1)
    assert json.loads((path / "manifest.json").read_text())["finite"] is True


def test_pruning_never_deletes_the_newest_checkpoint_recorded_finite(tmp_path):
    for step in (30, 40):
        save(tmp_path, step, name=f"run_{step}")
    # A checkpoint saved later with a lower step (a restart) must not cost the newest finite one.
    save(tmp_path, 5, name="restart_5", keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["restart_5", "run_40"]
    # Manifests from before the key existed count as unknown: pruned by age, spared by nothing.
    for name in ("restart_5", "run_40"):
        manifest = tmp_path / name / "manifest.json"
        old = json.loads(manifest.read_text())
        del old["finite"]
        manifest.write_text(json.dumps(old))
    save(tmp_path, 3, name="restart_3", keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["restart_3", "run_40"]


# ----------------------------------------------------------------------------------------------
# 3. invalid config.yaml


def test_invalid_yaml_in_a_checkpoint_config_names_the_file(tmp_path):
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    config = second / "config.yaml"
    text = config.read_text()
    config.write_text("model: [1, 2" + " " * (len(text) - 12))  # same size: only the sha256 tells
    # Read through the checkpoint: the sha256 check comes first and names an intact checkpoint.
    with pytest.raises(CheckpointError) as err:
        read_saved_config(second, resolve=False)
    assert f"the sha256 of {config} does not match" in str(err.value)
    assert f"training.resume={first}" in str(err.value)
    # A file the manifest agrees with but that does not parse.
    rerecord(second, "config.yaml")
    for read in (lambda: read_saved_config(second, resolve=False), lambda: load_config(second)):
        with pytest.raises(CheckpointError, match=f"{config} is not a valid run config \\(ParserError: while parsing"):
            read()
    assert read_saved_config(first, resolve=False) == {"model": {"dim": 4}}


def test_a_checkpoint_without_a_config_reads_as_none(tmp_path):
    path = save_checkpoint(tmp_path, "step_0000001", model=Tiny(), trainer_state={"global_step": 1})
    assert read_saved_config(path, resolve=True) is None and load_config(path) is None


def test_trained_saved_config_reports_invalid_yaml_by_file(tmp_path):
    from rwkv_diffusion_rnn.training.trained import saved_config

    path = save(tmp_path, 1)
    (path / "config.yaml").write_text("a: b: c\n")
    with pytest.raises(CheckpointError, match="config.yaml is not a valid run config \\(ScannerError"):
        saved_config(path)


# ----------------------------------------------------------------------------------------------
# 4. a file given as training.resume


@pytest.mark.parametrize("fname", ["model.safetensors", "manifest.json"])
def test_resume_from_a_file_inside_a_checkpoint_suggests_its_folder(tmp_path, fname):
    path = save(tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(path / fname), tmp_path)
    msg = str(err.value)
    assert f"{path / fname} is a file, not a checkpoint directory" in msg and "does not exist" not in msg
    assert f"training.resume={path.resolve()}" in msg


def test_resume_from_a_stray_file_names_the_newest_checkpoint(tmp_path):
    path = save(tmp_path, 1)
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(CheckpointError, match=f"is a file, not a checkpoint directory. The newest checkpoint in {tmp_path} is {path}"):
        resolve_resume(str(stray), tmp_path)


# ----------------------------------------------------------------------------------------------
# 5. a newest checkpoint without its manifest


def test_latest_refuses_to_skip_a_newer_checkpoint_without_manifest(tmp_path):
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    (second / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        resolve_resume("latest", tmp_path)
    msg = str(err.value)
    assert f"the newest complete checkpoint is {first}" in msg and str(second) in msg
    assert "move the damaged directory aside" in msg and f"training.resume={first.resolve()}" in msg
    assert resolve_resume(str(first), tmp_path) == first  # the explicit way still works
    assert (second / "model.safetensors").is_file()


def test_latest_with_only_broken_checkpoints_names_them_instead_of_starting_over(tmp_path):
    path = save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=f"holds no complete checkpoint, only .*{path} .*mv {path} {path}.damaged"):
        resolve_resume("latest", tmp_path)


def test_latest_still_resumes_when_only_an_older_directory_is_broken(tmp_path):
    old = save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (old / "manifest.json").unlink()
    os.utime(old, (0, 0))  # older by mtime too
    assert resolve_resume("latest", tmp_path) == newest


def test_saving_over_a_directory_without_manifest_moves_it_aside(tmp_path):
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    (second / "manifest.json").unlink()
    weights = (second / "model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match="was not a complete checkpoint.*moved aside to .*step_0000002.incomplete-"):
        again = save(tmp_path, 2)
    verify_checkpoint(again)
    (aside,) = tmp_path.glob("step_0000002.incomplete-*")
    assert (aside / "model.safetensors").read_bytes() == weights
    clean_save_dir(tmp_path)  # not a working directory: kept
    assert aside.is_dir() and [p.name for p in list_checkpoints(tmp_path)] == [first.name, again.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replacing a complete checkpoint stays silent
        save(tmp_path, 2)


# ----------------------------------------------------------------------------------------------
# 6. pickles the safe loader refuses


class WritesMarker:
    """Unpickling this would create the marker file: the safe loader must never do it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def legacy_save(obj, file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, file, _use_new_zipfile_serialization=False)


def test_a_legacy_pth_of_tensors_loads_and_one_with_objects_is_refused_without_running_them(tmp_path):
    shape = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=64)
    sd = random_blinkdl_state_dict(**shape)
    legacy_save(sd, tmp_path / "plain.pth")
    model = load_rwkv7(tmp_path / "plain.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])

    marker = tmp_path / "marker"
    legacy_save(dict(sd, payload=WritesMarker(marker)), tmp_path / "objects.pth")
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_rwkv7(tmp_path / "objects.pth")
    msg = str(err.value)
    assert "objects.pth: holds pickled Python objects that are not loaded for safety (it refers to" in msg
    assert "legacy torch.save format" in msg and "re-save it with torch.save(state_dict)" in msg.lower()
    assert "re-download" not in msg and not marker.exists()


def test_a_truncated_legacy_pth_still_says_re_download(tmp_path):
    legacy_save(random_blinkdl_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=64), tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "m.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="m.pth: not a readable PyTorch checkpoint .*re-download"):
        load_rwkv7(tmp_path / "m.pth")


def test_a_checkpoint_pt_holding_objects_is_refused_without_running_them(tmp_path):
    path = save(tmp_path, 1)
    marker = tmp_path / "marker"
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    legacy_save(dict(opt, payload=WritesMarker(marker)), path / "optimizer.pt")
    rerecord(path, "optimizer.pt")
    model = Tiny()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    msg = str(err.value)
    assert f"{path / 'optimizer.pt'} holds pickled Python objects that are not loaded for safety" in msg
    assert "legacy torch.save format" in msg and not marker.exists()
    # A legacy file of tensors only is safe to load and is loaded.
    legacy_save(opt, path / "optimizer.pt")
    rerecord(path, "optimizer.pt")
    load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters()))
