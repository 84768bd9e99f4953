"""Throughput of the two data-preparation CLIs on generated text.

    python eval/bench_cli.py [--lines 10000] [--device cpu] [--batch_size 64]

Generates ``--lines`` English-like lines (fixed seed), then times, each as a fresh process as a user
runs it:

* ``python -m rwkv_diffusion_rnn.prepare_latents`` with the packaged all-MiniLM-L6-v2 model
  (embedding, PCA to 32 dims, writing one .npy per line);
* ``python -m rwkv_diffusion_rnn.preprocess_tokenize_text`` with the RWKV World tokenizer
  (BlinkDL/rwkv7-g1), max_length 512, on a data list of all lines; then the same again, when
  every file already exists and is skipped.

Each CLI also runs on 10 lines; the difference gives the throughput without process start-up and
model loading ("steady"). Prints a Markdown table. Everything is written to a temporary directory
that is removed afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more "
    "river mountain city light music history science language window garden morning winter market "
    "quickly slowly quietly brightly carefully suddenly strange ancient modern simple golden broken"
).split()


def generate_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, size=n)
    lines = []
    for length in lengths:
        words = rng.choice(WORDS, size=length)
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args = p.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    py = sys.executable
    rows = []
    try:
        lines = generate_lines(args.lines, args.seed)
        (tmp / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "small.txt").write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
        data = [{"id": f"{i:08d}", "text": t} for i, t in enumerate(lines)]
        (tmp / "all_data.json").write_text(json.dumps(data), encoding="utf-8")
        (tmp / "small_data.json").write_text(json.dumps(data[:10]), encoding="utf-8")

        def prep(inp, name, dim):
            return [py, "-m", "rwkv_diffusion_rnn.prepare_latents", "--input", str(inp), "--name", name,
                    "--output_root", str(tmp / "pd"), "--device", args.device, "--batch_size",
                    str(args.batch_size), "--latent_dim", str(dim)]

        def tok(js, out):
            return [py, "-m", "rwkv_diffusion_rnn.preprocess_tokenize_text", "--json_path", str(js),
                    "--output_dir", str(tmp / out), "--tokenizer", "BlinkDL/rwkv7-g1", "--max_length", "512"]

        n = len(lines)
        t_small = run(prep(tmp / "small.txt", "small", 4), env)
        t_full = run(prep(tmp / "lines.txt", "full", 32), env)
        rows.append(("prepare_latents (MiniLM-L6, 384->32)", n, t_full, (n - 10) / max(t_full - t_small, 1e-9)))
        t_small = run(tok(tmp / "small_data.json", "tok_small"), env)
        t_full = run(tok(tmp / "all_data.json", "tok"), env)
        rows.append(("preprocess_tokenize_text (RWKV World, 512)", n, t_full, (n - 10) / max(t_full - t_small, 1e-9)))
        t_skip = run(tok(tmp / "all_data.json", "tok"), env)
        rows.append(("preprocess_tokenize_text, re-run (all skipped)", n, t_skip, float("nan")))
        n_tokens = 0
        for f in (tmp / "tok" / "all").glob("*.npz"):
            with np.load(f) as z:
                n_tokens += int(z["attention_mask"].sum())
    finally:
        if args.keep:
            print(f"outputs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    import torch

    from rwkv_diffusion_rnn.data.tokenizer import load_tokenizer

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}, "
          f"batch_size {args.batch_size}; tokenizer backend {load_tokenizer().backend}; "
          f"{n} lines, {n_tokens} RWKV tokens\n")
    print("| CLI | lines | wall s (fresh process) | lines/s end-to-end | lines/s steady |")
    print("|---|---:|---:|---:|---:|")
    for name, n_lines, t, steady in rows:
        steady_s = "-" if steady != steady else f"{steady:,.0f}"
        print(f"| {name} | {n_lines:,} | {t:.2f} | {n_lines / t:,.0f} | {steady_s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
