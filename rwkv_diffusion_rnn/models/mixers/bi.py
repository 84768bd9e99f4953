"""``bi``: every layer reads the sequence left to right and right to left, then fuses.

The backward pass runs the same block on the flipped sequence (its token shift then looks at
the right neighbour). Its weights are shared with the forward pass, or a separate copy
initialised from the same (pretrained) weights (``bi_share_weights=False``). Each direction
keeps its own ``v_first``. Cost: two scans per layer, about 2x ``causal``.

With shared weights and short inputs (B * T <= ``BATCH_BOTH_MAX_TOKENS``) both directions run
as one call on a batch of 2B rows, [x; x.flip(1)] (every operation of a block acts on each row
alone, so this is the two-call result up to float rounding): half the calls and half the WKV
state-pass steps, about 10% faster at 512 tokens. Longer inputs keep two calls: there the
doubled temporaries cross glibc's 32 MB mmap threshold and every one of them costs fresh
zeroed pages (measured 8-13% slower at 4096 and 8192 tokens, neutral at 2048; see
eval/notes/denoiser_speed.md).

Bidirectional annealing (``bi_anneal_steps``) phases the right-to-left reading in over training
(:class:`~rwkv_diffusion_rnn.models.mixers.base.TwoWay`).

With shared weights and ``sum`` fusion (and no position embedding or latent prefix) the mixer
is exactly the same function of a text and of its reversal: the model cannot tell reading
order, so about half of its unconditional samples come out written right to left (measured in
eval/README.md, "Generation"). Separate weights, or the ``concat`` / ``gated`` fusions, break
the symmetry.
"""

from __future__ import annotations

import copy

import torch

from .base import Fusion, Modulation, TwoWay, read_layers, register_mixer, run_block


# Largest B * T (tokens of one direction) read as one batch of both directions.
BATCH_BOTH_MAX_TOKENS = 1024


@register_mixer
class BiMixer(TwoWay):
    name = "bi"

    def __init__(self, blocks, n_embd: int, bi_fusion: str = "sum", bi_share_weights: bool = True,
                 bi_anneal_steps: int = 0):
        self.check_options(bi_fusion=bi_fusion, bi_anneal_steps=bi_anneal_steps)
        super().__init__(blocks, n_embd, bi_fusion, bi_anneal_steps)
        self.share = bi_share_weights
        if not bi_share_weights:
            self.backward_blocks = copy.deepcopy(blocks)

    @classmethod
    def check_options(cls, bi_fusion: str = "sum", bi_anneal_steps: int = 0, **_):
        Fusion.check(bi_fusion)
        cls.check_anneal(bi_anneal_steps)

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        return read_layers(self, blocks, x, mods, state, return_state, "at once")

    def layer(self, i: int, block, x, v_first=None, mod=None):
        """Layer ``i`` (forward-direction block ``block``) read both ways and fused.

        ``v_first`` is what the previous layer returned (None at the first layer): each
        direction's value residual, carried from the first block to the later ones (the
        [2B, T, C] residual of the stacked batch when both directions run as one call, else a
        pair)."""
        B = x.shape[0]
        if self.share and B * x.shape[1] <= BATCH_BOTH_MAX_TOKENS:
            if isinstance(v_first, tuple):
                v_first = torch.cat(v_first)
            mod2 = mod.tile(2) if isinstance(mod, Modulation) else None
            y, v_first, _ = self.run(run_block, block, torch.cat([x, x.flip(1)]), v_first, mod2)
            return self._fuse(i, x, y[:B], y[B:].flip(1)), v_first
        if isinstance(v_first, torch.Tensor):
            v_first = (v_first[:B], v_first[B:])
        back = block if self.share else self.backward_blocks[i]
        vf_f, vf_b = v_first if v_first is not None else (None, None)
        y_f, vf_f, _ = self.run(run_block, block, x, vf_f, mod)
        y_b, vf_b, _ = self.run(run_block, back, x.flip(1), vf_b, mod)
        return self._fuse(i, x, y_f, y_b.flip(1)), (vf_f, vf_b)
