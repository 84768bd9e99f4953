"""From a pretrained RWKV-7 to a diffusion LM: what the backbone buys, measured on tinyshakespeare.

    python eval/adapt_table.py --jobs 2                  # run what is missing, then the table
    python eval/adapt_table.py --report-only

The pretrained stand-in (no rwkv7-g1 file can be downloaded here): an AR RWKV-7 at the
shakespeare preset's size (4 layers, width 128) trained by the project's AR objective on
``../shared/data/shakespeare_other_plays.txt`` (33 other Shakespeare texts, no overlap with
tinyshakespeare) with ``tokenizer.name=bytes`` (which covers both corpora), ``--pretrain_steps``
steps, then exported with ``python -m rwkv_diffusion_rnn.export format=blinkdl`` and given to the
runs below as ``model.rwkv_name=<file>.pth``: the code path rwkv7-g1 takes.

Rows, each ``experiment=shakespeare_char tokenizer.name=bytes`` for ``--steps`` steps (nats per
byte = per character: tinyshakespeare is ASCII), one thread per run, ``--jobs`` at a time:

    ar_zero_shot    the pretrained AR model on tinyshakespeare's validation split, untrained there
    ar_ft           the AR model fine-tuned from it (the reference of every ratio)
    diff_scratch    diffusion (bi, gated fusion: the preset) from scratch
    diff_adapt      diffusion from the backbone, its own head (model.use_rwkv_lm_head=true)
    diff_anneal     the same with model.bi_anneal_steps (the right-to-left reading phased in)
    diff_frozen     the same with the backbone frozen for the first epoch, then unfrozen

Retention: each checkpoint's bound (diffusion) or NLL (AR) on the held-out last 10% of the
pretraining corpus (``evaluate data.path=<pretraining corpus>``, its first 20 validation batches:
163,840 bytes), against the pretrained model's NLL there. tinyshakespeare's validation split is
scored whole. Writes ``<out>/adapt_table.md`` (default ``--out eval/out/adapt``).
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
TINY = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OTHER = ROOT.parent / "shared" / "data" / "shakespeare_other_plays.txt"
BASE = ["experiment=shakespeare_char", "tokenizer.name=bytes"]
# validation batches (of 128 windows of 64 bytes) of the pretraining corpus's held-out 10% scored for
# retention: the first 20 (163,840 bytes of its 380k), the same for every row
RETENTION_BATCHES = 20


def runs(pth: Path, anneal: int) -> dict:
    backbone = [f"model.rwkv_name={pth}", "model.use_rwkv_lm_head=true"]
    return {
        "ar_ft": ["training.objective=ar", "model.mixer=causal", *backbone],
        "diff_scratch": [],
        "diff_adapt": backbone,
        "diff_anneal": [*backbone, f"model.bi_anneal_steps={anneal}"],
        "diff_frozen": [*backbone, "model.freeze_backbone=true", "training.unfreeze_backbone_at_epoch=1"],
    }


def sh(cmd, log: Path, threads: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def train(name: str, overrides, out: Path, steps: int, threads: int) -> None:
    save = out / name
    if (save / "metrics.json").is_file():
        return
    resume = ["training.resume=latest"] if any(save.glob("step_*")) else []
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *BASE, *overrides, f"data.path={TINY}",
           f"data.cache_dir={out / 'cache'}", f"training.max_steps={steps}", f"logging.save_dir={save}",
           f"hydra.run.dir={save / 'hydra'}", "logging.progress_bar=false", *resume]
    save.mkdir(parents=True, exist_ok=True)
    if sh(cmd, save / "stdout.log", threads) != 0:
        raise SystemExit(f"{name} failed: see {save / 'stdout.log'}")


def evaluate(checkpoint: Path, corpus: Path, out_file: Path, cache: Path, threads: int, max_batches) -> dict:
    if not out_file.is_file():
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"checkpoint={checkpoint}", f"data.path={corpus}",
               f"data.cache_dir={cache}", "data.val_path=null", f"eval.max_batches={max_batches}", f"out={out_file}",
               "logging.progress_bar=false"]
        if sh(cmd, out_file.with_suffix(".log"), threads) != 0:
            raise SystemExit(f"evaluate {checkpoint} on {corpus.name} failed: see {out_file.with_suffix('.log')}")
    return json.loads(out_file.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pretrain_steps", type=int, default=6000)
    p.add_argument("--anneal_steps", type=int, default=500)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "adapt")
    p.add_argument("--runs", nargs="+", default=None, help="the rows to train (default: all)")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, 2 // a.jobs)
    pretrain, pth = out / "pretrain", out / "pretrained.pth"
    table = {k: v for k, v in runs(pth, a.anneal_steps).items() if a.runs is None or k in a.runs}
    if not a.report_only:
        if not (pretrain / "metrics.json").is_file():
            cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *BASE, "training.objective=ar",
                   "model.mixer=causal", f"data.path={OTHER}", f"data.cache_dir={out / 'cache'}",
                   f"training.max_steps={a.pretrain_steps}", "logging.eval_freq=1000", "eval.max_batches=50",
                   f"logging.save_dir={pretrain}", f"hydra.run.dir={pretrain / 'hydra'}", "logging.progress_bar=false"]
            pretrain.mkdir(parents=True, exist_ok=True)
            if sh(cmd, out / "pretrain.log", 2) != 0:
                raise SystemExit(f"pretraining failed: see {out / 'pretrain.log'}")
        if not pth.is_file():
            if sh([sys.executable, "-m", "rwkv_diffusion_rnn.export", f"checkpoint={pretrain}", "format=blinkdl",
                   f"out={pth}"], out / "export.log", 2) != 0:
                raise SystemExit(f"export failed: see {out / 'export.log'}")
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda kv: train(kv[0], kv[1], out, a.steps, threads), table.items()))
    rows = [("ar_zero_shot", pretrain)] + [(name, out / name) for name in table]
    results = {}
    for name, ckpt in rows:
        if not (ckpt / "metrics.json").is_file():
            continue
        tiny = evaluate(ckpt, TINY, out / f"{name}.tiny.eval.json", out / "cache", 2, "null")
        other = evaluate(ckpt, OTHER, out / f"{name}.other.eval.json", out / "cache", 2, RETENTION_BATCHES)
        results[name] = (tiny, other)
    ref = results.get("ar_ft", (None,))[0]
    pre_other = results.get("ar_zero_shot", (None, None))[1]
    lines = ["| run | tinyshakespeare nats/char | s.e. | ratio to ar_ft | pretraining corpus (held out) nats/char | "
             "retention (pretrained / this) |", "|---|---:|---:|---:|---:|---:|"]
    for name, (tiny, other) in results.items():
        ratio = f"{tiny['nats_per_token'] / ref['nats_per_token']:.3f}" if ref else "-"
        keep = f"{pre_other['nats_per_token'] / other['nats_per_token']:.3f}" if pre_other else "-"
        lines.append(f"| {name} | {tiny['nats_per_token']:.4f} | {tiny.get('stderr', 0):.4f} | {ratio} | "
                     f"{other['nats_per_token']:.4f} | {keep} |")
    text = "\n".join(lines) + "\n"
    (out / "adapt_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
