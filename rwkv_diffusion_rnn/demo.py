"""The main job: ``python -m rwkv_diffusion_rnn.demo``.

Smoke run of the RWKV-7 backbone: writes a tiny random checkpoint in BlinkDL's ``.pth``
layout, loads it with :func:`load_rwkv7`, runs a sequence through it in one pass and in
chunks with the recurrent state carried, and prints the logits and their agreement.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from .pretrained_rwkv import load_rwkv7, save_random_blinkdl_checkpoint


def smoke(seq_len: int = 64, seed: int = 0) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = save_random_blinkdl_checkpoint(Path(d) / "tiny-rwkv7.pth", n_layer=2, n_embd=64,
                                              head_size=32, vocab_size=256, seed=seed)
        model = load_rwkv7(path)
    c = model.config
    print(f"loaded {path.name}: n_layer={c.n_layer} n_embd={c.n_embd} head_size={c.head_size} "
          f"vocab={c.vocab_size} params={sum(p.numel() for p in model.parameters()):,}")
    ids = torch.randint(0, c.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(ids)
        state, parts = None, []
        for chunk in ids.split(seq_len // 4, dim=1):
            out, state = model(chunk, state=state, return_state=True)
            parts.append(out)
    diff = (torch.cat(parts, 1) - logits).abs().max().item()
    print(f"logits {tuple(logits.shape)}; last position, first 8: "
          f"{[round(x, 4) for x in logits[0, -1, :8].tolist()]}")
    print(f"one pass vs 4 chunks with carried state: max |diff| = {diff:.2e}")
    return diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    smoke(args.seq_len, args.seed)


if __name__ == "__main__":
    main()
