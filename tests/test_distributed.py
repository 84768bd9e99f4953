"""Training on 2 processes (torchrun, gloo on the CPU), DDP and FSDP2: the same losses as one process
with the same global batch, exact resume after a kill, sharded checkpoints that evaluate and
generate in one process, and clear errors for launches that cannot work."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.evaluate import evaluate
from rwkv_diffusion_rnn.generate import generate
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.distributed import Dist
from rwkv_diffusion_rnn.training.improved_trainer import Trainer, read_train_log

from test_lm import corpus_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def common(tmp_path, *extra):
    # eval_batch_size=14 over 29 validation windows: the last batch has 1 row, fewer than the ranks
    return ["experiment=shakespeare_char", f"data.path={corpus_file(tmp_path)}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=14", f"training.max_steps={STEPS}",
            "optimizer.warmup_steps=2", "logging.eval_freq=10", "logging.log_freq=1", "logging.save_every=10",
            "logging.progress_bar=false", "eval.max_batches=null", *extra]


def torchrun(tmp_path, args, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rwkv_diffusion_rnn.train_rwkv", *args, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(save_dir):
    return [r["loss"] for r in read_train_log(save_dir)]


def close(a, b, rel=1e-5):
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    metrics = run(compose_config([*common(tmp), f"logging.save_dir={tmp / 'run'}"]))
    return tmp / "run", metrics


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_log_the_losses_of_one_and_resume_exactly_after_a_kill(tmp_path, one_process, parallel):
    reference, ref_metrics = one_process
    args = common(tmp_path, f"training.parallel={parallel}")
    full = torchrun(tmp_path, [*args, f"logging.save_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    assert close(losses(tmp_path / "full"), losses(reference))
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert math.isclose(metrics["val_nelbo"], ref_metrics["val_nelbo"], rel_tol=1e-5)   # evaluation reduced
    assert full.stdout.count("final metrics") == 1                                      # rank 0 alone prints
    assert (tmp_path / "full" / "step_0000020" / ckpt.SHARDED_DIR).is_dir() == (parallel == "fsdp")

    # killed (SIGKILL to every process) right after the step-10 checkpoint, then resumed
    part = tmp_path / "part"
    proc = torchrun(tmp_path, [*args, f"logging.save_dir={part}"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and ckpt.latest_checkpoint(part) is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step_0000010"], "the run ended before the kill"
    resumed = torchrun(tmp_path, [*args, f"logging.save_dir={part}", "training.resume=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_train_log(part)] == list(range(1, STEPS + 1))
    assert losses(part) == losses(tmp_path / "full")


def two_process_checkpoint(tmp_path, parallel):
    save = tmp_path / parallel
    done = torchrun(tmp_path, [*common(tmp_path, f"training.parallel={parallel}", "training.max_steps=10",
                                       "training.ema_decay=0.9"), f"logging.save_dir={save}"])
    assert done.returncode == 0, done.stderr[:6000]
    return save


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_evaluates_generates_and_trains_on_in_one_process(tmp_path, parallel):
    save = two_process_checkpoint(tmp_path, parallel)
    logged = json.loads((save / "metrics.json").read_text())["val_nelbo"]
    scored = evaluate(save, overrides=["eval.max_batches=null"])
    assert math.isclose(scored["nats_per_token"], logged, rel_tol=1e-5)
    records = generate(save, num_samples=2, steps=4, length=16, eos=False)
    assert len(records) == 2 and all(len(r["token_ids"]) == 16 for r in records)

    # one process may not resume it as if exact, but may continue it when told
    args = [*common(tmp_path, "training.max_steps=12"), f"logging.save_dir={save}", "training.resume=latest",
            "training.ema_decay=0.9"]
    with pytest.raises(ckpt.CheckpointError, match="2 processes.*resume_any_world_size"):
        Trainer(compose_config(args))
    trainer = Trainer(compose_config([*args, "training.resume_any_world_size=true"]))
    assert trainer.global_step == 10 and trainer.optimizer.state       # weights and optimizer moments loaded
    metrics = trainer.train()
    assert metrics["step"] == 12 and math.isfinite(metrics["val_nelbo"])


def test_bad_launches_are_refused_by_key(tmp_path):
    with pytest.raises(ConfigError, match="training.parallel=fsdp needs several processes started by torchrun"):
        Trainer(compose_config([*common(tmp_path, "training.parallel=fsdp"), f"logging.save_dir={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match="training.parallel"):
        Trainer(compose_config([*common(tmp_path, "training.parallel=zero3"), f"logging.save_dir={tmp_path / 'b'}"]))
    odd = torchrun(tmp_path, [*common(tmp_path, "training.train_batch_size=3"), f"logging.save_dir={tmp_path / 'c'}"])
    assert odd.returncode != 0
    assert odd.stderr.count("training.train_batch_size=3 is the batch of one step over all 2 processes") == 1
    # the ranks end with the message (torchrun then reports their exit code, with its own traceback)
    assert "Error executing job" not in odd.stderr and "[rank" not in odd.stderr


def test_rows_split_every_batch_into_equal_contiguous_shares_and_never_leave_a_rank_idle():
    shares = [Dist("ddp", r, 4).rows(8) for r in range(4)]
    assert shares == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ConfigError, match="multiple of 4"):
        Dist("ddp", 0, 4).rows(6)
    covered = []
    for n in (1, 3, 5, 9):
        parts = [Dist("fsdp", r, 4).eval_rows(n) for r in range(4)]
        counted = [list(range(n))[s] for s, c in parts if c]
        assert sorted(sum(counted, [])) == list(range(n))          # every row counted exactly once
        assert all(s.stop > s.start for s, _ in parts)             # every rank runs a forward
        covered.append(sum(c for _, c in parts))
    assert covered == [1, 3, 4, 4]


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights_and_optimizer_state(tmp_path):
    """One process (autocast) and FSDP (its mixed-precision policy): the weights and Adam moments
    that are trained and saved stay float32."""
    args = [*common(tmp_path, "training.dtype=bf16", "training.max_steps=4", "logging.eval_freq=0")]
    trainer = Trainer(compose_config([*args, f"logging.save_dir={tmp_path / 'one'}"]))
    trainer.train()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    moments = [v for state in trainer.optimizer.state.values() for k, v in state.items() if k.startswith("exp_avg")]
    assert moments and {m.dtype for m in moments} == {torch.float32}

    done = torchrun(tmp_path, [*args, "training.parallel=fsdp", f"logging.save_dir={tmp_path / 'fsdp'}"])
    assert done.returncode == 0, done.stderr[:6000]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert all(math.isfinite(x) for x in two) and close(one, two, rel=0.05)
    import torch.distributed.checkpoint as dcp
    stored = dcp.FileSystemReader(str(tmp_path / "fsdp" / "step_0000004" / ckpt.SHARDED_DIR)).read_metadata()
    dtypes = {k.split(".")[0] + (".exp_avg" if "exp_avg" in k else ""): m.properties.dtype
              for k, m in stored.state_dict_metadata.items()
              if hasattr(m, "properties") and (k.startswith("model.") or "exp_avg" in k)}
    assert dtypes == {"model": torch.float32, "optimizer.exp_avg": torch.float32}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_chunked_training_on_two_processes_logs_the_losses_of_one(tmp_path, parallel):
    """model.chunk_size under DDP / FSDP: several model calls before one backward, each chunk
    recomputed in it; the two ranks' steps are the one process's."""
    chunked = ["model.mixer=block_causal", "model.block_size=4", "model.chunk_size=8", "training.max_steps=4",
               "logging.eval_freq=4", "logging.save_every=4"]
    one = run(compose_config([*common(tmp_path, *chunked), f"logging.save_dir={tmp_path / 'one'}"]))
    assert one["val_nelbo"] > 0
    done = torchrun(tmp_path, [*common(tmp_path, *chunked, f"training.parallel={parallel}"),
                               f"logging.save_dir={tmp_path / 'two'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert close(losses(tmp_path / "two"), losses(tmp_path / "one"))
