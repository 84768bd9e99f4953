"""A two-machine launch rehearsed on one: two ``torchrun`` agents started separately
(``--nnodes=2 --nproc_per_node=1``, c10d rendezvous on 127.0.0.1, each its own ``--node_rank``)
train DDP and FSDP with the losses of one process, and a run whose second agent is killed
resumes exactly from its last checkpoint."""
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

import test_distributed
from test_distributed import ROOT, STEPS, close, common, losses

one_process = test_distributed.one_process      # the one-process reference run (a fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(tmp_path, args, **popen):
    """The two agents of one job, as two machines would start them (the command of the README)."""
    port, job = free_port(), uuid.uuid4().hex[:8]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={job}", f"--node_rank={node}",
               "-m", "rwkv_diffusion_rnn.train_rwkv", *args, f"hydra.run.dir={tmp_path / f'hydra{node}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen))
    return procs


def tree(pid: int) -> list:
    """``pid`` and every process below it (torchrun starts its workers in their own sessions)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def kill_tree(pid: int) -> None:
    for p in tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(procs, timeout=300):
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q.pid)
            raise
    return codes


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_agents_log_the_losses_of_one_process(tmp_path, one_process, parallel):
    reference, ref_metrics = one_process
    log = open(tmp_path / "agents.log", "w")
    codes = finish(two_agents(tmp_path, [*common(tmp_path, f"training.parallel={parallel}"),
                                         f"logging.save_dir={tmp_path / 'run'}"], stdout=log, stderr=log))
    assert codes == [0, 0], (tmp_path / "agents.log").read_text()[-3000:]
    assert close(losses(tmp_path / "run"), losses(reference), rel=1e-5)
    assert (tmp_path / "run" / f"step_{STEPS:07d}").is_dir()


def test_a_run_whose_second_agent_is_killed_resumes_exactly(tmp_path, one_process):
    reference, _ = one_process
    args = [*common(tmp_path, "training.parallel=ddp"), f"logging.save_dir={tmp_path / 'run'}"]
    procs = two_agents(tmp_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and procs[1].poll() is None and ckpt.latest_checkpoint(tmp_path / "run") is None:
        time.sleep(0.005)
    first = tree(procs[0].pid)
    kill_tree(procs[1].pid)                             # the second machine goes away: its agent and worker
    procs[1].wait()
    try:
        procs[0].wait(timeout=60)                       # the first agent's worker fails on its next collective
    except subprocess.TimeoutExpired:
        pass
    for pid in first:                                   # nothing of the job is left running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    procs[0].wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_0000010"], "ended before the kill"
    log = open(tmp_path / "agents.log", "w")
    codes = finish(two_agents(tmp_path, [*args, "training.resume=latest"], stdout=log, stderr=log))
    assert codes == [0, 0], (tmp_path / "agents.log").read_text()[-3000:]
    assert [r["step"] for r in read_train_log(tmp_path / "run")] == list(range(1, STEPS + 1))
    assert close(losses(tmp_path / "run"), losses(reference), rel=1e-5)
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
