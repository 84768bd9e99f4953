"""Memory and speed of one training step against the window length, read at once or in chunks
with the state carried (``model.chunk_size``, ``model.chunk_grad``).

    python eval/bench_long_context.py                                  # the table of eval/README.md
    python eval/bench_long_context.py --ns 1024 4096 --models causal   # a quick probe
    python eval/bench_long_context.py --prompt-checkpoints runs/ar runs/block_causal   # long prompts

One model per row, random weights, text only, at ``--n-layer`` 4, ``--n-embd`` 256, heads of 64
channels, vocabulary ``--vocab`` 1000, one window of N tokens per step (batch 1):

* ``causal``: RWKV-7 left to right, the AR objective (``training.objective=ar``);
* ``block_causal``: RWKV-7 in blocks of 16, the masked-diffusion objective (``model.mixer=block_causal``);
* ``transformer``: causal attention, the AR objective (``model.arch=transformer model.mixer=causal``),
  which reads the whole window at once (no state to carry).

Each is run ``unchunked`` and, for the RWKV-7 rows, in chunks of ``--chunk`` tokens with
``full`` and ``truncated`` gradients. A cell is one fresh subprocess (as in bench_denoisers.py):
a warm-up step, then ``--repeats`` steps (objective forward + backward), the fastest reported as
tokens/s; ``peak MiB`` is the process's peak resident memory minus its resident memory once the
model and the batch are built, with glibc's mmap threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``):
its default threshold rises after the first large frees, after which the blocks every chunk's
recomputation frees stay in the heap and the resident memory no longer follows what is live.
A cell that runs out of memory (its address space capped at ``--mem-limit-gb``, 14) or past
``--cell-timeout`` seconds is reported as such.

Writes the table to stdout and ``--out`` (``eval/out/bench_long_context.md``)
and the numbers to ``<out>.json``, both after every cell.

``--prompt-checkpoints``: for each checkpoint (a text model with a left-to-right state), the peak
memory of ``generate`` continuing a prompt of each of ``--prompt-chars`` characters (the start of
the tinyshakespeare validation text) by 64 tokens, measured as above from the loaded model on:
the prompt is read through the state in chunks (``prefill_chunk``, 4096 tokens), so the peak
should not grow with the prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_denoisers import _rss_mib, _timed  # noqa: E402

FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

MODELS = {"causal": dict(arch="rwkv7", mixer="causal", objective="ar"),
          "block_causal": dict(arch="rwkv7", mixer="block_causal", objective="diffusion"),
          "transformer": dict(arch="transformer", mixer="causal", objective="ar")}
MODES = ("unchunked", "full", "truncated")


def build(name: str, args):
    import torch
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
    from rwkv_diffusion_rnn.models.transformer import Transformer, TransformerConfig
    torch.manual_seed(0)
    spec = MODELS[name]
    if spec["arch"] == "rwkv7":
        backbone = RWKV7(RWKV7Config(vocab_size=args.vocab, n_layer=args.n_layer, n_embd=args.n_embd,
                                     head_size=args.head_size))
    else:
        backbone = Transformer(TransformerConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_embd=args.n_embd,
                                                 n_head=args.n_embd // args.head_size))
    cfg = DenoiserConfig(arch=spec["arch"], mixer=spec["mixer"], vocab_size=args.vocab, mask_id=args.vocab - 1,
                         latent_prefix_len=0, block_size=16,
                         time_conditioning="none" if spec["objective"] == "ar" else "film")
    return MultimodalRWKVDenoiser(backbone, cfg)


def cell(args) -> dict:
    """One measurement, in this process (the parent runs each in a subprocess)."""
    import torch
    from rwkv_diffusion_rnn.diffusion.chunks import Chunking
    from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
    from rwkv_diffusion_rnn.diffusion.objective import AutoregressiveObjective, DiffusionObjective
    torch.set_num_threads(args.threads)
    if args.mem_limit_gb:       # an allocation past it fails in this cell instead of waking the OOM killer
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    model = build(args.model, args)
    chunking = None if args.mode == "unchunked" else Chunking(args.chunk, args.mode)
    if MODELS[args.model]["objective"] == "ar":
        objective = AutoregressiveObjective(chunking)
    else:
        objective = DiffusionObjective(MaskedDiffusion(mask_id=args.vocab - 1, vocab_size=args.vocab), None,
                                       chunking=chunking)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab - 1, (1, args.n + 1), generator=g)
    batch = {"input_ids": ids[:, 1:], "prev_ids": ids[:, 0], "attention_mask": torch.ones(1, args.n, dtype=torch.bool)}
    base = _rss_mib()

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch, g)
        loss.backward()
    step()
    best = min(_timed(step, torch.device("cpu")) for _ in range(args.repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"tokens_per_s": args.n / best, "peak_mib": peak}


def prompt_cell(args) -> dict:
    """Peak memory and time of one generate call continuing a long prompt (in this process)."""
    import time
    import torch
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.trained import load_trained
    torch.set_num_threads(args.threads)
    trained = load_trained(args.model, device="cpu")
    text = CORPUS.read_text()
    prompt = text[len(text) * 9 // 10:][:args.n]             # the validation split's start
    n_prompt = len(trained.tokenizer.encode(prompt))
    base = _rss_mib()
    t0 = time.perf_counter()
    records = generate(trained=trained, prompt=prompt, length=n_prompt + 64, steps=64, num_samples=1,
                       print_texts=False, progress_bar=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"prompt_tokens": n_prompt, "peak_mib": peak, "seconds": seconds, "new_tokens": len(records[0]["token_ids"]) - n_prompt}


def run_cell(args, model: str, mode: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", "--model", model, "--mode", mode, "--n", str(n)]
    for key in ("threads", "n_layer", "n_embd", "head_size", "vocab", "repeats", "chunk", "mem_limit_gb"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, **FIXED_MMAP)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.cell_timeout:.0f} s"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() or r.returncode == -9 else tail[:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: dict, ns, order) -> str:
    lines = ["| model | reading | " + " | ".join(f"N={n} tok/s | N={n} peak MiB" for n in ns) + " |",
             "|" + "---|" * (2 + 2 * len(ns))]
    for model, mode in order:
        cells = []
        for n in ns:
            r = rows.get(f"{model}/{mode}/{n}", {})
            cells += ([f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}"] if "tokens_per_s" in r
                      else [r.get("error", "-"), "-"])
        lines.append(f"| {model} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--ns", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    p.add_argument("--chunk", type=int, default=1024, help="model.chunk_size of the chunked readings")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cell-timeout", type=float, default=900.0)
    p.add_argument("--mem-limit-gb", type=float, default=14.0, help="address-space limit of a training cell")
    p.add_argument("--out", type=Path, default=Path("eval/out/bench_long_context.md"))
    p.add_argument("--prompt-checkpoints", nargs="*", default=[], help="measure long prompts at generate instead")
    p.add_argument("--prompt-chars", nargs="+", type=int, default=[5000, 50000])
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        print(json.dumps(prompt_cell(args) if args.mode == "prompt" else cell(args)))
        return
    if args.prompt_checkpoints:
        print("| checkpoint | prompt chars | prompt tokens | peak MiB | seconds |\n|---|---|---|---|---|")
        for ckpt in args.prompt_checkpoints:
            for n in args.prompt_chars:
                r = run_cell(args, ckpt, "prompt", n)
                cells = ([str(r["prompt_tokens"]), f"{r['peak_mib']:.0f}", f"{r['seconds']:.1f}"]
                         if "peak_mib" in r else [r.get("error", "-"), "-", "-"])
                print(f"| {ckpt} | {n} | " + " | ".join(cells) + " |", flush=True)
        return
    order = [(m, mode) for m in args.models for mode in args.modes
             if mode == "unchunked" or MODELS[m]["arch"] == "rwkv7"]
    out_json = args.out.with_suffix(".json")
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.ns:
        for model, mode in order:
            key = f"{model}/{mode}/{n}"
            if "tokens_per_s" in rows.get(key, {}):
                continue
            rows[key] = run_cell(args, model, mode, n)
            print(key, rows[key], file=sys.stderr, flush=True)
            text = table(rows, args.ns, order)
            args.out.write_text(text + "\n")
            import torch
            out_json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "chunk": args.chunk,
                                            "rows": rows}, indent=2))
    print(table(rows, args.ns, order))


if __name__ == "__main__":
    main()
