"""Sequence mixers: how the RWKV-7 blocks read [latent prefix | text].

Each mixer is one small module; ``MIXERS`` maps ``model.mixer`` names to them. A mixer's
constructor signature (after ``blocks``) is the list of options it takes.
"""

import inspect

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


def mixer_options(name: str):
    """The names of the options mixer ``name`` takes (its constructor's arguments after ``blocks``)."""
    if name not in MIXERS:
        raise ValueError(f"model.mixer={name!r} is not a known mixer; choose one of {sorted(MIXERS)}")
    return tuple(inspect.signature(MIXERS[name]).parameters)[1:]


def build_mixer(name: str, blocks, **options):
    """Builds mixer ``name`` with ``options``; an option the mixer does not take is refused."""
    unknown = set(options) - set(mixer_options(name))
    if unknown:
        raise TypeError(f"model.mixer={name} takes {list(mixer_options(name))}, not {sorted(unknown)}")
    return MIXERS[name](blocks, **options)


__all__ = ["MIXERS", "build_mixer", "mixer_options", "Fusion", "Modulation", "run_block",
           "CausalMixer", "BiMixer", "DWJRTMixer", "BlockCausalMixer"]
