"""The trainer under faults: divergence, two writers, damaged logs, keys nothing reads, a resume
with other settings, a failing final evaluation and SIGKILLs at random moments. Each test checks
the message and that nothing written before is lost."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.improved_trainer import Trainer, read_train_log
from rwkv_diffusion_rnn.common.errors import ConfigError, RunLockedError
from rwkv_diffusion_rnn.training.run_lock import LOCK_FILE, RunLock
from rwkv_diffusion_rnn.train_rwkv import compose_config, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=struct", "model.n_layer=1", "model.n_embd=64", "training.train_batch_size=16",
        "data.eval_size=16", "eval.sample_steps=4", "logging.progress_bar=false", "logging.log_freq=1",
        "logging.eval_freq=0", "optimizer.warmup_steps=2"]


def strict_json(text):
    """json.loads that refuses the NaN / Infinity Python writes by default (not JSON)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def nan_at(monkeypatch, steps):
    """Makes the loss NaN at the given (1-based) optimizer steps."""
    orig = Trainer.compute_loss

    def compute_loss(self, batch, generator=None):
        loss, st = orig(self, batch, generator)
        if generator is None and self.global_step + 1 in steps:
            loss = loss * float("nan")
        return loss, st
    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def cli(args, tmp_path, name="hydra"):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *args,
                           f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------- divergence

def test_a_diverging_run_stops_naming_the_step_and_keeps_a_finite_checkpoint_and_valid_json(tmp_path):
    save = tmp_path / "run"
    r = cli([*TINY, "training.max_steps=30", "optimizer.lr=1e3", "logging.save_every=1", "logging.keep_last=1",
             "training.max_bad_steps=2", f"logging.save_dir={save}"], tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    msg = r.stderr
    assert "training diverged at step" in msg and "training.max_bad_steps=2" in msg
    ckpts = ckpt.list_checkpoints(save)
    assert len(ckpts) == 1 and str(ckpts[0]) in msg       # the last good checkpoint is named
    weights = load_file(str(ckpts[0] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = [strict_json(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    bad = [rec for rec in records if rec.get("skipped_steps")]
    assert len(bad) == 3 and all(rec["loss"] is None for rec in bad)
    diverged_at = int(msg.split("training diverged at step ")[1].split(":")[0])
    assert [rec["step"] for rec in bad] == [diverged_at - 2, diverged_at - 1, diverged_at]
    # no checkpoint was written during the streak of skipped steps
    assert ckpt.read_trainer_state(ckpts[0])["global_step"] == diverged_at - 3
    strict_json((ckpts[0] / "trainer_state.json").read_text())
    assert not (save / "metrics.json").exists()


def test_a_skipped_step_changes_no_weight_and_training_goes_on(tmp_path, monkeypatch):
    run(compose_config([*TINY, "training.max_steps=2", f"logging.save_dir={tmp_path / 'two'}"]))
    nan_at(monkeypatch, {3})
    metrics = run(compose_config([*TINY, "training.max_steps=3", f"logging.save_dir={tmp_path / 'three'}"]))
    two = load_file(str(tmp_path / "two" / "step_0000002" / "model.safetensors"))
    three = load_file(str(tmp_path / "three" / "step_0000003" / "model.safetensors"))
    assert two.keys() == three.keys() and all(torch.equal(two[k], three[k]) for k in two)
    log = read_train_log(tmp_path / "three")
    assert log[-1]["step"] == 3 and log[-1]["skipped_steps"] == 1 and log[-1]["loss"] is None
    assert metrics["step"] == 3
    strict_json((tmp_path / "three" / "metrics.json").read_text())

    # one bad step in the middle: the run goes on and the steps after it update the weights
    monkeypatch.undo()
    nan_at(monkeypatch, {2})
    run(compose_config([*TINY, "training.max_steps=4", f"logging.save_dir={tmp_path / 'four'}"]))
    log = read_train_log(tmp_path / "four")
    assert [r.get("skipped_steps", 0) for r in log] == [0, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] != 2)


def test_max_bad_steps_must_be_a_count(tmp_path):
    with pytest.raises(ConfigError, match="training.max_bad_steps=-1"):
        Trainer(compose_config([*TINY, "training.max_bad_steps=-1", f"logging.save_dir={tmp_path}"]))


# ---------------------------------------------------------------------------------------- one writer

def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_owner(tmp_path):
    save = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rwkv_diffusion_rnn.training.run_lock import RunLock; "
         f"lock = RunLock({str(save)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as e:
            run(compose_config([*TINY, "training.max_steps=2", f"logging.save_dir={save}"]))
        assert f"pid {holder.pid}" in str(e.value) and "another training run" in str(e.value)
        assert not (save / "train_log.jsonl").exists() and not ckpt.list_checkpoints(save)
        r = cli([*TINY, "training.max_steps=2", f"logging.save_dir={save}"], tmp_path)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the next run takes the lock over with a message
    r = cli([*TINY, "training.max_steps=2", f"logging.save_dir={save}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taking over the lock" in r.stdout and f"pid {holder.pid}" in r.stdout
    assert (save / LOCK_FILE).read_text() == ""              # released clean at the end


def test_the_lock_is_exclusive_within_one_process_and_released_after_training(tmp_path):
    cfg = compose_config([*TINY, "training.max_steps=2", f"logging.save_dir={tmp_path}"])
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            run(cfg)
    run(cfg)
    with RunLock(tmp_path):    # free again after the run
        pass


def test_a_fresh_run_into_a_folder_holding_checkpoints_is_refused(tmp_path):
    run(compose_config([*TINY, "training.max_steps=2", f"logging.save_dir={tmp_path}"]))
    before = (tmp_path / "train_log.jsonl").read_text()
    with pytest.raises(ckpt.CheckpointError, match="training.resume=latest"):
        run(compose_config([*TINY, "training.max_steps=4", f"logging.save_dir={tmp_path}"]))
    assert (tmp_path / "train_log.jsonl").read_text() == before
    # resuming to train further is the way on; the last step's record is kept once
    run(compose_config([*TINY, "training.max_steps=4", "training.resume=latest", f"logging.save_dir={tmp_path}"]))
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2, 3, 4]


def test_a_log_without_checkpoints_is_moved_aside_not_appended_to(tmp_path):
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    run(compose_config([*TINY, "training.max_steps=2", f"logging.save_dir={tmp_path}"]))
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2]
    aside = [p for p in tmp_path.glob("train_log.*.jsonl")]
    assert len(aside) == 1 and aside[0].read_text() == '{"step": 1, "loss": 9.0}\n'


# ---------------------------------------------------------------------------------------- logs, keys, resume

def test_a_damaged_line_in_the_log_keeps_the_records_after_it_on_resume(tmp_path, capsys):
    common = [*TINY, "training.max_steps=8", f"logging.save_dir={tmp_path}"]
    run(compose_config([*common, "training.stop_at_step=6"]))
    log = tmp_path / "train_log.jsonl"
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:25] + "\x00garbage"
    log.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="line 3 is not JSON"):
        assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2, 4, 5, 6]
    run(compose_config([*common, "training.resume=latest"]))
    out = capsys.readouterr().out
    assert "line 3" in out and "train_log.bad.jsonl" in out
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2, 4, 5, 6, 7, 8]
    assert (tmp_path / "train_log.bad.jsonl").read_text() == lines[2] + "\n"


def test_a_key_that_nothing_reads_is_refused_with_the_close_match(tmp_path):
    r = cli([*TINY, "+training.max_step=3", f"logging.save_dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training.max_step is not a setting" in r.stderr and "did you mean training.max_steps?" in r.stderr
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_batch_size_names_the_setting(tmp_path):
    common = [*TINY, "training.max_steps=4", f"logging.save_dir={tmp_path}"]
    run(compose_config([*common, "training.stop_at_step=2"]))
    with pytest.raises(ckpt.CheckpointError, match="training.train_batch_size"):
        Trainer(compose_config([*common, "training.resume=latest", "training.train_batch_size=8"]))


def test_a_failing_final_evaluation_comes_after_the_last_checkpoint(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(Trainer, "evaluate", broken)
    save = tmp_path / "b"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(compose_config([*TINY, "training.max_steps=3", f"logging.save_dir={save}"]))
    assert ckpt.latest_checkpoint(save).name == "step_0000003"
    monkeypatch.undo()
    # resuming the finished run evaluates, writes the last record and metrics.json
    run(compose_config([*TINY, "training.max_steps=3", "training.resume=latest", f"logging.save_dir={save}"]))
    assert [r["step"] for r in read_train_log(save)] == [1, 2, 3]
    assert "struct_acc" in read_train_log(save)[-1]
    assert json.loads((save / "metrics.json").read_text())["step"] == 3


# ---------------------------------------------------------------------------------------- SIGKILL

def test_sigkills_at_random_moments_including_saves_still_resume_exactly(tmp_path):
    common = [*TINY, "training.max_steps=14", "logging.save_every=1", "logging.keep_last=2"]
    run(compose_config([*common, f"logging.save_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    # the same thread count as this process's runs: another one sums in another order
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    rand = random.Random(16)
    kills = 0
    for attempt in range(3):
        extra = ["training.resume=latest"] if ckpt.latest_checkpoint(part) else []
        proc = subprocess.Popen([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *common, *extra,
                                 f"logging.save_dir={part}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = ckpt.latest_checkpoint(part)
        deadline = time.time() + 240
        while time.time() < deadline and ckpt.latest_checkpoint(part) == start and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rand.uniform(0.0, 0.4))       # a step, a save or a prune in progress
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    run(compose_config([*common, "training.resume=latest", f"logging.save_dir={part}"]))
    full, resumed = read_train_log(tmp_path / "full"), read_train_log(part)
    assert [r["step"] for r in resumed] == list(range(1, 15))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    a = load_file(str(tmp_path / "full" / "step_0000014" / "model.safetensors"))
    b = load_file(str(part / "step_0000014" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_invalid_yaml_in_a_checkpoint_config_is_refused_by_name_on_resume(tmp_path):
    common = [*TINY, "training.max_steps=4", f"logging.save_dir={tmp_path}"]
    run(compose_config([*common, "training.stop_at_step=2"]))
    cfg_file = tmp_path / "step_0000002" / "config.yaml"
    cfg_file.write_text("model: [unclosed\n")
    with pytest.raises(ckpt.CheckpointError, match="config.yaml"):
        Trainer(compose_config([*common, "training.resume=latest"]))
