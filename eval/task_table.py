"""The bidirectional-task table: every mixer on the synthetic tasks, several seeds.

    python eval/task_table.py --jobs 2                 # run what is missing, print the table
    python eval/task_table.py --report-only            # only aggregate finished runs

Each run is ``python -m rwkv_diffusion_rnn.train_rwkv experiment=<task> <mixer overrides>
seed=<s>`` with its own ``logging.save_dir`` under ``--out`` (default ``eval/out/tasks``); runs
whose ``metrics.json`` exists are skipped. Accuracy and exact match are read from the
evaluations in ``train_log.jsonl`` (fixed 200-example set, seed 1234). Prints markdown tables
(mean +- std over seeds) and writes ``eval/struct_acc_vs_steps.png`` (``--plot``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

ROOT = Path(__file__).resolve().parents[1]

MIXERS = {
    "causal": ["model.mixer=causal"],
    "dw_jrt": ["model.mixer=dw_jrt", "model.dw_jrt_scale=20"],
    "bi-sum": ["model.mixer=bi", "model.bi_fusion=sum"],
    "bi-concat": ["model.mixer=bi", "model.bi_fusion=concat"],
    "bi-gated": ["model.mixer=bi", "model.bi_fusion=gated"],
    "block_causal": ["model.mixer=block_causal", "model.block_size=16"],
}
TASKS = {"struct": 1000, "rightcopy": 200, "rightrev": 200, "index": 200, "add": 200}


def run_one(out: Path, task: str, mixer: str, seed: int, steps: int, extra) -> Path:
    d = out / f"{task}_{mixer}_s{seed}"
    if (d / "metrics.json").exists():
        return d
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", f"experiment={task}",
           *MIXERS[mixer], f"seed={seed}", f"training.max_steps={steps}",
           "logging.eval_freq=200" if steps > 200 else "logging.eval_freq=100",
           "logging.progress_bar=false", f"logging.save_dir={d}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "stdout.log", "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    print(f"done {d.name}", flush=True)
    return d


def evals(d: Path, task: str):
    """{step: (acc, exact)} from a run's log."""
    return {r["step"]: (r[f"{task}_acc"], r[f"{task}_exact"])
            for r in read_train_log(d) if f"{task}_acc" in r}


def fmt(xs):
    if not xs:
        return "-"
    m = statistics.mean(xs)
    if len(xs) == 1:
        return f"{m:.4f} (1 seed)"
    return f"{m:.4f} ± {statistics.stdev(xs):.4f} ({len(xs)} seeds)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "eval" / "out" / "tasks"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--plot", default=str(ROOT / "eval" / "struct_acc_vs_steps.png"),
                    help="where the struct accuracy plot goes")
    ap.add_argument("--overrides", nargs="*", default=[], dest="extra",
                    help="further Hydra overrides for every run, e.g. eval.fresh=false")
    args = ap.parse_args()
    out = Path(args.out)
    grid = [(t, m, s) for t in args.tasks for m in args.mixers for s in args.seeds]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as ex:
            list(ex.map(lambda g: run_one(out, g[0], g[1], g[2], TASKS[g[0]], args.extra), grid))

    print(f"seeds {args.seeds}; fixed evaluation set of 200 examples (seed 1234); "
          "token accuracy on the answer / exact match of the whole answer\n")
    for task in args.tasks:
        steps_shown = sorted({200, TASKS[task]})
        print(f"### {task}\n")
        print("| mixer | " + " | ".join(f"acc @{s} | exact @{s}" for s in steps_shown) + " |")
        print("|---|" + "---:|---:|" * len(steps_shown))
        for m in args.mixers:
            runs = [evals(out / f"{task}_{m}_s{s}", task) for s in args.seeds]
            cells = []
            for st in steps_shown:
                cells.append(fmt([r[st][0] for r in runs if st in r]))
                cells.append(fmt([r[st][1] for r in runs if st in r]))
            print(f"| {m} | " + " | ".join(cells) + " |")
        print()

    if "struct" in args.tasks:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[eval]'): no plot")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in args.mixers:
            runs = [evals(out / f"struct_{m}_s{s}", "struct") for s in args.seeds]
            steps = sorted(set.intersection(*(set(r) for r in runs))) if runs and all(runs) else []
            if not steps:
                continue
            means = [statistics.mean(r[st][0] for r in runs) for st in steps]
            ax.plot(steps, means, marker="o", label=m)
        ax.axhline(0.9244, ls="--", c="gray", lw=1, label="rwkvdllm DW-JRT (0.9244)")
        ax.axhline(0.5444, ls=":", c="gray", lw=1, label="rwkvdllm baseline (0.5444)")
        ax.set_xlabel("training step")
        ax.set_ylabel("struct token accuracy (fixed set)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
