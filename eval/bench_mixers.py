"""Forward+backward time of each mixer relative to ``causal`` (CPU by default).

    python eval/bench_mixers.py --T 1024 --repeats 5

One denoiser per mixer, same backbone sizes; prints a markdown table of median times and the
ratio to ``causal``.
"""
import argparse
import statistics
import time

import torch

from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

MIXERS = [("causal", {}), ("bi", {"bi_fusion": "sum"}), ("bi", {"bi_fusion": "concat"}),
          ("bi", {"bi_fusion": "gated"}), ("bi", {"bi_share_weights": False}),
          ("dw_jrt", {}), ("dw_jrt", {"dw_jrt_learnable_alpha": True}),
          ("block_causal", {"block_size": 16}), ("block_causal", {"block_size": 64})]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--head_size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab - 1, (args.B, args.T), generator=g)
    t, z, s = torch.rand(args.B, generator=g), torch.randn(args.B, 32, generator=g), torch.rand(args.B)
    print(f"# mixers, fwd+bwd, B={args.B} T={args.T} n_layer={args.n_layer} n_embd={args.n_embd} "
          f"head_size={args.head_size}, CPU threads={torch.get_num_threads()}, median of {args.repeats}")
    print("| mixer | options | ms | vs causal |")
    print("|---|---|---:|---:|")
    base = None
    for name, opts in MIXERS:
        torch.manual_seed(0)
        model = build_denoiser(DenoiserConfig(vocab_size=args.vocab, mask_id=args.vocab - 1,
                                              mixer=name, **opts),
                               n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size)

        def step():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(ids, t, z, s)
            (out.logits.float().logsumexp(-1).mean() + out.latent.square().mean()).backward()
            return time.perf_counter() - t0

        step()
        ms = statistics.median(step() for _ in range(args.repeats)) * 1e3
        base = base or ms
        opt = ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"
        print(f"| {name} | {opt} | {ms:.0f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
