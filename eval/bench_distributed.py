"""One process against N processes (DDP and FSDP) on the same global batch: the logged losses, the
final bound and the wall time.

    python eval/bench_distributed.py                         # 2 gloo processes on the CPU
    python eval/bench_distributed.py --nproc 8 --device cuda --steps 200 --batch 64

Each run is ``experiment=shakespeare_char`` on ``../shared/data/tinyshakespeare.txt`` at a small
size (``--layers`` 2, width 128, ``--seq-len`` 128, ``--batch`` rows per step over all processes),
``--steps`` steps, evaluation at the end on ``eval.max_batches=8``: first in one process
(``training.parallel=none``), then under ``torchrun --standalone --nproc_per_node=N`` with
``training.parallel=ddp`` and ``fsdp``. Every run reads the same windows and draws the same noise,
so the per-step losses should agree up to float rounding: the table gives the largest relative
difference from the one-process log over all steps, the final ``val_nelbo`` and the wall time of
the whole command (start-up included). On a CPU the processes share the same cores, so the time
says nothing about scaling; it is there for GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def run(args, out: Path, parallel: str) -> dict:
    overrides = ["experiment=shakespeare_char", f"data.path={args.corpus}", f"data.cache_dir={out / 'cache'}",
                 f"data.seq_len={args.seq_len}", f"model.n_layer={args.layers}", "model.n_embd=128",
                 "model.head_size=32", f"training.train_batch_size={args.batch}", f"training.max_steps={args.steps}",
                 f"training.device={args.device}", f"training.parallel={parallel}", "logging.log_freq=1",
                 "logging.eval_freq=0", "eval.max_batches=8", "logging.progress_bar=false",
                 f"logging.save_dir={out / parallel}", f"hydra.run.dir={out / 'hydra'}"]
    prefix = [sys.executable]
    if parallel != "none":
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    done = subprocess.run([*prefix, "-m", "rwkv_diffusion_rnn.train_rwkv", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"training.parallel={parallel} failed:\n{done.stderr[-4000:]}")
    log = [json.loads(line) for line in (out / parallel / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / parallel / "metrics.json").read_text())
    return {"losses": [r["loss"] for r in log], "val_nelbo": metrics["val_nelbo"], "wall_s": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not Path(args.corpus).is_file():
        sys.exit(f"--corpus {args.corpus} does not exist (the public tinyshakespeare.txt is expected there)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: run(args, Path(tmp), mode) for mode in ("none", "ddp", "fsdp")}
    ref = rows["none"]["losses"]
    print(f"| run | processes | max rel. loss difference over {args.steps} steps | val_nelbo | wall s |")
    print("|---|---|---|---|---|")
    for mode, row in rows.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], ref))
        row["max_rel_diff"] = diff
        n = 1 if mode == "none" else args.nproc
        print(f"| {mode} | {n} | {diff:.1e} | {row['val_nelbo']:.4f} | {row['wall_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
