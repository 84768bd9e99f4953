"""Sample quality against the number of denoising steps on tinyshakespeare characters: the
generative perplexity of each model's samples under the AR baseline, and their unigram entropy.

    python eval/lm_table.py --models ar bi_sum block_causal --budgets 1   # the checkpoints
    python eval/gen_quality.py                                            # samples, scores, table

For each diffusion run (default ``bi_sum`` and ``block_causal`` of ``eval/out/lm_table``, the
``experiment=shakespeare_char`` runs at nanoGPT's budget) and each number of steps (8, 16, 32,
64, 128) it writes ``--num_samples`` samples of ``--length`` characters with the generate
command's library function (temperature 1, ``--remasking`` (default random, the denoiser's
ancestral sampler); ``block_causal`` in blocks of its model block, with the state cache and, as a
second row set, recomputing the whole canvas every step), and
scores them with ``evaluate``'s sample mode under the AR run (``ar_1x``). Reference rows: the AR
run's own samples (temperature 1, token by token) and windows of the held-out text (the last
10% of the corpus, as in training) of the same length, both scored by the same AR model. At
``--length 64`` (the training context) 128 steps equals 64 (at most one character per step), so
the default length is 128 and ``--length 64`` gives the table at the training context.

Writes ``<out>/<model>_L<length>_s<steps>.jsonl`` and ``.eval.json`` per cell (a cell whose
``.eval.json`` exists is reused) and the table ``<out>/gen_quality_L<length>.md`` (default
``--out eval/out/gen_quality``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
STEPS = (8, 16, 32, 64, 128)


def heldout_windows(path: Path, n: int, length: int) -> list:
    """``n`` windows of ``length`` characters spread evenly over the last 10% of the corpus."""
    text = path.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    stride = (len(val) - length) // max(n - 1, 1)
    return [val[i * stride:i * stride + length] for i in range(n)]


def cell(out: Path, name: str, length: int, steps, make, scorer: Path, batch_size: int) -> dict:
    from rwkv_diffusion_rnn.evaluate import evaluate_samples
    stem = out / (f"{name}_L{length}" + (f"_s{steps}" if steps else ""))
    samples, scores = Path(f"{stem}.jsonl"), Path(f"{stem}.eval.json")
    if scores.is_file():
        return json.loads(scores.read_text())
    make(samples)
    return evaluate_samples(samples, scorer, out=str(scores), batch_size=batch_size, progress=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "eval" / "out" / "lm_table")
    p.add_argument("--models", nargs="+", default=["bi_sum_1x", "block_causal_1x"])
    p.add_argument("--scorer", default="ar_1x")
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--remasking", default="random")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "gen_quality")
    a = p.parse_args(argv)

    import torch
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.trained import checkpoint_dir, saved_config

    def model_cfg(run: Path):          # the run's model keys, without loading its weights
        return saved_config(checkpoint_dir(run)).model
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    scorer = a.runs / a.scorer
    common = dict(num_samples=a.num_samples, length=a.length, temperature=1.0, progress_bar=False,
                  print_texts=False, batch_size=a.batch_size, eos=False)

    def diffusion_samples(run: Path, steps: int, use_cache: bool = True):
        mixer_cfg = model_cfg(run)
        block = mixer_cfg.block_size if mixer_cfg.mixer == "block_causal" else None
        return lambda f: generate(run, steps=steps, remasking=a.remasking, block_length=block, use_cache=use_cache,
                                  out=str(f), **common)

    def write_heldout(f: Path):
        texts = heldout_windows(CORPUS, a.num_samples, a.length)
        f.write_text("".join(json.dumps({"index": i, "text": t}) + "\n" for i, t in enumerate(texts)))

    rows = [("held-out text", "-", cell(a.out, "heldout", a.length, None, write_heldout, scorer, a.batch_size)),
            ("AR (its own samples)", "token by token",
             cell(a.out, a.scorer, a.length, None, lambda f: generate(scorer, out=str(f), **common), scorer,
                  a.batch_size))]
    for model in a.models:
        cached = model_cfg(a.runs / model).mixer == "block_causal"
        for use_cache in ((True, False) if cached else (True,)):
            name = model + ("" if use_cache else "_recompute")
            for steps in a.steps:
                r = cell(a.out, name, a.length, steps, diffusion_samples(a.runs / model, steps, use_cache), scorer,
                         a.batch_size)
                rows.append((name if not cached else f"{name} ({'state cache' if use_cache else 'recomputed'})",
                             steps, r))
                print(f"{name} steps={steps}: gen_ppl {r['gen_ppl']:.3f}  entropy {r['entropy']:.3f}", flush=True)

    lines = [f"Samples of {a.length} characters ({a.num_samples} per row, temperature 1, remasking "
             f"{a.remasking}), scored by `{a.scorer}`:", "",
             "| samples | steps | gen. perplexity | gen. NLL (nats/char) | entropy (nats) | entropy s.d. |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, steps, r in rows:
        lines.append(f"| {name} | {steps} | {r['gen_ppl']:.3f} | {r['gen_nll']:.4f} | {r['entropy']:.3f} | "
                     f"{r['entropy_std']:.3f} |")
    for model in a.models:
        pairs = [(a.out / f"{model}_L{a.length}_s{s}.jsonl", a.out / f"{model}_recompute_L{a.length}_s{s}.jsonl")
                 for s in a.steps]
        if all(x.is_file() and y.is_file() for x, y in pairs):
            same = total = 0
            for x, y in pairs:
                for rx, ry in zip(*(map(json.loads, f.read_text().splitlines()) for f in (x, y))):
                    same += sum(i == j for i, j in zip(rx["token_ids"], ry["token_ids"]))
                    total += len(rx["token_ids"])
            lines += ["", f"{model}: the state cache and full recomputation agree on {same / total:.1%} of the "
                          f"characters (same seeds, every steps row)."]
    table = a.out / f"gen_quality_L{a.length}.md"
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {table}")


if __name__ == "__main__":
    main()
