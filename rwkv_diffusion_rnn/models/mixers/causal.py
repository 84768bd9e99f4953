"""``causal``: plain RWKV-7, left to right. The baseline: position i never sees j > i."""

from __future__ import annotations

from .base import Mixer, layer_mods, register_mixer, run_block, run_block_split


@register_mixer
class CausalMixer(Mixer):
    name = "causal"
    carries_state = True
    folds_state = True
    autoregressive = True

    def __init__(self, blocks):
        super().__init__()

    def cache_unit(self):
        return 1    # every position is a boundary: the state after any prefix is all a later call needs

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0, state_at=None):
        """``state_at=k``: the state returned is the one after the first k positions of ``x``."""
        mods = layer_mods(mods, len(blocks))
        v_first, new_state = None, []
        for i, block in enumerate(blocks):
            s_in = state[i] if state is not None else None
            if state_at is not None:
                x, v_first, s = self.run(run_block_split, block, x, v_first, mods[i], s_in, state_at)
            else:
                x, v_first, s = self.run(run_block, block, x, v_first, mods[i], s_in, return_state)
            new_state.append(s)
        return x, (new_state if return_state or state_at is not None else None)
