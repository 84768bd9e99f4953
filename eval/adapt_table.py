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


LADDER = (1, 2, 4, 8, 16, 32, 64)


def runs(pth: Path, anneal: int, steps: int, pretrain_steps: int) -> dict:
    """name -> (overrides, training steps)."""
    backbone = [f"model.rwkv_name={pth}", "model.use_rwkv_lm_head=true"]
    shift, annealed = "model.shift_logits=true", f"model.bi_anneal_steps={anneal}"
    table = {
        "ar_ft": ["training.objective=ar", "model.mixer=causal", *backbone],
        "diff_scratch": [],
        "diff_adapt": backbone,
        "diff_anneal": [*backbone, annealed],
        "diff_frozen": [*backbone, "model.freeze_backbone=true", "training.unfreeze_backbone_at_epoch=1"],
        "diff_shift": [*backbone, shift],
        "diff_shift_anneal": [*backbone, shift, annealed],
        **{f"block_{n}": [*backbone, "model.mixer=block_causal", f"model.block_size={n}", shift, annealed]
           for n in LADDER},
    }
    table = {k: (v, steps) for k, v in table.items()}
    table["diff_scratch_long"] = ([], steps + pretrain_steps)      # equal total steps
    return table


# The data-constrained regime: the first eighth of tinyshakespeare's training split, repeated for
# about 24 epochs (4000 steps of 12 x 64 bytes over 125,478 bytes), validated on the usual split.
CONSTRAINED_FRACTION = 8
CONSTRAINED_STEPS = 4000
CONSTRAINED_EVAL_FREQ = 250


def constrained_runs(pth: Path) -> dict:
    backbone = [f"model.rwkv_name={pth}", "model.use_rwkv_lm_head=true"]
    ar = ["training.objective=ar", "model.mixer=causal"]
    return {"dc_ar_scratch": ar, "dc_ar_adapt": [*ar, *backbone], "dc_diff_scratch": [], "dc_diff_adapt": backbone}


def constrained_data(out: Path):
    """(train, val) files: the first eighth of tinyshakespeare's first 90%, and its last 10%."""
    text = TINY.read_bytes()
    cut = int(len(text) * 0.9)
    train, val = out / "tiny_train_eighth.txt", out / "tiny_val.txt"
    if not train.is_file():
        train.write_bytes(text[:cut // CONSTRAINED_FRACTION])
        val.write_bytes(text[cut:])
    return train, val


def sh(cmd, log: Path, threads: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def train(name: str, overrides, out: Path, steps: int, threads: int, data=(f"data.path={TINY}",)) -> None:
    save = out / name
    if (save / "metrics.json").is_file():
        return
    resume = ["training.resume=latest"] if any(save.glob("step_*")) else []
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *BASE, *overrides, *data,
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
    p.add_argument("--constrained", action="store_true",
                   help="the data-constrained runs instead (AR and diffusion, scratch and adapted, ~24 epochs)")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: 2 / --jobs)")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    threads = a.threads or max(1, 2 // a.jobs)
    if a.constrained:
        return constrained(a, out, threads)
    pretrain, pth = out / "pretrain", out / "pretrained.pth"
    table = {k: v for k, v in runs(pth, a.anneal_steps, a.steps, a.pretrain_steps).items()
             if a.runs is None or k in a.runs}
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
            list(pool.map(lambda kv: train(kv[0], kv[1][0], out, kv[1][1], threads), table.items()))
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


def constrained(a, out: Path, threads: int) -> None:
    """The data-constrained runs and their validation curves (``<out>/constrained.md``)."""
    pth = out / "pretrained.pth"
    dc = out / "constrained"
    dc.mkdir(exist_ok=True)
    train_file, val_file = constrained_data(dc)
    table = {k: v for k, v in constrained_runs(pth).items() if a.runs is None or k in a.runs}
    data = (f"data.path={train_file}", f"data.val_path={val_file}", f"logging.eval_freq={CONSTRAINED_EVAL_FREQ}")
    if not a.report_only:
        if not pth.is_file():
            raise SystemExit(f"{pth} is missing: run this script without --constrained first (it pretrains)")
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda kv: train(kv[0], kv[1], dc, CONSTRAINED_STEPS, threads, data), table.items()))
    curves = {}
    for name in table:
        recs = [r for r in read_log(dc / name) if "val_nll" in r or "val_nelbo" in r]
        curves[name] = {r["step"]: r.get("val_nll", r.get("val_nelbo")) for r in recs}
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| step | epochs | " + " | ".join(curves) + " |", "|---:|---:|" + "---:|" * len(curves)]
    epoch_steps = len(train_file.read_bytes()) / (12 * 64)
    for s in steps:
        lines.append(f"| {s} | {s / epoch_steps:.1f} | " +
                     " | ".join(f"{c[s]:.4f}" if s in c else "-" for c in curves.values()) + " |")
    text = "\n".join(lines) + "\n"
    (out / "constrained.md").write_text(text)
    print(text)


def read_log(save: Path) -> list:
    log = save / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


if __name__ == "__main__":
    main()
