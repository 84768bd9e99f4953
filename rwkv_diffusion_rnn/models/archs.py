"""``model.arch``: the networks a denoiser can wrap, each one registry entry with its traits,
its checks and its build.

An entry is defined beside its backbone (``rwkv7`` here, ``transformer``, ``hybrid`` and ``qwen3``
in their model files, which :mod:`~rwkv_diffusion_rnn.models.rwkv_denoiser` imports) and
registered with :func:`register_arch`; validation, the builders and
the denoiser ask the entry, never compare the name. ``build(keys, load)`` makes the backbone from
the ``model.*`` keys: from sizes, or from pretrained weights through ``load``, the function that
``loader`` names (``"module:function"``; the builder resolves it, so an entry may name a loader
in a layer above the models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn

from .mixers import MIXERS, build_mixer, mixer_options, option_defaults
from .mixers.base import Mixer
from .rwkv7 import RWKV7, RWKV7Config


def _no_checks(keys: Mapping) -> None:
    return None


@dataclass(frozen=True)
class Arch:
    name: str
    backbone: type                                     # the backbone class a denoiser of this arch wraps
    build: Callable[[Mapping, Optional[Callable]], nn.Module]    # (model.* keys, the loader) -> backbone
    make_mixer: Callable[[nn.Module, Any], Mixer]   # (backbone, DenoiserConfig) -> how its blocks read
    mixers: Optional[Tuple[str, ...]] = None           # model.mixer values it implements (None: every one)
    pretrained_head: bool = False                      # its pretrained weights hold an LM head (use_pretrained_head)
    attention_bias: bool = False                       # reads an additive attention bias (model.block_attention)
    pretrained_key: Optional[str] = None               # the model.* key naming pretrained weights
    loader: Optional[str] = None                       # "module:function" loading them
    # "module:function" building the backbone from the tensor shapes of weights saved with it
    # (names without "backbone."), so a checkpoint rebuilds without reading the pretrained file
    from_shapes: Optional[str] = None
    needs_pretrained: bool = False                     # built only from pretrained weights (no sizes)
    recurrent: bool = False                            # its mixers' carries_state trait holds (a stack with attention keeps no state)
    keys: Tuple[str, ...] = ()                         # model.* keys only this arch reads
    check: Callable[[Mapping], None] = _no_checks      # checks of its own keys (ValueError naming the key)

    def accepts(self, mixer: str) -> bool:
        return mixer in (self.mixers if self.mixers is not None else MIXERS)

    def carries_state(self, mixer: str) -> bool:
        """Whether ``model.mixer=mixer`` reads left to right with a state that continues across calls."""
        return self.recurrent and self.accepts(mixer) and MIXERS[mixer].carries_state

    def length_key(self, keys: Mapping) -> Optional[str]:
        """The ``model.*`` key whose value the text length must be a multiple of: the mixer's
        block option, or ``block_size`` for an attention bias in blocks; None when any length goes."""
        option = MIXERS[keys["mixer"]].length_option if self.mixers is None else None
        if option is not None:
            return option
        return "block_size" if self.attention_bias and keys.get("block_attention") else None

    def length_multiple(self, keys: Mapping) -> int:
        """The value of :meth:`length_key` in the ``model.*`` keys (the mixer's default where the
        keys lack it); 1 when any length goes."""
        key = self.length_key(keys)
        if key is None:
            return 1
        return int(keys[key] if key in keys else option_defaults(keys["mixer"])[key])


# model.arch -> its entry; filled by register_arch where each arch is defined
ARCHS: Dict[str, Arch] = {}


def register_arch(arch: Arch) -> Arch:
    ARCHS[arch.name] = arch
    return arch


def arch_of(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"model.arch={name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def pretrained_head_wanted(m: Mapping) -> bool:
    """``model.use_pretrained_head``, or its former name ``model.use_rwkv_lm_head`` where that is set."""
    alias = m.get("use_rwkv_lm_head")
    return bool(alias) if alias is not None else bool(m.get("use_pretrained_head"))


def check_sizes(m: Mapping) -> None:
    """The sizes of a network built from scratch: positive, and n_embd a multiple of head_size."""
    for key in ("n_layer", "n_embd", "head_size"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"model.{key}={v!r} must be a positive integer")
    if m["n_embd"] % m["head_size"]:
        raise ValueError(f"model.n_embd={m['n_embd']} must be a multiple of model.head_size={m['head_size']}")


# ---------------------------------------------------------------------------------------------- rwkv7


def _rwkv7_mixer(backbone: RWKV7, cfg) -> Mixer:
    sizes = {"n_embd": backbone.config.n_embd, "n_head": backbone.config.n_head}
    options = {k: sizes[k] if k in sizes else cfg.mixer_option(k) for k in mixer_options(cfg.mixer)}
    return build_mixer(cfg.mixer, backbone.blocks, **options)


def _build_rwkv7(m: Mapping, load: Optional[Callable]) -> RWKV7:
    if m.get("rwkv_name"):
        backbone = load(m["rwkv_name"], filename=m.get("rwkv_filename"), revision=m.get("rwkv_revision"),
                        cache_dir=m.get("cache_dir"), local_files_only=bool(m.get("local_files_only")),
                        wkv_backend=m.get("wkv_backend") or "auto")
        backbone.train()
        return backbone
    return RWKV7(RWKV7Config(vocab_size=m["vocab_size"], n_layer=m.get("n_layer") or 2,
                             n_embd=m.get("n_embd") or 128, head_size=m.get("head_size") or 32,
                             wkv_backend=m.get("wkv_backend") or "auto"))


def _check_rwkv7(m: Mapping) -> None:
    if not m.get("rwkv_name"):
        check_sizes(m)


RWKV7_ARCH = register_arch(Arch(
    name="rwkv7", backbone=RWKV7, build=_build_rwkv7, make_mixer=_rwkv7_mixer, pretrained_head=True, recurrent=True,
    pretrained_key="rwkv_name", keys=("rwkv_name",), check=_check_rwkv7,
    loader="rwkv_diffusion_rnn.weights.pretrained_rwkv:load_rwkv7",
    from_shapes="rwkv_diffusion_rnn.weights.pretrained_rwkv:backbone_from_shapes"))
