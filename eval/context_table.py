"""What context beyond one window is worth: models trained on independent windows against
models trained on the corpus as streams with the state carried between steps, each scored with
windows of 64, 256 and 1024 characters and as one stream.

    python eval/context_table.py --jobs 2              # 4 runs (2000 steps each), then the table
    python eval/context_table.py --report-only         # the table from what is there

Runs: ``experiment=shakespeare_char`` (tinyshakespeare characters, 4 layers, width 128, windows
of 64, batch 12, 2000 steps) for the AR model (``training.objective=ar model.mixer=causal``) and
``block_causal`` (blocks of 16, clean context), each with ``data.order=shuffled`` (independent
windows, today's training) and ``data.order=stream`` (each row of a batch continues the row
before it: 12 streams through the training split, the state carried from step to step, so every
window of 64 is trained after all the text before it in its stream). Scoring: ``evaluate`` on
the whole validation split with ``data.seq_len`` 64, 256, 1024 (independent windows, each read
from an empty state) and ``eval.context=stream`` (the split read once, left to right, in chunks
of 64 with the state carried). Values are nats per character (nats per token of the character
tokenizer): the exact NLL for AR, the bound
(one draw per window or chunk) for block_causal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RUNS = {
    "ar, windows": ["training.objective=ar", "model.mixer=causal"],
    "ar, stream": ["training.objective=ar", "model.mixer=causal", "data.order=stream"],
    "block_causal, windows": ["model.mixer=block_causal", "model.block_size=16", "model.block_context=clean"],
    "block_causal, stream": ["model.mixer=block_causal", "model.block_size=16", "model.block_context=clean",
                             "data.order=stream"],
}
SCORES = {"64": ["data.seq_len=64"], "256": ["data.seq_len=256"], "1024": ["data.seq_len=1024"],
          "stream": ["data.seq_len=64", "eval.context=stream"]}


def run_dir(out: Path, name: str) -> Path:
    return out / name.replace(", ", "_")


def train(args, name: str) -> Path:
    d = run_dir(Path(args.out), name)
    if (d / "metrics.json").is_file():
        return d
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=shakespeare_char",
           f"data.path={CORPUS}", f"training.max_steps={args.steps}", *RUNS[name], "logging.progress_bar=false",
           f"logging.save_dir={d}", f"hydra.run.dir={d}/hydra"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return d


def score(args, d: Path, key: str) -> dict:
    out = d / f"eval_{key}.json"
    if not out.is_file():
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"checkpoint={d}", *SCORES[key],
               "eval.max_batches=null", "logging.progress_bar=false", f"out={out}"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{d} {key} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "eval" / "out" / "context"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            dirs = list(pool.map(lambda name: train(args, name), args.runs))
        work = [(d, key) for d in dirs for key in SCORES]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda dk: score(args, *dk), work))
    print("| model | trained on | " + " | ".join(f"context {k}" for k in SCORES) + " | stream vs 64 |")
    print("|---|---|" + "---|" * (len(SCORES) + 1))
    for name in args.runs:
        d = run_dir(out, name)
        vals = {}
        for key in SCORES:
            f = d / f"eval_{key}.json"
            vals[key] = json.loads(f.read_text())["nats_per_token"] if f.is_file() else None
        cells = [f"{v:.4f}" if v is not None else "-" for v in vals.values()]
        gain = (f"{vals['64'] - vals['stream']:+.4f}" if vals["64"] is not None and vals["stream"] is not None
                else "-")
        model, trained = name.split(", ")
        print(f"| {model} | {trained} | " + " | ".join(cells) + f" | {gain} |")


if __name__ == "__main__":
    main()
