"""Where two demo training runs part: per-step losses of the demo recipe under different settings.

    python eval/demo_trajectories.py --steps 100 --variants "torch:1" "torch:2" "recurrent:1"
    python eval/demo_trajectories.py --repo /path/to/other/checkout --variants "torch:1"
    python eval/demo_trajectories.py --overrides optimizer=adamw     # Hydra overrides for every run

Each variant ``BACKEND:THREADS`` trains ``experiment=demo`` (its data prepared as the demo does)
for ``--steps`` steps with ``OMP_NUM_THREADS=THREADS`` and ``model.wkv_backend=BACKEND``, logging
every step; the learning-rate schedule is the full run's (``training.stop_at_step``). The first
variant is the reference: the table gives, per variant, the relative loss difference at step 1,
the first step where it exceeds 1e-4, and the largest difference. A checkout given with
``--repo`` runs its own code on the same data (another commit: same data order and streams?).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv_diffusion_rnn.demo import prepare_data  # noqa: E402


def run_variant(repo: Path, data_overrides, out: Path, backend: str, threads: str, steps: int,
                overrides=()) -> list:
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=demo", *data_overrides,
           f"model.wkv_backend={backend}", f"training.stop_at_step={steps}", "logging.log_freq=1",
           "logging.eval_freq=0", "logging.progress_bar=false", f"logging.save_dir={out}",
           f"hydra.run.dir={out / 'hydra'}", *overrides]
    subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["torch:1", "torch:2", "recurrent:1"])
    p.add_argument("--repo", action="append", default=[], help="another checkout, run as torch:1")
    p.add_argument("--data_dir", default=str(REPO / "preprocessed_data" / "demo"))
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every run")
    args = p.parse_args()
    data = prepare_data(Path(args.data_dir), show_progress=False).overrides()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            backend, threads = v.split(":")
            runs[v] = run_variant(REPO, data, Path(tmp) / v.replace(":", "_"), backend,
                                  threads, args.steps, args.overrides)
        for i, r in enumerate(args.repo):
            runs[f"{r} torch:1"] = run_variant(Path(r), data, Path(tmp) / f"repo{i}",
                                               "torch", "1", args.steps, args.overrides)
    ref_name, ref = next(iter(runs.items()))
    print(f"| variant (reference: {ref_name}) | rel. diff at step 1 | first step > 1e-4 | largest rel. diff |")
    print("|---|---:|---:|---:|")
    for name, losses in runs.items():
        rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref)]
        first = next((i + 1 for i, d in enumerate(rel) if d > 1e-4), None)
        print(f"| {name} | {rel[0]:.1e} | {first or '-'} | {max(rel):.1e} |")


if __name__ == "__main__":
    main()
