"""Which way do a text model's unconditional samples read? For each diffusion run, the fraction
of its samples that the AR baseline scores better forwards than reversed.

    python eval/lm_table.py --models ar bi_sum bi_gated --budgets 1 --jobs 2   # the checkpoints
    python eval/direction_table.py                                            # samples, scores, table

A model that cannot tell a text from its reversal (the ``bi`` mixer with shared weights and
``sum`` fusion, no position embedding or latent prefix) writes about half its samples right to
left; one that reads asymmetrically should write nearly all of them forwards. For each run
(default ``bi_sum_1x`` and ``bi_gated_1x`` of ``eval/out/lm_table``, the ``experiment=shakespeare_char``
runs at nanoGPT's budget) it writes ``--num_samples`` unconditional samples of ``--length``
characters with the generate command's library function (``--steps`` steps, temperature 1,
random remasking, generate's seed 0), and the same texts reversed, and scores both files with
``evaluate``'s sample mode (``python -m rwkv_diffusion_rnn.evaluate eval.samples=<file>
eval.scorer=<ar run>``: the exact NLL of each text under the AR run, ``ar_1x``). A sample reads
forwards when its NLL is lower than its reversal's. Writes ``<out>/<run>.jsonl``,
``<out>/<run>.reversed.jsonl``, their ``.eval.json`` (with the per-sample NLLs), and the table
``<out>/direction.md`` (default ``--out eval/out/direction``); a run whose files exist is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_jsonl(path: Path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def per_sample_nats(samples: Path, scorer: Path, device: str):
    """The NLL (nats) of each text of ``samples`` under the AR run ``scorer``, as evaluate's sample
    mode computes it (each text read after the end-of-text id)."""
    from rwkv_diffusion_rnn.training import likelihood
    from rwkv_diffusion_rnn.training.trained import load_trained
    trained = load_trained(scorer, device=device)
    texts = [json.loads(line)["text"] for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [trained.tokenizer.encode(t) for t in texts]
    nats, tokens = likelihood.score_texts(trained.model, ids, trained.tokenizer.eos_id, trained.device)
    return nats, tokens


def run_cell(name: str, runs: Path, out: Path, scorer: Path, args) -> dict:
    from rwkv_diffusion_rnn.evaluate import evaluate_samples
    from rwkv_diffusion_rnn.generate import generate
    result_file = out / f"{name}.direction.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    fwd, rev = out / f"{name}.jsonl", out / f"{name}.reversed.jsonl"
    if not fwd.is_file():
        records = generate(runs / name, num_samples=args.num_samples, steps=args.steps, length=args.length,
                           eos=False, remasking="random", temperature=1.0, seed=0, device=args.device)
        write_jsonl(fwd, [r["text"] for r in records])
    texts = [json.loads(line)["text"] for line in fwd.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_jsonl(rev, [t[::-1] for t in texts])
    summary = {}
    for label, path in (("forwards", fwd), ("reversed", rev)):
        summary[label] = evaluate_samples(path, scorer, out=str(path.with_suffix(".eval.json")), progress=False)
    nats_f, tokens = per_sample_nats(fwd, scorer, args.device)
    nats_r, _ = per_sample_nats(rev, scorer, args.device)
    better = [f < r for f, r in zip(nats_f, nats_r)]
    best_way = sum(min(f, r) for f, r in zip(nats_f, nats_r)) / sum(tokens)
    result = {"run": name, "num_samples": len(better), "forwards_fraction": sum(better) / len(better),
              "gen_ppl": summary["forwards"]["gen_ppl"], "gen_ppl_reversed": summary["reversed"]["gen_ppl"],
              "gen_ppl_each_read_its_better_way": float(__import__("math").exp(best_way)),
              "nats_forwards": nats_f, "nats_reversed": nats_r,
              "settings": {"steps": args.steps, "length": args.length, "remasking": "random", "temperature": 1.0,
                           "scorer": str(scorer)}}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "eval" / "out" / "lm_table")
    p.add_argument("--models", nargs="+", default=["bi_sum_1x", "bi_gated_1x"])
    p.add_argument("--scorer", default="ar_1x")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "direction")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    scorer = args.runs / args.scorer
    rows = []
    for name in args.models:
        r = run_cell(name, args.runs, args.out, scorer, args)
        rows.append(r)
        print(f"{name}: {r['forwards_fraction']:.3f} of {r['num_samples']} samples read better forwards "
              f"(gen. ppl {r['gen_ppl']:.1f}; reversed {r['gen_ppl_reversed']:.1f})", flush=True)
    lines = ["| run | samples | reads better forwards | gen. ppl | gen. ppl reversed | gen. ppl, each its better way |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['num_samples']} | {r['forwards_fraction']:.3f} | {r['gen_ppl']:.1f} | "
                     f"{r['gen_ppl_reversed']:.1f} | {r['gen_ppl_each_read_its_better_way']:.1f} |")
    (args.out / "direction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
