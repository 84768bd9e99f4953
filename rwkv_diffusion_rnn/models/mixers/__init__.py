"""Sequence mixers: how the RWKV-7 blocks read [latent prefix | text].

Each mixer is one small module; ``MIXERS`` maps ``model.mixer`` names to them.
"""

from .base import Fusion, Modulation, run_block
from .bi import BiMixer
from .block_causal import BlockCausalMixer
from .causal import CausalMixer
from .dw_jrt import DWJRTMixer

MIXERS = {
    "causal": CausalMixer,
    "bi": BiMixer,
    "dw_jrt": DWJRTMixer,
    "block_causal": BlockCausalMixer,
}


def build_mixer(name: str, blocks, **kwargs):
    """Builds mixer ``name``; keyword arguments a mixer does not use are ignored."""
    if name not in MIXERS:
        raise ValueError(f"model.mixer={name!r} is not a known mixer; choose one of {sorted(MIXERS)}")
    return MIXERS[name](blocks, **kwargs)


__all__ = ["MIXERS", "build_mixer", "Fusion", "Modulation", "run_block",
           "CausalMixer", "BiMixer", "DWJRTMixer", "BlockCausalMixer"]
