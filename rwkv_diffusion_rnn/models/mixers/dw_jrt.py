"""``dw_jrt``: depth-wise state passing. The final WKV state of layer l, which has read the whole
sequence, is the initial state of layer l+1, so from the second layer on every position sees
the entire sequence through that state.

    S0_{l+1} = dw_jrt_scale * S_final_l                               (plain)
    S0_{l+1} = dw_jrt_scale * sigmoid(alpha_{l+1,h}) * (1 - w_{l+1}) * S_final_l   (learnable)

With ``dw_jrt_learnable_alpha`` each layer and head has a learnable strength alpha (initial
``dw_jrt_alpha_init``; 0 means strength 1/2) and the injection is weighted per key channel by
``1 - w``, w the layer's base decay ``exp(-exp(-0.5) * sigmoid(w0))``, so channels that forget
fast take in more. Only layers >= ``dw_jrt_layer_start`` (and > 0) receive a state.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from ..rwkv7 import DECAY_SCALE
from .base import Mixer, layer_mods, register_mixer, run_block


@register_mixer
class DWJRTMixer(Mixer):
    name = "dw_jrt"

    def __init__(self, blocks, n_head: int, dw_jrt_scale: float = 1.0,
                 dw_jrt_learnable_alpha: bool = False, dw_jrt_alpha_init: float = 0.0,
                 dw_jrt_layer_start: int = 1):
        super().__init__()
        self.scale = dw_jrt_scale
        self.layer_start = max(1, dw_jrt_layer_start)
        self.learnable = dw_jrt_learnable_alpha
        if dw_jrt_learnable_alpha:
            self.alpha = nn.Parameter(torch.full((len(blocks), n_head), float(dw_jrt_alpha_init)))

    def injection(self, l: int, block, S: torch.Tensor) -> torch.Tensor:
        S = S * self.scale
        if self.learnable:
            B, H, K, V = S.shape
            base_decay = torch.exp(-DECAY_SCALE * torch.sigmoid(block.att.w0.float())).view(H, K)
            weight = torch.sigmoid(self.alpha[l]).view(H, 1) * (1 - base_decay)       # [H, K]
            S = S * weight.view(1, H, K, 1).to(S.dtype)
        return S

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        if state is not None or return_state:
            raise ValueError("model.mixer=dw_jrt passes state between layers, not along time; "
                             "it cannot carry a generation cache (use block_causal)")
        mods = layer_mods(mods, len(blocks))
        v_first, S_prev = None, None
        for l, block in enumerate(blocks):
            init = None
            if S_prev is not None and l >= self.layer_start:
                init = self.injection(l, block, S_prev)
            x, v_first, st = self.run(run_block, block, x, v_first, mods[l], wkv_init=init, return_state=True)
            S_prev = st.wkv
        return x, None
