"""The language-modelling table: the AR RWKV-7 against the diffusion bound of each mixer on
tinyshakespeare at character level (``experiment=shakespeare_char``, nanoGPT's baby budget).

    python eval/lm_table.py --jobs 2                        # run what is missing, then report
    python eval/lm_table.py --budgets 1 2 4 --models ar bi_sum
    python eval/lm_table.py --report-only                   # aggregate finished runs only

Each run is ``python -m rwkv_diffusion_rnn.train_rwkv experiment=shakespeare_char <model overrides>
training.max_steps=<2000 x budget> logging.eval_freq=250`` with its own ``logging.save_dir``
``<out>/<model>_<budget>x`` (default ``--out eval/out/lm_table``). A finished run (its
``metrics.json`` at the last step) is skipped; an interrupted one resumes from its newest
checkpoint. With ``--jobs 2`` two runs share the machine, one thread each.

The table reads each run's final evaluation (``metrics.json``: the whole validation split,
one (time, mask) draw per window, the same noise for every model): the AR NLL and the diffusion
bound in nats per character, the bound's Monte-Carlo standard error and its ratio to the AR
NLL at the same budget; the ``embedding`` row (Gaussian diffusion of the token embeddings) has
no bound and shows its rounding cross-entropy instead, marked so and without a ratio. The plot draws every evaluation of ``train_log.jsonl`` against training
tokens. Samples come from each model's largest budget: the library's diffusion sampler (64
characters, 64 steps, temperature 1, random remasking: one random position per step, the
denoiser's own ancestral sampler) and plain ancestral sampling through the recurrent state for
the AR model. Writes ``<out>/lm_table.md`` and ``--plot`` (default ``eval/lm_bound_vs_tokens.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BASE_STEPS = 2000
TOKENS_PER_STEP = 12 * 64             # the preset's batch x context

MODELS = {
    "ar": ["training.objective=ar", "model.mixer=causal"],
    "bi_sum": ["model.mixer=bi", "model.bi_fusion=sum"],
    # each direction its own weights: a shared-weight sum is the same function of a text and of
    # its reversal, so its samples come out reversed about half the time (eval/README, "Generation")
    "bi_sum_sep": ["model.mixer=bi", "model.bi_fusion=sum", "model.bi_share_weights=false"],
    "bi_concat": ["model.mixer=bi", "model.bi_fusion=concat"],
    "bi_gated": ["model.mixer=bi", "model.bi_fusion=gated"],
    # one block per layer, its WKV recurrence run both ways inside (pretrained left token shift; the
    # mean-of-neighbours shift as a second row, the choice the table measures)
    "bi_wkv": ["model.mixer=bi_wkv", "model.bi_wkv_shift=left"],
    "bi_wkv_mean": ["model.mixer=bi_wkv", "model.bi_wkv_shift=mean"],
    "dw_jrt": ["model.mixer=dw_jrt"],
    "block_causal": ["model.mixer=block_causal", "model.block_size=16"],
    # no time conditioning: the sampler's state cache is then exact (sampling.py, "State caching")
    "block_causal_tnone": ["model.mixer=block_causal", "model.block_size=16", "model.time_conditioning=none"],
    # the baseline denoiser: a bidirectional transformer of about the same size (1.13M vs 1.26M)
    "transformer": ["model.arch=transformer", "model.mixer=bi"],
    # RWKV-7 at layers 0 and 2 (read both ways), attention at 1 and 3: 1.19M parameters
    "hybrid": ["model.arch=hybrid", "model.mixer=bi", "model.attn_layers=[1,3]"],
    # Qwen3's architecture (RMSNorm, SwiGLU, q/k norms) run without its causal mask, from random
    # weights of about the same size (no pretrained Qwen3 is at hand offline): QWEN3_INIT
    "qwen3": ["model.arch=qwen3", "model.qwen3_name={qwen3_init}"],
    # the AR baseline of each other architecture (causal attention; RWKV left to right with causal
    # attention; Qwen3's own causal mask), each the reference of its own diffusion row
    "ar_transformer": ["training.objective=ar", "model.arch=transformer", "model.mixer=causal"],
    "ar_hybrid": ["training.objective=ar", "model.arch=hybrid", "model.mixer=causal", "model.attn_layers=[1,3]"],
    "ar_qwen3": ["training.objective=ar", "model.arch=qwen3", "model.mixer=causal", "model.qwen3_name={qwen3_init}"],
    # Gaussian diffusion of the token embeddings (the continuous baseline, Diffusion-LM's recipe):
    # its number is the rounding cross-entropy, a score of its x0 guesses, not a likelihood bound
    "embedding": ["training.objective=embedding", "training.auxiliary_ce_weight=0.1"],
}
# 4 layers, width 128, 4 heads of 32, SwiGLU width 512, 128 embedding rows (the characters fit)
QWEN3_INIT = dict(vocab_size=128, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256)


def qwen3_init(out: Path) -> Path:
    """``<out>/qwen3_init``: a Qwen3Model of QWEN3_INIT with transformers' own random
    initialisation (seed 0), written once with save_pretrained."""
    d = out / "qwen3_init"
    if not (d / "config.json").exists():
        import torch
        from transformers import Qwen3Config, Qwen3Model
        torch.manual_seed(0)
        Qwen3Model(Qwen3Config(**QWEN3_INIT)).save_pretrained(d)
    return d


def run_dir(out: Path, model: str, budget: int) -> Path:
    return out / f"{model}_{budget}x"


def finished(d: Path, steps: int) -> bool:
    try:
        return json.loads((d / "metrics.json").read_text()).get("step") == steps
    except (OSError, ValueError):
        return False


def run_one(out: Path, model: str, budget: int, threads: int) -> Path:
    from rwkv_diffusion_rnn.training.checkpoints import latest_checkpoint
    d, steps = run_dir(out, model, budget), BASE_STEPS * budget
    if finished(d, steps):
        return d
    model_args = [a.format(qwen3_init=qwen3_init(out)) if "{qwen3_init}" in a else a for a in MODELS[model]]
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=shakespeare_char",
           f"data.path={CORPUS}", f"training.max_steps={steps}", "logging.eval_freq=250", *model_args,
           f"logging.save_dir={d}", "logging.progress_bar=false", f"hydra.run.dir={d}/hydra"]
    if latest_checkpoint(d) is not None:
        cmd.append("training.resume=latest")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "stdout.log", "a") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    print(f"{'done' if finished(d, steps) else 'FAILED'} {d.name} (see {d / 'stdout.log'})", flush=True)
    return d


def curve(d: Path, key: str):
    from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
    return [(r["step"] * TOKENS_PER_STEP, r[key]) for r in read_train_log(d) if key in r]


def final(d: Path):
    m = json.loads((d / "metrics.json").read_text())
    key = next(k for k in ("val_nll", "val_nelbo", "val_rounding_ce") if k in m)
    bpc = m.get("val_bpc")
    if key == "val_rounding_ce":        # characters: one token each, so bits per char is this / ln 2
        bpc = m[key] / math.log(2)
    return m[key], m.get(f"{key}_stderr", 0.0), bpc


def samples(d: Path, n: int = 2, length: int = 64, seed: int = 0):
    """``n`` samples of ``length`` characters from the run's last checkpoint, by the generate
    command's library function: one random position per step drawn from the model for a diffusion
    model (random remasking, the denoiser's own ancestral sampler; confidence-ordered remasking
    repeats frequent words at this size), token by token for the AR model."""
    from rwkv_diffusion_rnn.generate import generate
    recs = generate(d, num_samples=n, length=length, steps=length, temperature=1.0, remasking="random",
                    seed=seed, eos=False, progress_bar=False, print_texts=False)
    return [r["text"] for r in recs]


def report(out: Path, models, budgets, plot: Path):
    lines = ["| model | budget | steps | train tokens | val nats/char | MC s.e. | bits/char | ratio to AR |",
             "|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        ar = run_dir(out, "ar", b)
        ar_val = final(ar)[0] if finished(ar, BASE_STEPS * b) else None
        for m in models:
            d = run_dir(out, m, b)
            if not finished(d, BASE_STEPS * b):
                continue
            val, se, bpc = final(d)
            ratio = f"{val / ar_val:.3f}" if ar_val and m != "ar" else ("1" if m == "ar" else "-")
            note = ""
            if "val_rounding_ce" in json.loads((d / "metrics.json").read_text()):
                ratio, note = "-", " (rounding CE, not a bound)"     # no ratio: it bounds nothing
            lines.append(f"| {m}{note} | {b}x | {BASE_STEPS * b} | {BASE_STEPS * b * TOKENS_PER_STEP / 1e6:.2f}M | "
                         f"{val:.4f} | {se:.4f} | {bpc:.3f} | {ratio} |")
    lines += ["", "Samples (64 characters each, from each model's largest finished budget):", ""]
    for m in models:
        done = [b for b in budgets if finished(run_dir(out, m, b), BASE_STEPS * b)]
        if done:
            for i, text in enumerate(samples(run_dir(out, m, max(done)))):
                lines.append(f"- {m} {max(done)}x #{i}: `{text!r}`")
    text = "\n".join(lines) + "\n"
    (out / "lm_table.md").write_text(text)
    print(text)
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        styles = {1: ":", 2: "--", 4: "-"}
        for i, m in enumerate(models):
            for b in budgets:
                d = run_dir(out, m, b)
                pts = curve(d, "val_nll" if m == "ar" else "val_nelbo")
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, styles.get(b, "-"), color=f"C{i}", marker=".",
                            label=f"{m} {b}x" + (" (NLL)" if m == "ar" else " (bound)"))
        ax.axhline(1.88, color="grey", lw=0.8, ls="-.", label="nanoGPT transformer, 1x (1.88)")
        ax.set_xlabel("training tokens (characters)")
        ax.set_ylabel("validation nats per character")
        ax.set_ylim(1.3, 2.8)
        ax.set_title("tinyshakespeare, char level: AR NLL and diffusion bound")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: 2 // jobs)")
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "lm_table")
    p.add_argument("--plot", type=lambda v: Path(v) if v else None, default=ROOT / "eval" / "lm_bound_vs_tokens.png",
                   help='where the PNG goes ("" for none; needs matplotlib: pip install -e ".[eval]")')
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    if not CORPUS.exists():
        sys.exit(f"{CORPUS} is absent: the public corpus lives beside the checkout (../shared/data)")
    if not a.report_only:
        todo = [(m, b) for b in sorted(a.budgets) for m in a.models]
        threads = a.threads or max(1, 2 // a.jobs)
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda mb: run_one(a.out, *mb, threads), todo))
    report(a.out, a.models, sorted(a.budgets), a.plot)


if __name__ == "__main__":
    main()
