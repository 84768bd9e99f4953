"""End-to-end training runs at tiny size: the loss falls, logs and metrics are written, resume is
exact, and the command line refuses bad overrides by name."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkv_diffusion_rnn.training.improved_trainer import read_train_log as read_log
from rwkv_diffusion_rnn.train_rwkv import compose_config as compose_cfg, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_embd=64", "training.train_batch_size=16",
        "data.eval_size=16", "eval.sample_steps=4", "logging.progress_bar=false"]


def test_struct_training_loss_falls_and_metrics_are_written(tmp_path):
    cfg = compose_cfg(["experiment=struct", *TINY, "training.max_steps=60", "logging.log_freq=10",
                       "logging.eval_freq=30", f"logging.save_dir={tmp_path}"])
    metrics = run(cfg)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    for r in log:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(r)
    assert "struct_acc" in log[2] and "struct_exact" in log[2]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics and 0.0 <= saved["struct_acc"] <= 1.0 and "struct_exact" in saved


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact_on_synthetic_data(tmp_path, optimizer):
    common = ["experiment=struct", *TINY, "training.max_steps=12", "logging.log_freq=2",
              "logging.eval_freq=0", "optimizer.warmup_steps=4", f"optimizer={optimizer}"]
    run(compose_cfg([*common, f"logging.save_dir={tmp_path / 'full'}"]))
    run(compose_cfg([*common, "training.stop_at_step=6", f"logging.save_dir={tmp_path / 'part'}"]))
    assert (tmp_path / "part" / "step_0000006").is_dir()
    run(compose_cfg([*common, "training.resume=latest", f"logging.save_dir={tmp_path / 'part'}"]))
    full, part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full] == list(range(2, 13, 2))
    assert [r["loss"] for r in part] == [r["loss"] for r in full]


def cli(args, hydra_dir, **kw):
    """Runs a command line; Hydra's own run folder goes to ``hydra_dir`` (a tmp path)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args, f"hydra.run.dir={hydra_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def hydra_outputs():
    """The files of Hydra's default run directories in the repository (runs/<date>/<time>)."""
    return {p for day in (ROOT / "runs").glob("????-??-??") for p in day.rglob("*")}


def test_cli_as_file_and_module_and_bad_override(tmp_path):
    before = hydra_outputs()
    r = cli(["rwkv_diffusion_rnn/train_rwkv.py", "--config-name", "rwkv_mmdit", "experiment=struct",
             *TINY, "training.max_steps=2", "logging.eval_freq=0", f"logging.save_dir={tmp_path / 'a'}"],
            tmp_path / "hydra_a")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "a" / "metrics.json").exists()
    assert (tmp_path / "hydra_a" / ".hydra" / "config.yaml").exists()
    r = cli(["-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=struct", "model.mixer=diagonal",
             f"logging.save_dir={tmp_path / 'b'}"], tmp_path / "hydra_b")
    assert r.returncode != 0
    assert "model.mixer='diagonal'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b" / "train_log.jsonl").exists()
    r = cli(["-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=struct", "training.lr=0.1"], tmp_path / "hydra_c")
    assert r.returncode != 0 and "training.lr" in r.stderr
    assert hydra_outputs() == before, "a command line run wrote Hydra's runs/<date>/<time> into the repository"


def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["experiment=struct", *TINY, "training.max_steps=16", "logging.log_freq=1",
              "logging.eval_freq=0", "logging.save_every=4", "optimizer.warmup_steps=4"]
    run(compose_cfg([*common, f"logging.save_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *common,
                             "training.max_steps=16", f"logging.save_dir={part}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (part / "step_0000008").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (part / "step_0000008").is_dir(), "no checkpoint appeared before the deadline"
    run(compose_cfg([*common, "training.resume=latest", f"logging.save_dir={part}"]))
    full, resumed = read_log(tmp_path / "full"), read_log(part)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


@pytest.mark.parametrize("mixer,backend", [("causal", "torch"), ("bi", "torch"), ("dw_jrt", "torch"),
                                           ("block_causal", "torch"), ("bi", "recurrent"),
                                           ("bi_wkv", "torch")])
def test_bf16_autocast_trains_five_steps_on_cpu(tmp_path, mixer, backend):
    common = ["experiment=struct", *TINY, f"model.mixer={mixer}", f"model.wkv_backend={backend}",
              "training.train_batch_size=4", "training.max_steps=5", "logging.log_freq=1",
              "logging.eval_freq=0", "eval.sample_steps=2", "data.eval_size=4", "training.device=cpu"]
    run(compose_cfg([*common, "training.dtype=bf16", f"logging.save_dir={tmp_path / 'bf16'}"]))
    run(compose_cfg([*common, "training.dtype=fp32", f"logging.save_dir={tmp_path / 'fp32'}"]))
    bf16, fp32 = read_log(tmp_path / "bf16"), read_log(tmp_path / "fp32")
    assert [r["step"] for r in bf16] == [1, 2, 3, 4, 5]
    losses = [r["loss"] for r in bf16]
    assert all(l == l and l < 100 for l in losses), losses             # finite
    assert losses != [r["loss"] for r in fp32]                          # autocast was on
    assert abs(losses[0] - fp32[0]["loss"]) < 0.05 * fp32[0]["loss"]    # and computes the same loss
