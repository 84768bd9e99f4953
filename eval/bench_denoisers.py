"""Training speed and memory of the denoiser architectures side by side (CPU or GPU).

    python eval/bench_denoisers.py                                   # the table of eval/README.md
    python eval/bench_denoisers.py --ns 512 2048 --archs rwkv7_bi    # a quick probe
    python eval/bench_denoisers.py --ns 32768 --archs rwkv7_bi --repeats 1
    python eval/bench_denoisers.py --keep-freed-memory               # glibc keeps freed memory
    python eval/bench_denoisers.py --grad-checkpointing --ns 4096    # blocks recomputed in backward

One denoiser per row, random weights, text only (no latent prefix), FiLM time conditioning, at
``--n-layer`` 4, ``--n-embd`` 256, heads of 64 channels, vocabulary ``--vocab`` 1000:

* ``rwkv7_bi``: RWKV-7 blocks read both ways (``model.mixer=bi``, shared weights, sum fusion),
  WKV through ``--backend`` (``auto``: fla's chunked kernels on CUDA, the chunked torch path on CPU);
* ``rwkv7_bi_wkv``: the same blocks, each run once with its WKV recurrence run both ways inside
  (``model.mixer=bi_wkv``, left token shift, per-channel gate);
* ``transformer``: the bidirectional transformer (``model.arch=transformer``: rotary positions,
  ``scaled_dot_product_attention`` without a mask);
* ``hybrid``: RWKV-7 read both ways at layers 0 and 2, attention at 1 and 3 (``model.arch=hybrid
  model.attn_layers=[1,3]``);
* ``qwen3``: transformers' Qwen3Model with random weights run without its causal mask
  (``model.arch=qwen3``; SDPA, grouped MLP of ``8/3 x`` width, heads of ``--head-size``).

Each cell (architecture, N) runs in a fresh subprocess so that its peak memory is its own: one
warm-up call, then ``--repeats`` forward+backward passes of one sequence of N tokens (a
log-sum-exp of the logits as the loss), the fastest reported as tokens/s; ``peak MiB`` is the
process's peak resident memory (``ru_maxrss``) minus its resident memory once the model is built
(CPU), or ``torch.cuda.max_memory_allocated`` (GPU). A cell that runs out of memory or past
``--cell-timeout`` seconds is reported as such, not retried. ``sample ms/step``: one
:func:`~rwkv_diffusion_rnn.diffusion.sampling.generate_text` call of ``--sample-steps`` (50)
denoising steps on an all-mask canvas of ``--sample-n`` (512) positions, wall time / steps.

Writes the markdown table to stdout and ``--out`` (default ``eval/out/bench_denoisers.md``), the
numbers with the torch version, threads and device to ``<out>.json``; both rewritten after each
cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ARCHS = {"rwkv7_bi": dict(arch="rwkv7", mixer="bi"), "rwkv7_bi_wkv": dict(arch="rwkv7", mixer="bi_wkv"),
         "transformer": dict(arch="transformer", mixer="bi"),
         "hybrid": dict(arch="hybrid", mixer="bi"), "qwen3": dict(arch="qwen3", mixer="bi")}


def build(name: str, n_layer: int, n_embd: int, head_size: int, vocab: int, backend: str):
    import torch
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
    from rwkv_diffusion_rnn.models.transformer import Transformer, TransformerConfig
    torch.manual_seed(0)
    spec = ARCHS[name]
    if spec["arch"] == "rwkv7":
        backbone = RWKV7(RWKV7Config(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=head_size,
                                     wkv_backend=backend))
    elif spec["arch"] == "hybrid":
        from rwkv_diffusion_rnn.models.hybrid import Hybrid, HybridConfig, attention_layers
        backbone = Hybrid(HybridConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=head_size,
                                       attn_layers=attention_layers(n_layer, attn_every=2), wkv_backend=backend))
    elif spec["arch"] == "qwen3":
        from transformers import Qwen3Config, Qwen3Model
        from rwkv_diffusion_rnn.models.qwen3 import Qwen3Backbone
        qcfg = Qwen3Config(vocab_size=vocab, hidden_size=n_embd, intermediate_size=round(8 * n_embd / 3),
                           num_hidden_layers=n_layer, num_attention_heads=n_embd // head_size,
                           num_key_value_heads=n_embd // head_size, head_dim=head_size,
                           max_position_embeddings=1 << 16)
        qcfg._attn_implementation = "sdpa"
        backbone = Qwen3Backbone(Qwen3Model(qcfg))
    else:
        backbone = Transformer(TransformerConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd,
                                                 n_head=n_embd // head_size))
    cfg = DenoiserConfig(arch=spec["arch"], mixer=spec["mixer"], vocab_size=vocab, mask_id=vocab - 1,
                         latent_prefix_len=0, time_conditioning="film")
    return MultimodalRWKVDenoiser(backbone, cfg)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cell(args) -> dict:
    """One measurement, in this process (the parent runs each in a subprocess)."""
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.arch, args.n_layer, args.n_embd, args.head_size, args.vocab, args.backend).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    allocator = {"malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if args.mode == "sample":
        from rwkv_diffusion_rnn.diffusion.sampling import generate_text
        model.eval()
        run = lambda: generate_text(model, length=args.n, steps=args.sample_steps, temperature=1.0,  # noqa: E731
                                    generator=torch.Generator(device=device).manual_seed(0))
        run()
        best = min(_timed(run, device) for _ in range(args.repeats))
        return {"params": params, "sample_ms_per_step": 1000 * best / args.sample_steps, **allocator}
    base = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, args.vocab - 1, (1, args.n), device=device)
    t = torch.rand(1, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, t).logits.float().logsumexp(-1).sum().backward()
    step()
    best = min(_timed(step, device) for _ in range(args.repeats))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    return {"params": params, "tokens_per_s": args.n / best, "peak_mib": peak, **allocator}


def _timed(fn, device) -> float:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# glibc returns every freed block of 32 MB or more to the kernel, which zeroes the pages again at
# the next allocation; at long N that costs more than the arithmetic (eval/notes/denoiser_speed.md).
# These keep freed memory in the process instead, at the price of a higher peak.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def run_cell(args, arch: str, n: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--cell", "--arch", arch, "--n", str(n), "--mode", mode]
    for key in ("threads", "device", "n_layer", "n_embd", "head_size", "vocab", "backend", "repeats", "sample_steps"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
    env = dict(os.environ, **(KEEP_FREED_MEMORY if args.keep_freed_memory else {}))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.cell_timeout} s"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() or r.returncode == -9 else tail[:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows, ns, archs, sample) -> str:
    head = "| denoiser | params | " + " | ".join(f"N={n} tok/s | N={n} peak MiB" for n in ns) + \
           (f" | sample ms/step (N={sample['n']}, {sample['steps']} steps)" if sample else "") + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(ns) + (1 if sample else 0))]
    for a in archs:
        cells, params = [], "-"
        for n in ns:
            r = rows.get(f"{a}/{n}", {})
            params = r.get("params", params)
            cells += ([f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}"] if "tokens_per_s" in r
                      else [r.get("error", "-"), "-"])
        if sample:
            r = rows.get(f"{a}/sample", {})
            params = r.get("params", params)
            cells.append(f"{r['sample_ms_per_step']:.1f}" if "sample_ms_per_step" in r else r.get("error", "-"))
        lines.append(f"| {a} | {params:,} | " + " | ".join(cells) + " |" if params != "-" else
                     f"| {a} | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--ns", nargs="+", type=int, default=[512, 2048, 8192, 32768])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sample-n", type=int, default=512)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--no-sample", action="store_true", help="skip the sampling column")
    p.add_argument("--cell-timeout", type=float, default=900.0)
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward (training.grad_checkpointing=true)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="run the cells with glibc keeping freed memory (" +
                        " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ")")
    p.add_argument("--out", type=Path, default=Path("eval/out/bench_denoisers.md"))
    # one cell, run by the parent in a subprocess
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        print(json.dumps(cell(args)))
        return 0
    import torch
    rows = {}
    sample = None if args.no_sample else {"n": args.sample_n, "steps": args.sample_steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
            "cpu": platform.processor() or platform.machine(), "sizes": vars(args) | {"out": str(args.out)}}
    jobs = [(a, n, "train") for n in sorted(args.ns) for a in args.archs]
    jobs += [(a, args.sample_n, "sample") for a in args.archs] if sample else []
    for a, n, mode in jobs:
        key = f"{a}/{n}" if mode == "train" else f"{a}/sample"
        rows[key] = run_cell(args, a, n, mode)
        print(f"{key}: {rows[key]}", file=sys.stderr, flush=True)
        text = table(rows, sorted(args.ns), args.archs, sample)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
