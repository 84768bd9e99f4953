"""Exact match on held-out instructions after instruction tuning, per task, for ``bi`` and
``block_causal``, with LLaDA's SFT objective and with the plain masked loss.

    python eval/sft_table.py --jobs 2                 # 4 runs of experiment=sft_tasks, then the table
    python eval/sft_table.py --steps 300 --out /tmp/sft_probe

The instruction files come from :mod:`rwkv_diffusion_rnn.data.instructions` (20,000 training
and 400 held-out conversations, seed 0; written into ``<out>/data`` when missing). Each run is
``experiment=sft_tasks`` (from scratch: 4 layers, width 128, batch 32, ``--steps`` steps) with
``model.mixer`` bi or block_causal, and ``text_noise.sft`` true (the prompt never masked, the
loss over each answer's length) or false (the plain masked loss over the whole conversation,
prompt included). Then every held-out instruction is answered from the run's final checkpoint
as ``generate conversation=<heldout.jsonl>`` does: argmax decoding (temperature 0) with
low-confidence remasking, one position per step, over the room ``data.seq_len`` leaves after
the prompt; block_causal decodes blocks of ``model.block_size`` left to right. An answer counts
when it equals the reference exactly (the text before the first end-of-text token).
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
RUNS = {"bi, SFT": ("bi", True), "bi, plain": ("bi", False),
        "block_causal, SFT": ("block_causal", True), "block_causal, plain": ("block_causal", False)}


def train(args, name: str, data: dict) -> Path:
    mixer, sft = RUNS[name]
    save = Path(args.out) / name.replace(", ", "_")
    if (save / "metrics.json").is_file():
        return save
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=sft_tasks",
           f"data.path={data['train']}", f"data.val_path={data['heldout']}", f"model.mixer={mixer}",
           f"text_noise.sft={str(sft).lower()}", f"training.max_steps={args.steps}", f"seed={args.seed}",
           "logging.progress_bar=false", f"logging.save_dir={save}", f"hydra.run.dir={save / 'hydra'}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return save


def score(save: Path, heldout: Path, block: bool) -> dict:
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.trained import load_trained
    trained = load_trained(save, device="cpu")
    options = dict(temperature=0.0, remasking="low_confidence", batch_size=50, print_texts=False, progress_bar=False)
    if block:
        options["block_length"] = int(trained.cfg.model.block_size)
    records = generate(trained=trained, conversation=str(heldout), **options)
    tasks = [json.loads(line)["task"] for line in heldout.read_text().splitlines() if line.strip()]
    per: dict = {}
    for task, rec in zip(tasks, records):
        hit = rec["text"] == rec["reference"]
        n, k = per.get(task, (0, 0))
        per[task] = (n + 1, k + hit)
    out = {task: k / n for task, (n, k) in per.items()}
    out["all"] = sum(k for _, k in per.values()) / sum(n for n, _ in per.values())
    out["val_nelbo"] = json.loads((save / "metrics.json").read_text())["val_nelbo"]
    out["examples"] = [{"reference": r["reference"], "answer": r["text"]} for r in records[:8]]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "eval" / "out" / "sft_tasks"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="training runs at once")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per training run")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    from rwkv_diffusion_rnn.data.instructions import TASKS, write_sets
    data_dir = Path(args.out) / "data"
    data = {k: data_dir / f"{k}.jsonl" for k in ("train", "heldout")}
    if not all(path.is_file() for path in data.values()):
        data = write_sets(data_dir)
    with ThreadPoolExecutor(args.jobs) as pool:
        saves = dict(zip(args.runs, pool.map(lambda name: train(args, name, data), args.runs)))
    rows = {name: score(save, data["heldout"], RUNS[name][0] == "block_causal") for name, save in saves.items()}
    print(f"| run | {' | '.join(TASKS)} | all | val_nelbo (answers) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r.get(t, 0):.3f}" for t in TASKS) + f" | {r['all']:.3f} | {r['val_nelbo']:.4f} |")
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
