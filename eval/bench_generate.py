"""Decoding speed of the library samplers at the size of ``experiment=shakespeare_char`` (CPU).

    python eval/bench_generate.py                                    # the full table
    python eval/bench_generate.py --lengths 256 --steps 8            # a quick probe
    python eval/bench_generate.py --mixers block_causal --lengths 1024 --repeats 3
    python eval/bench_generate.py --trade --diffusion eval/out/lm_table/block_causal_tnone_1x \
        --ar eval/out/lm_table/ar_1x                                 # speed against quality

One denoiser per mixer at the preset's sizes (4 layers, width 128, heads of 32, 65 characters +
eos + mask = 67 ids, mask id 66, no latent, FiLM text-time conditioning, ``bi_fusion=sum``),
random weights: every weight gets N(0, 0.1^2) noise on top of its initialisation, as the sampler
tests do, so that no path is switched off by a zero init (the FiLM projection, which starts at
zero, would otherwise make the time-conditioned model ignore ``t``). Decoding speed does not
depend on what the weights are, only on their shapes, so no checkpoint is read.

Each cell decodes ``--batch`` rows (default one sample) of ``length`` text positions from an
all-mask canvas with :func:`~rwkv_diffusion_rnn.diffusion.sampling.generate_text`: ``--steps``
denoising steps (64), temperature 1, ``low_confidence`` remasking, and

* ``bi`` and ``dw_jrt``: the whole canvas as one block (``block_length=None``);
* ``bi`` semi-AR: decoding blocks of ``--block`` (64) positions, left to right; every step still
  runs the whole canvas, so the cost per step is that of ``bi``;
* ``block_causal`` (``model.block_size = --block``, decoding blocks of ``--block``, so the two
  coincide): with the state cache (``use_cache=True``: committed blocks are carried as the
  forward-scan state, a step runs only the current block, and the first step of a block also
  folds the block before it into the state, in the same model call) and recomputing the full canvas every step (``use_cache=False``);
* the same ``block_causal`` model built with ``time_conditioning="none"``, cached and recomputed:
  for such a model the cache is exact (see "State caching" in ``sampling.py``), so the two must
  give identical tokens from the same generator seed; the script asserts it (after writing its
  output). For the FiLM model the two differ slightly (the cache holds committed blocks encoded at
  the ``t`` of the step that finished them); the fraction of equal tokens is printed as information;
* ``causal`` (AR): :func:`~rwkv_diffusion_rnn.diffusion.sampling.generate_autoregressive`, one
  token per call through the recurrent state, ``bos_id`` = eos (65), no ``eos_id`` (every row
  runs to ``length``); a "step" is then one token.

Timing: ``torch.set_num_threads(--threads)`` (default 1), one short warm-up call per model, then
``--repeats`` calls per cell (the same seed each time), wall time by ``time.perf_counter`` around
the whole sampler call, the minimum reported (the samplers run under ``torch.inference_mode``).
``ms/step`` is that time divided by the denoising steps actually run (the model calls without
``return_state``, counted by a forward hook: ``--steps`` unless a block gets fewer steps than
positions allow, e.g. more blocks than steps gives each block one step); for the cached path
``state folds`` counts the steps that also folded a finished block into the state. ``tok/s`` is ``batch x length`` over
the wall time of the whole sample. The ratio is recompute time / cached time at each length.

Speed against quality (``--trade``)
----------------------------------
Trained checkpoints instead of random weights: ``--diffusion`` a model whose mixer carries a
state cache (``block_causal``; its ``model.block_size`` is the decoding block), ``--ar`` an AR
run (``training.objective=ar``), which both writes the AR reference samples and scores every
sample (``evaluate``'s sample mode: gen. perplexity under it and the unigram entropy of the
samples). ``--num-samples`` samples of ``--trade-length`` tokens per setting, in batches of
``--batch``, temperature 1, ``low_confidence`` remasking, with the cache, for

* ``--steps-per-block k``: k denoising steps per block (``steps = k x blocks``; k = block size is
  one token per step, the quality reference of each row);
* ``--thresholds c``: confidence-threshold decoding (``threshold=c``, no step budget: every
  position whose proposal's confidence is at least c, and at least one per step);
* the AR model, token by token through its state (``generate_autoregressive``).

Per setting: tokens/s (all samples' tokens / the sampler's wall time, scoring excluded), model
calls per batch (a forward hook), tokens per call, gen. perplexity, entropy, the speed relative to
AR and the gen. perplexity relative to the one-token-per-step row. Writes ``--out`` (default
``eval/out/decoding_trade.md``), the same path with ``.json``, the samples in the folder of that
name and the plot ``--plot`` (default ``eval/decoding_trade.png``): gen. perplexity against
tokens/s, AR a point.

Cells run shortest length first and print one line each as they finish; the markdown table goes
to stdout and ``--out`` (default ``eval/out/bench_generate.md``), all numbers, the torch version,
the thread count and the CPU model to the same path with ``.json``; both are rewritten after
every cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive, generate_text
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
VOCAB, EOS, MASK = 67, 65, 66               # the chars tokenizer on tinyshakespeare: 65 + eos + mask
N_LAYER, N_EMBD, HEAD_SIZE = 4, 128, 32     # configs/experiment/shakespeare_char.yaml
TIME_CONDITIONING = "film"                  # configs/model/rwkv7_g1.yaml (scratch keeps it)
MIXERS = ("bi", "dw_jrt", "block_causal", "causal")

# name -> (mixer, time conditioning, block_length is --block, use_cache, sampler)
CASES = {
    "bi": ("bi", TIME_CONDITIONING, False, True, "diffusion"),
    "bi_semi_ar": ("bi", TIME_CONDITIONING, True, True, "diffusion"),
    "dw_jrt": ("dw_jrt", TIME_CONDITIONING, False, True, "diffusion"),
    "block_causal_cached": ("block_causal", TIME_CONDITIONING, True, True, "diffusion"),
    "block_causal_recompute": ("block_causal", TIME_CONDITIONING, True, False, "diffusion"),
    "block_causal_none_cached": ("block_causal", "none", True, True, "diffusion"),
    "block_causal_none_recompute": ("block_causal", "none", True, False, "diffusion"),
    "ar": ("causal", TIME_CONDITIONING, False, True, "ar"),
}
LABELS = {
    "bi": "bi, one block",
    "bi_semi_ar": "bi, blocks of {block} (semi-AR)",
    "dw_jrt": "dw_jrt, one block",
    "block_causal_cached": "block_causal, state cache",
    "block_causal_recompute": "block_causal, full canvas every step",
    "block_causal_none_cached": "block_causal tc=none, state cache",
    "block_causal_none_recompute": "block_causal tc=none, full canvas every step",
    "ar": "causal (AR), token by token",
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(mixer: str, time_conditioning: str, block: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DenoiserConfig(vocab_size=VOCAB, mask_id=MASK, latent_prefix_len=0, mixer=mixer,
                         time_conditioning=time_conditioning, block_size=block)
    model = build_denoiser(cfg, n_layer=N_LAYER, n_embd=N_EMBD, head_size=HEAD_SIZE)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


class CallCounter:
    """Counts the model's calls: ``steps`` those that give logits to decode from, ``folds`` those that
    move the state cache forward (a call of its own with ``return_state``, AR steps; or a step that
    also folds, ``state_at``)."""

    def __init__(self, model):
        self.steps = self.folds = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs.get("return_state"):
            self.folds += 1
        else:
            self.steps += 1
            self.folds += kwargs.get("state_at") is not None

    def reset(self):
        self.steps = self.folds = 0


def decode(name: str, model, length: int, args, steps: int):
    mixer, _, blocked, use_cache, sampler = CASES[name]
    g = torch.Generator().manual_seed(args.seed)
    if sampler == "ar":
        return generate_autoregressive(model, bos_id=EOS, length=length, batch_size=args.batch,
                                       temperature=1.0, generator=g)
    return generate_text(model, length=length, batch_size=args.batch, steps=steps,
                         block_length=args.block if blocked else None, remasking="low_confidence",
                         temperature=1.0, generator=g, use_cache=use_cache)


def run_cell(name: str, model, length: int, args):
    counter = CallCounter(model)
    times = []
    try:
        for _ in range(args.repeats):
            counter.reset()
            t0 = time.perf_counter()
            tokens = decode(name, model, length, args, args.steps)
            times.append(time.perf_counter() - t0)
    finally:
        counter.handle.remove()
    ar = CASES[name][4] == "ar"
    steps = counter.folds if ar else counter.steps       # AR: one state-returning call per token
    wall = min(times)
    mixer, tc, blocked, use_cache, _ = CASES[name]
    cell = {"case": name, "label": LABELS[name].format(block=args.block), "mixer": mixer,
            "time_conditioning": tc, "sampler": "generate_autoregressive" if ar else "generate_text",
            "block_length": args.block if blocked else None, "use_cache": use_cache if not ar else None,
            "length": length, "batch": args.batch, "steps_asked": None if ar else args.steps,
            "steps_run": steps, "state_folds": 0 if ar else counter.folds, "times_s": times,
            "wall_s": wall, "ms_per_step": wall / steps * 1e3, "tokens_per_s": args.batch * length / wall}
    return cell, tokens


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def render(result: dict) -> str:
    a = result["args"]
    lengths = a["lengths"]
    cells = {(c["case"], c["length"]): c for c in result["cells"]}
    lines = [f"# Decoding speed, shakespeare_char size ({N_LAYER} layers, width {N_EMBD}, heads of "
             f"{HEAD_SIZE}, vocab {VOCAB}), random weights",
             "",
             f"torch {result['torch']}, {result['threads']} thread(s), {result['cpu']}; batch {a['batch']}, "
             f"{a['steps']} steps, temperature 1, low_confidence remasking, blocks of {a['block']}, "
             f"min of {a['repeats']}. ms/step = wall time of the sample / steps run (AR: per token); "
             "tok/s = batch x length / wall time.",
             "",
             "| model | " + " | ".join(f"L={n} ms/step | L={n} tok/s" for n in lengths) + " |",
             "|---|" + "---:|---:|" * len(lengths)]
    for name in CASES:
        row = [cells.get((name, n)) for n in lengths]
        if not any(row):
            continue
        label = LABELS[name].format(block=a["block"])
        vals = []
        for c in row:
            vals += ["-", "-"] if c is None else [fmt(c["ms_per_step"]), fmt(c["tokens_per_s"])]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if result["cache"]:
        lines += ["", "block_causal: recompute time / cached time, and the tokens of the two from the same seed",
                  "", "| length | speed-up (film) | equal tokens (film) | speed-up (tc=none) | tokens identical (tc=none) |",
                  "|---:|---:|---:|---:|---|"]
        for r in result["cache"]:
            sp = {k: (f"{v:.2f}x" if v is not None else "-") for k, v in r["speedup"].items()}
            eq = r["fraction_equal"].get("film")
            ident = r["identical"].get("none")
            lines.append(f"| {r['length']} | {sp.get('film', '-')} | "
                         f"{'-' if eq is None else f'{eq:.3f}'} | {sp.get('none', '-')} | "
                         f"{'-' if ident is None else ('yes' if ident else 'NO')} |")
    return "\n".join(lines) + "\n"


def cache_rows(result: dict, tokens: dict, lengths):
    cells = {(c["case"], c["length"]): c for c in result["cells"]}
    rows = []
    for n in lengths:
        r = {"length": n, "speedup": {}, "fraction_equal": {}, "identical": {}}
        for tc, pre in (("film", "block_causal_"), ("none", "block_causal_none_")):
            c, u = cells.get((pre + "cached", n)), cells.get((pre + "recompute", n))
            if c is None or u is None:
                continue
            r["speedup"][tc] = u["wall_s"] / c["wall_s"]
            same = tokens[(pre + "cached", n)] == tokens[(pre + "recompute", n)]
            r["fraction_equal"][tc] = same.float().mean().item()
            r["identical"][tc] = bool(same.all())
        if r["speedup"]:
            rows.append(r)
    return rows


# --------------------------------------------------------------------------------------------------- trade


def trade(args) -> dict:
    """Speed against quality of cached block decoding and of AR decoding (see "Speed against
    quality" above)."""
    from rwkv_diffusion_rnn.diffusion.sampling import cache_unit
    from rwkv_diffusion_rnn.evaluate import evaluate_samples
    from rwkv_diffusion_rnn.training.trained import load_trained
    diff, ar = load_trained(args.diffusion, device="cpu"), load_trained(args.ar, device="cpu")
    block = cache_unit(diff.model)
    if block is None or diff.model.mixer.autoregressive:
        raise SystemExit(f"--diffusion {args.diffusion}: model.mixer={diff.cfg.model.mixer} is no cached block "
                         "model; the trade is measured on one (model.mixer=block_causal)")
    L = args.trade_length
    n_blocks = -(-L // block)
    settings = [("steps", k) for k in sorted(set(args.steps_per_block)) if 1 <= k <= block]
    settings += [("threshold", c) for c in args.thresholds] + [("ar", None)]
    samples_dir = args.out.with_suffix("")
    samples_dir.mkdir(parents=True, exist_ok=True)
    eos = getattr(ar.tokenizer, "eos_id", None)
    rows = []
    for kind, value in settings:
        trained = ar if kind == "ar" else diff
        model, tok = trained.model, trained.tokenizer
        counter = CallCounter(model)
        records, wall, n_batches = [], 0.0, 0
        try:
            for first in range(0, args.num_samples, args.batch):
                b = min(args.batch, args.num_samples - first)
                g = torch.Generator().manual_seed(args.seed + first)
                t0 = time.perf_counter()
                if kind == "ar":
                    out = generate_autoregressive(model, bos_id=eos if eos is not None else model.config.mask_id,
                                                  length=L, batch_size=b, temperature=1.0, generator=g)
                else:
                    out = generate_text(model, length=L, batch_size=b, block_length=block, use_cache=True,
                                        steps=value * n_blocks if kind == "steps" else None,
                                        threshold=value if kind == "threshold" else None,
                                        remasking="low_confidence", temperature=1.0, generator=g)
                wall += time.perf_counter() - t0
                n_batches += 1
                for i, ids in enumerate(out.tolist()):
                    records.append({"index": first + i, "text": tok.decode(ids), "token_ids": ids})
        finally:
            counter.handle.remove()
        name = "ar" if kind == "ar" else f"{kind}_{value:g}"
        path = samples_dir / f"{name}_L{L}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        score = evaluate_samples(path, args.ar, out=str(path.with_suffix(".eval.json")), batch_size=16,
                                 progress=False)
        # model calls: AR, one state-returning call per token; diffusion, the steps (folds ride along)
        calls = (counter.folds if kind == "ar" else counter.steps) / n_batches
        label = "AR, token by token" if kind == "ar" else (f"{value} steps/block" if kind == "steps"
                                                           else f"threshold {value}")
        row = {"setting": kind, "value": value, "label": label, "length": L, "samples": len(records),
               "wall_s": wall, "tokens_per_s": len(records) * L / wall, "calls_per_batch": calls,
               "tokens_per_call": L / calls, "gen_ppl": score["gen_ppl"], "entropy": score["entropy"],
               "samples_file": str(path)}
        rows.append(row)
        print(f"{label:<24} {row['tokens_per_s']:9.1f} tok/s  {calls:7.1f} calls  "
              f"gen_ppl {row['gen_ppl']:.3f}  entropy {row['entropy']:.3f}", flush=True)
    ar_row = rows[-1]
    ref = next((r for r in rows if r["setting"] == "steps" and r["value"] == block), None)
    for r in rows:
        r["speed_vs_ar"] = r["tokens_per_s"] / ar_row["tokens_per_s"]
        r["gen_ppl_vs_one_per_step"] = None if ref is None else r["gen_ppl"] / ref["gen_ppl"]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
              "diffusion": str(diff.path), "ar": str(ar.path), "block": block, "length": L,
              "num_samples": args.num_samples, "batch": args.batch, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_trade(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot_trade(result, args.plot)
    print()
    print(render_trade(result), end="")
    print(f"wrote {args.out}, {args.out.with_suffix('.json')}" + (f" and {args.plot}" if args.plot else ""))
    return result


def render_trade(result: dict) -> str:
    lines = [f"# Cached block decoding against AR: {result['length']} tokens, {result['num_samples']} samples "
             f"in batches of {result['batch']}", "",
             f"Diffusion `{result['diffusion']}` (blocks of {result['block']}, state cache), AR and scorer "
             f"`{result['ar']}`; temperature 1, low_confidence remasking; torch {result['torch']}, "
             f"{result['threads']} thread(s), {result['cpu']}. x one-per-step: gen. PPL over the "
             f"{result['block']} steps/block row's.", "",
             "| decoding | tok/s | x AR | calls/batch | tokens/call | gen. PPL | x one-per-step | entropy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rel = r["gen_ppl_vs_one_per_step"]
        lines.append(f"| {r['label']} | {fmt(r['tokens_per_s'])} | {r['speed_vs_ar']:.2f} | "
                     f"{fmt(r['calls_per_batch'])} | {r['tokens_per_call']:.2f} | {r['gen_ppl']:.3f} | "
                     f"{'-' if rel is None else f'{rel:.2f}'} | {r['entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_trade(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for kind, style, label in (("steps", "o-", "steps per block"), ("threshold", "s-", "confidence threshold")):
        rows = sorted((r for r in result["rows"] if r["setting"] == kind), key=lambda r: r["tokens_per_s"])
        if rows:
            ax.plot([r["tokens_per_s"] for r in rows], [r["gen_ppl"] for r in rows], style, label=label)
            for r in rows:
                ax.annotate(f"{r['value']:g}", (r["tokens_per_s"], r["gen_ppl"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ar = next(r for r in result["rows"] if r["setting"] == "ar")
    ax.plot([ar["tokens_per_s"]], [ar["gen_ppl"]], "*", markersize=14, color="k", label="AR")
    ax.set_xscale("log")
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("gen. perplexity (AR scorer)")
    ax.set_title(f"Cached block decoding vs AR, {result['length']} tokens")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--steps", type=int, default=64, help="denoising steps per sample")
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS,
                    help="bi: one block and semi-AR; block_causal: cached and recompute, film and tc=none; "
                         "causal: the AR model")
    ap.add_argument("--block", type=int, default=64,
                    help="decoding block of bi semi-AR and block_causal, and block_causal's model.block_size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="calls per cell; the minimum is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="the table (default eval/out/bench_generate.md; --trade: eval/out/decoding_trade.md)")
    tr = ap.add_argument_group("--trade: speed against quality of trained checkpoints")
    tr.add_argument("--trade", action="store_true")
    tr.add_argument("--diffusion", type=Path, help="a cached block model's run or checkpoint")
    tr.add_argument("--ar", type=Path, help="an AR run or checkpoint: the AR reference and the scorer")
    tr.add_argument("--trade-length", type=int, default=256, help="tokens per sample")
    tr.add_argument("--num-samples", type=int, default=32)
    tr.add_argument("--steps-per-block", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="kept where <= the block size")
    tr.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    tr.add_argument("--plot", type=lambda v: Path(v) if v else None, default=ROOT / "eval" / "decoding_trade.png",
                    help='where the PNG goes ("" for none; needs matplotlib: pip install -e ".[eval]")')
    a = ap.parse_args(argv)
    if a.trade and (a.diffusion is None or a.ar is None):
        ap.error("--trade needs --diffusion <cached block model> and --ar <AR run>")
    if a.out is None:
        a.out = ROOT / "eval" / "out" / ("decoding_trade.md" if a.trade else "bench_generate.md")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trade:
        return trade(args)
    lengths = sorted(set(args.lengths))
    names = [n for n in CASES if CASES[n][0] in args.mixers]
    result = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "lengths": lengths},
              "model": {"n_layer": N_LAYER, "n_embd": N_EMBD, "head_size": HEAD_SIZE, "vocab_size": VOCAB,
                        "mask_id": MASK, "latent_prefix_len": 0, "bi_fusion": "sum",
                        "weights": "random (init + N(0, 0.1^2))"},
              "cells": [], "cache": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")

    models = {}
    for name in names:
        mixer, tc = CASES[name][:2]
        if (mixer, tc) not in models:
            models[(mixer, tc)] = build(mixer, tc, args.block, args.seed)
            t0 = time.perf_counter()
            decode(name, models[(mixer, tc)], min(2 * args.block, 128), args, 2)     # warm-up
            print(f"built and warmed up {mixer} (tc={tc}) in {time.perf_counter() - t0:.1f} s", flush=True)

    tokens = {}
    for n in lengths:
        for name in names:
            cell, tokens[(name, n)] = run_cell(name, models[CASES[name][:2]], n, args)
            result["cells"].append(cell)
            result["cache"] = cache_rows(result, tokens, lengths)
            print(f"L={n:<5} {cell['label']:<45} {cell['wall_s']:8.2f} s/sample  "
                  f"{cell['ms_per_step']:8.2f} ms/step ({cell['steps_run']} steps)  "
                  f"{cell['tokens_per_s']:9.1f} tok/s", flush=True)
            args.out.write_text(render(result))
            json_path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(render(result), end="")
    print(f"wrote {args.out} and {json_path}")
    bad = [r["length"] for r in result["cache"] if r["identical"].get("none") is False]
    assert not bad, (f"block_causal with time_conditioning=none: cached and recomputed tokens differ at "
                     f"length(s) {bad}; the state cache should be exact for this model")
    return result


if __name__ == "__main__":
    main()
