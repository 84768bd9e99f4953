"""``block_causal``: bidirectional inside blocks of ``block_size`` tokens, causal across blocks.

Each layer runs a forward scan over the whole sequence (state flows from block to block) and a
backward scan inside each block only (zero state at each block's right edge), then fuses the two
as ``bi`` does. A position sees everything to its left and its own block to its right. The
latent prefix (``prefix_len`` tokens) is a block of its own, before the text.

Bidirectional annealing (``bi_anneal_steps``) phases the right-to-left reading inside blocks in
over training (:class:`~rwkv_diffusion_rnn.models.mixers.base.TwoWay`): at its first step the
model is the forward scan alone, a pretrained causal model exactly.

Clean context (``block_context=clean``, BD3-LM's training): in training and scoring, block b's
forward scan starts from the state the *clean* text of blocks < b leaves (``forward(...,
context=<the clean sequence>)``), not from its noised version, as in decoding, where the blocks
before the current one are committed. The clean text runs through the same layers (a second
stream, about twice the work); at block size 1 with the text shifted (``shift_logits``) every
token is then predicted from the clean tokens before it alone: an AR model. Without a context
(decoding, or ``block_context=noisy``) the model reads the sequence it is given, which is the
same computation when the blocks before the current one are clean.

Because nothing flows right to left across blocks, the forward-scan state after the committed
blocks is all a later block needs: ``forward(..., state=cache, return_state=True)`` on the next
blocks gives the same result as running everything again. ``forward(..., state_at=k)`` returns
the state after the first k positions (a block boundary) of a call that also computes the blocks
after them, so a decoder can fold a finished block and denoise the next one in one call.
"""

from __future__ import annotations

import copy

import torch

from ..rwkv7 import LayerState
from .base import Fusion, TwoWay, layer_mods, register_mixer, run_block, run_block_split

BLOCK_CONTEXTS = ("noisy", "clean")


@register_mixer
class BlockCausalMixer(TwoWay):
    name = "block_causal"
    carries_state = True
    folds_state = True
    length_option = "block_size"

    def __init__(self, blocks, n_embd: int, block_size: int = 16, bi_fusion: str = "sum",
                 bi_share_weights: bool = True, bi_anneal_steps: int = 0, block_context: str = "noisy"):
        self.check_options(block_size=block_size, bi_fusion=bi_fusion, bi_anneal_steps=bi_anneal_steps,
                           block_context=block_context)
        super().__init__(blocks, n_embd, bi_fusion, bi_anneal_steps)
        self.block_size = block_size
        self.reads_context = block_context == "clean"
        self.share = bi_share_weights
        if not bi_share_weights:
            self.backward_blocks = copy.deepcopy(blocks)

    @classmethod
    def check_options(cls, block_size: int = 16, bi_fusion: str = "sum", bi_anneal_steps: int = 0,
                      block_context: str = "noisy", **_):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"model.block_size={block_size!r} must be an integer >= 1")
        if block_context not in BLOCK_CONTEXTS:
            raise ValueError(f"model.block_context={block_context!r}; choose one of {', '.join(BLOCK_CONTEXTS)}")
        Fusion.check(bi_fusion)
        cls.check_anneal(bi_anneal_steps)

    def cache_unit(self):
        return self.block_size     # nothing flows right to left across blocks

    def _segments(self, T: int, prefix_len: int):
        """(start, length, n_blocks) runs of equal-size blocks covering [0, T)."""
        segs = []
        if prefix_len:
            segs.append((0, prefix_len, 1))
        rest = T - prefix_len
        n_full, tail = divmod(rest, self.block_size)
        if n_full:
            segs.append((prefix_len, self.block_size, n_full))
        if tail:
            segs.append((prefix_len + n_full * self.block_size, tail, 1))
        return segs

    def _backward(self, block, x, mod, v_first_parts, segs):
        B, _, C = x.shape
        outs, new_vf = [], []
        for j, (start, length, n) in enumerate(segs):
            xs = x[:, start:start + length * n].reshape(B * n, length, C).flip(1)
            m = mod.repeat(n) if mod is not None else None
            y, vf, _ = self.run(run_block, block, xs, v_first_parts[j], m)
            outs.append(y.flip(1).reshape(B, length * n, C))
            new_vf.append(vf)
        return torch.cat(outs, dim=1), new_vf

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0, context=None,
                state_at=None):
        """``state_at=k`` (a block boundary): the state returned is the forward scan's after the first
        k positions of ``x``, while every position's output is computed (fold-and-step decoding)."""
        mods = layer_mods(mods, len(blocks))
        if context is not None:
            if state_at is not None:
                raise ValueError("state_at folds decoded blocks; a clean context is read in training and scoring")
            return self._with_context(blocks, x, context, mods, prefix_len, state, return_state)
        back = blocks if self.share else self.backward_blocks
        segs = self._segments(x.shape[1], prefix_len)
        vf_f, vf_b = None, [None] * len(segs)
        new_state = []
        for i, block in enumerate(blocks):
            s_in = state[i] if state is not None else None
            if state_at is not None:
                y_f, vf_f, st = self.run(run_block_split, block, x, vf_f, mods[i], s_in, state_at)
            else:
                y_f, vf_f, st = self.run(run_block, block, x, vf_f, mods[i], s_in, return_state)
            y_b, vf_b = self._backward(back[i], x, mods[i], vf_b, segs)
            x = self._fuse(i, x, y_f, y_b)
            new_state.append(st)
        return x, (new_state if return_state or state_at is not None else None)

    def _with_context(self, blocks, x, context, mods, prefix_len, state=None, return_state=False):
        """Every block of ``x`` read forward from the state that ``context`` (the clean sequence,
        the same shape) leaves at the block's start; ``context`` itself is read as without one.
        ``state`` / ``return_state``: the clean stream's state before / after the call (a long
        sequence read in chunks carries the clean text's state, as decoding does)."""
        B, T, C = x.shape
        back = blocks if self.share else self.backward_blocks
        segs = self._segments(T, prefix_len)
        L = self.block_size
        vf_c = vf_x = None
        vf_cb, vf_xb = [None] * len(segs), [None] * len(segs)
        new_state = []
        for i, block in enumerate(blocks):
            mod = mods[i]
            # the clean stream in one pass, with the states before each text block (prefix_len,
            # prefix_len + block_size, ...; the prefix block starts from the zero state)
            y_cf, vf_c, inits = self.run(run_block, block, context, vf_c, mod,
                                         None if state is None else state[i], state_starts=(prefix_len, L))
            if return_state:     # the last block read once more from its start, to the state after it
                last = segs[-1][0] + segs[-1][1] * (segs[-1][2] - 1)
                first = LayerState(*(f[-1] for f in inits)) if last >= prefix_len else \
                    (None if state is None else state[i])
                _, _, end = self.run(run_block, block, context[:, last:], vf_c[:, last:], mod, first, True)
                new_state.append(end)
            # the noisy blocks, all blocks of one size at once, each from its clean start state
            ys, vfs, k = [], [], 0
            for start, length, n in segs:
                rows = x[:, start:start + length * n].reshape(B * n, length, C)
                vf_in = None if vf_x is None else vf_x[:, start:start + length * n].reshape(B * n, length, -1)
                init = None
                if start >= prefix_len:                 # text blocks k .. k + n - 1
                    init = LayerState(*(f[k:k + n].transpose(0, 1).reshape(B * n, *f.shape[2:]) for f in inits))
                    k += n
                y, vf, _ = self.run(run_block, block, rows, vf_in, None if mod is None else mod.repeat(n), init)
                ys.append(y.reshape(B, length * n, C))
                vfs.append(vf.reshape(B, length * n, -1))
            vf_x = torch.cat(vfs, 1) if vf_x is None else vf_x
            y_cb, vf_cb = self._backward(back[i], context, mod, vf_cb, segs)
            y_xb, vf_xb = self._backward(back[i], x, mod, vf_xb, segs)
            context = self._fuse(i, context, y_cf, y_cb)
            x = self._fuse(i, x, torch.cat(ys, 1), y_xb)
        return x, (new_state if return_state else None)
