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
    diff_adapt      diffusion from the backbone, its own head (model.use_pretrained_head=true)
    diff_anneal     the same with model.bi_anneal_steps (the right-to-left reading phased in)
    diff_frozen     the same with the backbone frozen for the first epoch, then unfrozen
    diff_shift      diff_adapt with model.shift_logits (the head keeps predicting the next token)
    diff_shift_anneal   both: at step 0 exactly the pretrained AR model
    block_<n>       block_causal in blocks of n (1 ... 64) with shift, annealing and clean context
                    (BD3-LM's training); at block 1 an AR model; decoded with the state cache
    block_4_noisy   block 4 trained on noised earlier blocks (model.block_context=noisy)
    diff_scratch_long   diff_scratch for --steps + --pretrain_steps steps (equal total steps)

Each row also gets the generative perplexity of 32 samples of 64 characters (64 steps, temperature
1, random remasking; AR rows token by token) under ar_ft, and the ladder and ar_ft the decoding
time per character (256 characters one per step, batch 1, one thread, the state cache).
``--constrained`` runs the data-constrained regime instead (see :func:`constrained`).

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
    backbone = [f"model.rwkv_name={pth}", "model.use_pretrained_head=true"]
    shift, annealed = "model.shift_logits=true", f"model.bi_anneal_steps={anneal}"
    table = {
        "ar_ft": ["training.objective=ar", "model.mixer=causal", *backbone],
        "diff_scratch": [],
        "diff_adapt": backbone,
        "diff_anneal": [*backbone, annealed],
        "diff_frozen": [*backbone, "model.freeze_backbone=true", "training.unfreeze_backbone_at_epoch=1"],
        "diff_shift": [*backbone, shift],
        "diff_shift_anneal": [*backbone, shift, annealed],
        **{f"block_{n}": [*backbone, "model.mixer=block_causal", f"model.block_size={n}", shift, annealed,
                          "model.block_context=clean"] for n in LADDER},
        "block_4_noisy": [*backbone, "model.mixer=block_causal", "model.block_size=4", shift, annealed],
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
    backbone = [f"model.rwkv_name={pth}", "model.use_pretrained_head=true"]
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
    p.add_argument("--plot", type=lambda v: Path(v) if v else None, default=ROOT / "eval" / "adapt_bound_vs_steps.png",
                   help='where the PNG goes ("" for none; needs matplotlib: pip install -e ".[eval]")')
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
        tiny = evaluate(ckpt, TINY, out / f"{name}.tiny.eval.json", out / "cache", threads, "null")
        other = evaluate(ckpt, OTHER, out / f"{name}.other.eval.json", out / "cache", threads, RETENTION_BATCHES)
        gen = gen_ppl(name, ckpt, out, threads) if (out / "ar_ft" / "metrics.json").is_file() else None
        results[name] = (tiny, other, gen, decode_ms(name, ckpt, out, threads))
    ref = results.get("ar_ft", (None,))[0]
    pre_other = results.get("ar_zero_shot", (None, None))[1]
    lines = ["| run | tinyshakespeare nats/char | s.e. | ratio to ar_ft | pretraining corpus (held out) nats/char | "
             "retention (pretrained / this) | gen-PPL (64 steps) | entropy | decode ms/char |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (tiny, other, gen, ms) in results.items():
        ratio = f"{tiny['nats_per_token'] / ref['nats_per_token']:.3f}" if ref else "-"
        keep = f"{pre_other['nats_per_token'] / other['nats_per_token']:.3f}" if pre_other else "-"
        lines.append(f"| {name} | {tiny['nats_per_token']:.4f} | {tiny.get('stderr', 0):.4f} | {ratio} | "
                     f"{other['nats_per_token']:.4f} | {keep} | "
                     + (f"{gen['gen_ppl']:.2f} | {gen['entropy']:.3f} | " if gen else "- | - | ")
                     + (f"{ms:.2f} |" if ms is not None else "- |"))
    text = "\n".join(lines) + "\n"
    (out / "adapt_table.md").write_text(text)
    print(text)
    if a.plot:
        plot_curves({n: val_curve(out / n) for n in PLOTTED if n in results}, {"ar_ft"},
                    "steps on tinyshakespeare (12 x 64 bytes each)",
                    "from a pretrained RWKV-7 (4x128, AR on other plays) to a diffusion LM", a.plot)


# rows drawn in the PNG of bound against adaptation steps
PLOTTED = ("ar_ft", "diff_scratch", "diff_adapt", "diff_anneal", "diff_shift", "diff_shift_anneal", "block_1",
           "block_4", "block_16")
GEN_SAMPLES, GEN_LENGTH, GEN_STEPS = 32, 64, 64
DECODE_LENGTH = 256


def gen_ppl(name: str, ckpt: Path, out: Path, threads: int):
    """Generative perplexity of GEN_SAMPLES samples of GEN_LENGTH characters (GEN_STEPS steps,
    temperature 1, random remasking; a block_causal run decodes in its own blocks with the state
    cache, an AR run token by token) under the AR reference ``ar_ft``."""
    samples, scores = out / f"{name}.gen.jsonl", out / f"{name}.gen.eval.json"
    if not scores.is_file():
        if not samples.is_file():
            cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.generate", f"checkpoint={ckpt}",
                   f"num_samples={GEN_SAMPLES}", f"length={GEN_LENGTH}", f"steps={GEN_STEPS}", "temperature=1.0",
                   "remasking=random", "eos=false", "batch_size=16", "progress_bar=false", "print_texts=false",
                   f"out={samples}"]
            block = _block(name)
            if block:
                cmd.append(f"block_length={block}")
            if sh(cmd, out / f"{name}.gen.log", threads) != 0:
                raise SystemExit(f"generate {name} failed: see {out / f'{name}.gen.log'}")
        cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"eval.samples={samples}",
               f"eval.scorer={out / 'ar_ft'}", f"out={scores}", "logging.progress_bar=false"]
        if sh(cmd, out / f"{name}.gen.log", threads) != 0:
            raise SystemExit(f"scoring {name}'s samples failed: see {out / f'{name}.gen.log'}")
    return json.loads(scores.read_text())


def _block(name: str):
    return int(name.split("_")[1]) if name.startswith("block_") else None     # block_<size>[_noisy]


def decode_ms(name: str, ckpt: Path, out: Path, threads: int):
    """Milliseconds per character to decode DECODE_LENGTH characters one per step, batch 1 (the
    block ladder with its state cache, AR token by token through its state; median of 3)."""
    if not (name.startswith("block_") or name == "ar_ft"):
        return None
    f = out / f"{name}.decode.json"
    if not f.is_file():
        code = (
            "import json, statistics, sys, time, torch\n"
            "from rwkv_diffusion_rnn.training.trained import load_trained\n"
            "from rwkv_diffusion_rnn.diffusion import sampling\n"
            f"torch.set_num_threads({threads})\n"
            f"m = load_trained({str(ckpt)!r}).model.eval()\n"
            f"n, block = {DECODE_LENGTH}, {_block(name)!r}\n"
            "def once():\n"
            "    g = torch.Generator().manual_seed(0)\n"
            "    t0 = time.perf_counter()\n"
            "    if block is None:\n"
            "        sampling.generate_autoregressive(m, bos_id=256, length=n, batch_size=1, temperature=1.0, generator=g)\n"
            "    else:\n"
            "        sampling.generate_text(m, length=n, batch_size=1, steps=n, block_length=block, temperature=1.0,\n"
            "                               remasking='random', generator=g, use_cache=True)\n"
            "    return time.perf_counter() - t0\n"
            "once()\n"
            "times = [once() for _ in range(3)]\n"
            f"json.dump({{'ms_per_char': 1000 * statistics.median(times) / n, 'times_s': times}}, open({str(f)!r}, 'w'))\n")
        if sh([sys.executable, "-c", code], out / f"{name}.decode.log", threads) != 0:
            raise SystemExit(f"decode timing of {name} failed: see {out / f'{name}.decode.log'}")
    return json.loads(f.read_text())["ms_per_char"]


def val_curve(save: Path) -> dict:
    """{step: validation NLL (AR) or bound (diffusion)} of the run in ``save``."""
    from rwkv_diffusion_rnn.training.run_folder import read_train_log
    return {r["step"]: r.get("val_nll", r.get("val_nelbo")) for r in read_train_log(save)
            if "val_nll" in r or "val_nelbo" in r}


def plot_curves(curves: dict, ar, xlabel: str, title: str, plot: Path, x_per_step: float = 1.0) -> None:
    """Writes ``plot``: each of ``curves`` ({name: {step: value}}) against step * ``x_per_step``,
    the names in ``ar`` dashed (an NLL), the others solid (a bound)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, c) in enumerate(curves.items()):
        xs = sorted(c)
        ax.plot([x * x_per_step for x in xs], [c[x] for x in xs], "--" if name in ar else "-", marker=".",
                color=f"C{i}", label=name + (" (NLL)" if name in ar else " (bound)"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation nats per character")
    ax.set_title(title)
    many = len(curves) > 4
    ax.legend(fontsize=7 if many else 8, ncol=2 if many else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"wrote {plot}")


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
    curves = {name: val_curve(dc / name) for name in table}
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| step | epochs | " + " | ".join(curves) + " |", "|---:|---:|" + "---:|" * len(curves)]
    epoch_steps = len(train_file.read_bytes()) / (12 * 64)
    for s in steps:
        lines.append(f"| {s} | {s / epoch_steps:.1f} | " +
                     " | ".join(f"{c[s]:.4f}" if s in c else "-" for c in curves.values()) + " |")
    # where each curve is lowest, and the first evaluation from which the best diffusion bound is
    # below the AR NLL of the same step
    best = {n: min(c.items(), key=lambda kv: kv[1]) for n, c in curves.items() if c}
    lines += ["", "| run | best step | best nats/char | last |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {b[0]} | {b[1]:.4f} | {curves[n][max(curves[n])]:.4f} |" for n, b in best.items()]
    for ar, diff in (("dc_ar_scratch", "dc_diff_scratch"), ("dc_ar_adapt", "dc_diff_adapt")):
        if ar in curves and diff in curves:
            cross = next((s for s in steps if s in curves[ar] and s in curves[diff]
                          and curves[diff][s] < curves[ar][s]), None)
            lines.append(f"\n{diff} below {ar}: " + (f"from step {cross} ({cross / epoch_steps:.1f} epochs)"
                                                      if cross else "never in these steps"))
    text = "\n".join(lines) + "\n"
    (out / "constrained.md").write_text(text)
    print(text)
    if a.plot:
        plot_curves(curves, {n for n in curves if "_ar_" in n},
                    "epochs over the first eighth of tinyshakespeare (125,478 bytes)",
                    "data-constrained: AR and diffusion repeated ~24 epochs", a.plot.with_name("adapt_constrained.png"),
                    1 / epoch_steps)


if __name__ == "__main__":
    main()
