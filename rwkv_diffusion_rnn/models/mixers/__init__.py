"""Sequence mixers: how the RWKV-7 blocks read [latent prefix | text].

Each mixer is one small module that registers itself (``@register_mixer``) under its
``model.mixer`` name, with its traits (see :class:`~rwkv_diffusion_rnn.models.mixers.base.Mixer`).
A mixer's constructor signature (after ``blocks``) is the list of options it takes.
"""

import inspect

from .base import MIXERS, Fusion, Mixer, Modulation, register_mixer, run_block
from .bi import BiMixer
from .bi_wkv import BiWKVMixer
from .block_causal import BlockCausalMixer
from .causal import CausalMixer
from .dw_jrt import DWJRTMixer

# constructor arguments the backbone supplies (its sizes), not config keys
SIZES = ("n_embd", "n_head")


def mixer_class(name: str):
    """The mixer registered as ``model.mixer=name``."""
    if name not in MIXERS:
        raise ValueError(f"model.mixer={name!r} is not a known mixer; choose one of {sorted(MIXERS)}")
    return MIXERS[name]


def mixer_options(name: str):
    """The names of the options mixer ``name`` takes (its constructor's arguments after ``blocks``)."""
    return tuple(inspect.signature(mixer_class(name)).parameters)[1:]


def option_defaults(name: str) -> dict:
    """The options of mixer ``name`` read from ``model.*`` keys, with their defaults (the sizes
    the backbone supplies left out)."""
    params = list(inspect.signature(mixer_class(name)).parameters.values())[1:]
    return {p.name: p.default for p in params if p.name not in SIZES}


def build_mixer(name: str, blocks, **options):
    """Builds mixer ``name`` with ``options``; an option the mixer does not take is refused."""
    unknown = set(options) - set(mixer_options(name))
    if unknown:
        raise TypeError(f"model.mixer={name} takes {list(mixer_options(name))}, not {sorted(unknown)}")
    return MIXERS[name](blocks, **options)


__all__ = ["MIXERS", "SIZES", "build_mixer", "mixer_class", "mixer_options", "option_defaults", "register_mixer",
           "Fusion", "Mixer", "Modulation", "run_block", "CausalMixer", "BiMixer", "BiWKVMixer", "DWJRTMixer", "BlockCausalMixer"]
