"""Forward+backward time of the WKV-7 backends.

    python eval/bench_wkv7.py                       # CPU: torch (chunked) vs recurrent
    python eval/bench_wkv7.py --device cuda         # GPU: fla vs torch
    python eval/bench_wkv7.py --T 4096 --profile    # also: where the torch backend's time goes

On glibc, MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 keeps freed memory
in the process (no page zeroing on every call); eval/README.md gives figures with and without.

Prints a markdown table of median times over --repeats runs, the speed-up, and the time per
token (flat per-token time = linear in T).
"""
import argparse
import math
import statistics
import sys
import time

import torch

from rwkv_diffusion_rnn.ops.wkv7 import wkv7, wkv7_torch


def inputs(B, T, H, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    rn = lambda: torch.randn(B, T, H, K, generator=g)  # noqa: E731
    r, k, v = rn(), rn() * 0.5, rn()
    w = -math.exp(-0.5) * torch.sigmoid(rn())
    kk = torch.nn.functional.normalize(rn(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rn())
    return [x.to(device, dtype).requires_grad_(True) for x in (r, w, k, v, a, b)]


def fwd_bwd(fn, xs, device):
    for x in xs:
        x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    o, S = fn(*xs)
    (o.float().square().sum() + S.float().square().sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help="chunk size of the torch backend")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, profile one forward+backward of the first backend at the "
                         "largest T and print its most expensive operators")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(torch.get_num_threads())
    if args.device == "cuda":
        names = ("fla", "torch")
    else:
        names = ("torch", "recurrent")

    def runner(name):
        if name == "torch" and args.chunk:
            return lambda *xs: wkv7_torch(*xs, output_final_state=True, chunk_size=args.chunk)
        return lambda *xs: wkv7(*xs, output_final_state=True, backend=name)

    print(f"# WKV-7 forward+backward, B={args.B} H={args.H} K=V={args.K}, {args.dtype}, "
          f"device={args.device}, threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"| T | {names[0]} ms | {names[1]} ms | speed-up | {names[0]} us/token | {names[1]} us/token |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T in args.T:
        xs = inputs(args.B, T, args.H, args.K, args.device, dtype)
        res = {}
        for name in names:
            fn = runner(name)
            fwd_bwd(fn, xs, args.device)  # warm-up
            res[name] = statistics.median(fwd_bwd(fn, xs, args.device) for _ in range(args.repeats))
        a, b = res[names[0]], res[names[1]]
        print(f"| {T} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.1f}x | "
              f"{a * 1e6 / T:.1f} | {b * 1e6 / T:.1f} |", flush=True)
    if args.profile:
        profile(runner(names[0]), inputs(args.B, max(args.T), args.H, args.K, args.device, dtype),
                args.device, names[0])


def profile(fn, xs, device, name):
    """Self time per operator and input shape for one forward+backward (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fwd_bwd(fn, xs, device)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(*xs)
        fwd = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=True) as prof:
        total = fwd_bwd(fn, xs, device)
    print(f"\n# {name}: forward alone {fwd * 1e3:.1f} ms; profiled forward+backward {total * 1e3:.1f} ms")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
