"""``bi_wkv``: one block per layer, its WKV-7 recurrence run left to right and right to left.

Vision-RWKV's Bi-WKV for RWKV-7: each block computes its token-mixing inputs (r, decay, k, v,
the in-context rate a and the gate) once, runs the WKV recurrence over the sequence forward and
over the reversed sequence, and fuses the two outputs before the rest of the time mix (the
per-head GroupNorm, the ``r_k`` bonus of the current token, the gate and the output projection);
the channel mix runs once. A bidirectional layer so costs one block plus one extra scan, where
``bi`` runs the whole block twice (projections and FFN included).

* **Fusion.** ``o_t = o_fwd_t + gate * o_bwd_t``, ``gate`` a learned vector per layer and
  channel (``mixer.gate.<layer>``), initialised to ``bi_wkv_gate_init`` (1: the plain sum). A
  gate rather than a fixed sum because it costs C numbers and one multiply per layer, lets each
  channel learn how much right context it reads (a pretrained backbone's channels were all
  trained on the left alone), and at 0 makes the layer exactly the causal block: a pretrained
  model can start unchanged (``bi_wkv_gate_init=0``), and the tests pin the equivalence.
* **No double count.** The forward output at t already holds token t (``k_t v_t`` enters the
  state before it is read); the backward scan reads the state of positions > t only (its
  receptance one step ahead, so the output at t is the reversed state after t + 1), as
  Vision-RWKV counts the current token once. The bonus term stays the causal block's.
* **v_first.** The value vectors are computed once, so the value residual towards layer 0's
  values (``v_first``) is the same for both scans: one ``v_first``, as in ``causal``.
* **Token shift** (``bi_wkv_shift``): ``left`` keeps the pretrained shift (both scans read the
  same inputs, mixed with the left neighbour; the gate-0 layer is then the causal block);
  ``mean`` mixes with the mean of both neighbours (in the time mix and the channel mix), a
  symmetric reading for a model trained from scratch, no longer causal at gate 0.

The latent prefix is part of the sequence (read both ways like the text). Keeps no recurrent
state (the backward scan needs the whole sequence). Weights are the backbone's, under their
BlinkDL names; the mixer adds only the gates.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..rwkv7 import relu_square, shift_mix
from ...ops.wkv7 import wkv7
from .base import Mixer, Modulation, _modulate, read_layers, register_mixer

SHIFTS = ("left", "mean")


def _mean_shift_mix(x: torch.Tensor, *mus: torch.Tensor):
    """``x + ((x_{t-1} + x_{t+1}) / 2 - x_t) * mu`` for each ``mu`` (zeros beyond both ends)."""
    z = torch.zeros_like(x[:, :1])
    xx = 0.5 * (torch.cat([z, x[:, :-1]], 1) + torch.cat([x[:, 1:], z], 1)) - x
    return tuple(torch.addcmul(x, xx, mu) for mu in mus)


def wkv_both_ways(r, w, k, v, a, b, backend: str = "auto"):
    """``(o_fwd, o_bwd)`` [B, T, H, V]: ``wkv7`` left to right (the causal output), and over the
    reversed sequence with the output at t reading the state of positions t + 1 .. T - 1 only."""
    o_f, _ = wkv7(r, w, k, v, a, b, backend=backend)
    rev = [x.flip(1) for x in (r, w, k, v, a, b)]
    # receptance one step ahead: the reversed output at s then reads the state before position s
    rev[0] = torch.cat([rev[0][:, 1:], torch.zeros_like(rev[0][:, :1])], 1)
    o, _ = wkv7(*rev, backend=backend)
    o_b = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], 1).flip(1)
    return o_f, o_b


def bi_wkv_block(block, x: torch.Tensor, v_first, mod, gate: torch.Tensor, shift: str = "left"):
    """One RWKV-7 block (``RWKV7Block``) with its recurrence run both ways, under optional
    modulation (as :func:`~rwkv_diffusion_rnn.models.mixers.base.run_block`). Returns (x, v_first)."""
    mod = mod or Modulation()
    att, ffn = block.att, block.ffn
    h1 = _modulate(block.ln1(x), mod.shift1, mod.scale1)
    mus = (att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g)
    mixed = shift_mix(h1, None, *mus) if shift == "left" else _mean_shift_mix(h1, *mus)
    (r, w, k, v, a, b, g), v_first = att.wkv_inputs(mixed, v_first)
    o_f, o_b = wkv_both_ways(r, w, k, v, a, b, att.wkv_backend)
    o = o_f + gate.view(r.shape[2], r.shape[3]).to(o_f.dtype) * o_b
    h = att.wkv_output(o.to(x.dtype), r, k, v, g)
    x = x + (h if mod.gate1 is None else mod.gate1 * h)
    h2 = _modulate(block.ln2(x), mod.shift2, mod.scale2)
    if shift == "left":
        h, _ = ffn(h2)
    else:
        kx, = _mean_shift_mix(h2, ffn.x_k)
        h = ffn.value(relu_square(ffn.key(kx)))
    x = x + (h if mod.gate2 is None else mod.gate2 * h)
    return x, v_first


@register_mixer
class BiWKVMixer(Mixer):
    name = "bi_wkv"

    def __init__(self, blocks, n_embd: int, bi_wkv_shift: str = "left", bi_wkv_gate_init: float = 1.0):
        self.check_options(bi_wkv_shift=bi_wkv_shift, bi_wkv_gate_init=bi_wkv_gate_init)
        super().__init__()
        self.shift = bi_wkv_shift
        self.gate = nn.ParameterList(nn.Parameter(torch.full((n_embd,), float(bi_wkv_gate_init)))
                                     for _ in blocks)

    @classmethod
    def check_options(cls, bi_wkv_shift: str = "left", bi_wkv_gate_init: float = 1.0, **_):
        if bi_wkv_shift not in SHIFTS:
            raise ValueError(f"model.bi_wkv_shift={bi_wkv_shift!r}; choose one of {', '.join(SHIFTS)}")
        if isinstance(bi_wkv_gate_init, bool) or not isinstance(bi_wkv_gate_init, (int, float)):
            raise ValueError(f"model.bi_wkv_gate_init={bi_wkv_gate_init!r} must be a number "
                             "(1: the sum of both scans, 0: the causal block)")

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        return read_layers(self, blocks, x, mods, state, return_state, "both ways")

    def layer(self, i: int, block, x, v_first=None, mod=None):
        """Layer ``i`` (block ``block``) read both ways; ``v_first`` as the previous layer returned
        it (None at the first). Returns (x, v_first)."""
        return self.run(bi_wkv_block, block, x, v_first, mod, self.gate[i], self.shift)
