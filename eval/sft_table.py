"""Exact match on held-out instructions after instruction tuning, per task, for ``bi`` and
``block_causal``, with LLaDA's SFT objective and with the plain masked loss; Qwen3's block
attention with each prompt visible to every block against the prompt hidden; prompt guidance.

    python eval/sft_table.py --jobs 2                 # 4 runs of experiment=sft_tasks, then the table
    python eval/sft_table.py --steps 300 --out /tmp/sft_probe
    python eval/sft_table.py --runs "qwen3 blocks, SFT" "qwen3 blocks, SFT, prompt hidden" --jobs 2
    python eval/sft_table.py --runs "bi, SFT" "block_causal, SFT" --cfg-scales 0 0.5 1 2

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

The qwen3 rows train Qwen3's architecture from random weights (lm_table.py's QWEN3_INIT: 4 layers,
width 128) with ``model.block_attention=true`` and blocks of ``model.block_size``: every answer
block sees its prompt and itself. "prompt hidden" is the same run with the prompt lengths kept
from the model (``Qwen3Mixer.reads_prompt`` off in the training and the scoring process), so a
block sees only itself: what block attention did before it was given the prompt.
``--cfg-scales`` answers at each ``prompt_cfg_scale`` (LLaDA's guidance on the prompt).
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
# name: (model overrides, SFT objective, prompt hidden from block attention)
RUNS = {"bi, SFT": (["model.mixer=bi"], True, False), "bi, plain": (["model.mixer=bi"], False, False),
        "block_causal, SFT": (["model.mixer=block_causal"], True, False),
        "block_causal, plain": (["model.mixer=block_causal"], False, False),
        "qwen3 blocks, SFT": (["model.arch=qwen3", "model.block_attention=true", "model.qwen3_name={qwen3}"], True, False),
        "qwen3 blocks, SFT, prompt hidden": (["model.arch=qwen3", "model.block_attention=true",
                                              "model.qwen3_name={qwen3}"], True, True)}
HIDE_PROMPT = "from rwkv_diffusion_rnn.models.qwen3 import Qwen3Mixer; Qwen3Mixer.reads_prompt = False"


def hide_prompt() -> None:
    from rwkv_diffusion_rnn.models.qwen3 import Qwen3Mixer
    Qwen3Mixer.reads_prompt = False


def train(args, name: str, data: dict) -> Path:
    model, sft, hidden = RUNS[name]
    save = run_dir(args, name)
    if (save / "metrics.json").is_file():
        return save
    qwen3 = qwen3_init(Path(args.out)) if any("{qwen3}" in a for a in model) else None
    model = [a.format(qwen3=qwen3) for a in model]
    # prompt hidden: the training process runs with the mixer's trait off, then train_rwkv's main
    start = ["-c", f"{HIDE_PROMPT}; import sys; sys.argv[0] = 'train_rwkv'; "
                   "from rwkv_diffusion_rnn.train_rwkv import main; main()"] if hidden else \
        ["-m", "rwkv_diffusion_rnn.train_rwkv"]
    cmd = [sys.executable, *start, "experiment=sft_tasks",
           f"data.path={data['train']}", f"data.val_path={data['heldout']}", *model,
           f"text_noise.sft={str(sft).lower()}", f"training.max_steps={args.steps}", f"seed={args.seed}",
           "logging.progress_bar=false", f"logging.save_dir={save}", f"hydra.run.dir={save / 'hydra'}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return save


def run_dir(args, name: str) -> Path:
    return Path(args.out) / name.replace(", ", "_").replace(" ", "_")


def qwen3_init(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from lm_table import qwen3_init as make
    return make(out)


def score(save: Path, heldout: Path, cfg_scale: float = 0.0) -> dict:
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.trained import load_trained
    trained = load_trained(save, device="cpu")
    options = dict(temperature=0.0, remasking="low_confidence", batch_size=50, print_texts=False,
                   progress_bar=False, prompt_cfg_scale=cfg_scale)
    if trained.cfg.model.mixer == "block_causal" or trained.cfg.model.get("block_attention"):
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
    p.add_argument("--runs", nargs="*", default=list(RUNS)[:4], choices=list(RUNS))
    p.add_argument("--cfg-scales", nargs="*", type=float, default=[0.0],
                   help="prompt_cfg_scale values to answer at (a row per run and value)")
    args = p.parse_args(argv)
    from rwkv_diffusion_rnn.data.instructions import TASKS, write_sets
    data_dir = Path(args.out) / "data"
    data = {k: data_dir / f"{k}.jsonl" for k in ("train", "heldout")}
    if not all(path.is_file() for path in data.values()):
        data = write_sets(data_dir)
    if any("{qwen3}" in a for name in args.runs for a in RUNS[name][0]):
        qwen3_init(Path(args.out))          # once, before the threads (transformers' imports are not thread-safe)
    with ThreadPoolExecutor(args.jobs) as pool:
        saves = dict(zip(args.runs, pool.map(lambda name: train(args, name, data), args.runs)))
    rows = {}
    for name, save in sorted(saves.items(), key=lambda run: RUNS[run[0]][2]):   # hidden ones last
        if RUNS[name][2]:
            hide_prompt()         # the rest of this process scores prompt-hidden runs only
        for w in args.cfg_scales:
            rows[name if w == 0 else f"{name}, prompt_cfg_scale {w:g}"] = score(save, data["heldout"], w)
    print(f"| run | {' | '.join(TASKS)} | all | val_nelbo (answers) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r.get(t, 0):.3f}" for t in TASKS) + f" | {r['all']:.3f} | {r['val_nelbo']:.4f} |")
    out = Path(args.out) / "table.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**old, **rows}, indent=2))


if __name__ == "__main__":
    main()
