"""RWKV-7 blocks with attention blocks at chosen layers (``model.arch=hybrid``).

``model.attn_layers=[1, 3]`` puts a bidirectional attention block
(:class:`~rwkv_diffusion_rnn.models.transformer.TransformerBlock`: rotary positions, no mask) at
layers 1 and 3 of ``model.n_layer``; ``model.attn_every=k`` at every k-th layer (k-1, 2k-1, ...);
neither key: every second layer (``DEFAULT_ATTN_EVERY``).
The other layers are an ordinary RWKV-7 of that many blocks, numbered among themselves: the first
RWKV block defines ``v_first`` and holds the embedding norm ``ln0`` wherever the attention blocks
sit, and BlinkDL's depth-dependent initialisation runs over the RWKV blocks alone.

The ``bi`` mixer reads each RWKV layer both ways and fuses (``bi_wkv``: one block with its
recurrence run both ways), and runs each attention block once (it already sees both sides). At equal width an attention block (12 C^2 weights with a 4x MLP)
has about the parameters of an RWKV-7 block (8 C^2 in its channel mix, 4 C^2 in its time mix,
plus LoRAs), so a hybrid and an RWKV-7 of the same ``n_layer`` are of about equal size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .archs import Arch, check_sizes, register_arch
from .mixers import build_mixer, mixer_options
from .mixers.base import MIXERS, Fusion, Mixer, layer_mods, run_block
from .rwkv7 import RWKV7, RWKV7Config
from .transformer import TransformerBlock, TransformerConfig, init_gpt2, rotary, run_attention_block
DEFAULT_ATTN_EVERY = 2      # neither model.attn_layers nor model.attn_every: every second layer


def attention_layers(n_layer: int, attn_layers: Optional[Sequence[int]] = None,
                     attn_every: Optional[int] = None) -> Tuple[int, ...]:
    """The layer indices that are attention blocks, from one of the two keys (neither: every
    ``DEFAULT_ATTN_EVERY``-th layer)."""
    if attn_layers is not None and attn_every is not None:
        raise ValueError("model.arch=hybrid needs exactly one of model.attn_layers (a list of layer "
                         "indices, e.g. [1, 3]) and model.attn_every (k: every k-th layer), or neither "
                         f"(model.attn_every={DEFAULT_ATTN_EVERY}); got attn_layers={list(attn_layers)}, "
                         f"attn_every={attn_every}")
    if attn_layers is None and attn_every is None:
        attn_every = DEFAULT_ATTN_EVERY
    if attn_every is not None:
        if attn_every < 1:
            raise ValueError(f"model.attn_every={attn_every} must be >= 1")
        layers = tuple(range(attn_every - 1, n_layer, attn_every))
    else:
        layers = tuple(sorted(set(int(i) for i in attn_layers)))
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"model.attn_layers={list(attn_layers)} names layers {bad} outside "
                             f"0..{n_layer - 1} (model.n_layer={n_layer})")
    if not layers:
        raise ValueError(f"model.attn_layers / attn_every put no attention block in {n_layer} layers")
    if len(layers) == n_layer:
        raise ValueError(f"model.attn_layers / attn_every make all {n_layer} layers attention: "
                         "that is model.arch=transformer")
    return layers


@dataclass
class HybridConfig:
    vocab_size: int
    n_layer: int = 4
    n_embd: int = 256
    head_size: int = 64
    attn_layers: Tuple[int, ...] = (1, 3)
    wkv_backend: str = "auto"
    rope_base: float = 10000.0

    def __post_init__(self):
        self.attn_layers = attention_layers(self.n_layer, self.attn_layers)
        if self.n_embd % self.head_size:
            raise ValueError(f"model.n_embd={self.n_embd} is not a multiple of model.head_size={self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def is_attention(block: nn.Module) -> bool:
    return isinstance(block, TransformerBlock)


class Hybrid(nn.Module):
    """Embedding, interleaved RWKV-7 / attention blocks, final norm and LM head."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.config = cfg
        n_rwkv = cfg.n_layer - len(cfg.attn_layers)
        core = RWKV7(RWKV7Config(vocab_size=cfg.vocab_size, n_layer=n_rwkv, n_embd=cfg.n_embd,
                                 head_size=cfg.head_size, wkv_backend=cfg.wkv_backend))
        tcfg = TransformerConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                 n_head=cfg.n_head, rope_base=cfg.rope_base)
        rwkv_blocks = iter(core.blocks)
        self.emb = core.emb
        self.blocks = nn.ModuleList(TransformerBlock(tcfg) if i in cfg.attn_layers else next(rwkv_blocks)
                                    for i in range(cfg.n_layer))
        for block in self.blocks:
            if is_attention(block):
                init_gpt2(block, [block], cfg.n_layer)
        self.ln_out = core.ln_out
        self.head = core.head
        self._first_rwkv = next(i for i, b in enumerate(self.blocks) if not is_attention(b))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.blocks[self._first_rwkv].ln0(self.emb(input_ids))


class HybridMixer(Mixer):
    """Runs a hybrid stack over [latent prefix | text]: each RWKV-7 layer read both ways (the
    two-way mixer ``mixer``, :class:`~rwkv_diffusion_rnn.models.mixers.bi.BiMixer` or
    :class:`~rwkv_diffusion_rnn.models.mixers.bi_wkv.BiWKVMixer`, over the RWKV blocks alone, so
    its fusions, gates and any separate backward weights exist only for them; ``options``: its
    options), each attention block once with rotary positions 0..L-1 and no mask. Keeps no
    recurrent state."""

    def __init__(self, blocks, n_embd: int, n_head: int, rope_base: float = 10000.0,
                 bi_fusion: str = "sum", bi_share_weights: bool = True, causal: bool = False,
                 mixer: str = "bi", options: Optional[dict] = None):
        super().__init__()
        self.head_dim, self.rope_base = n_embd // n_head, rope_base
        self.autoregressive = causal       # the AR baseline: RWKV left to right, causal attention
        if not causal:
            rwkv = nn.ModuleList(b for b in blocks if not is_attention(b))
            options = dict(options if options is not None else
                           {"bi_fusion": bi_fusion, "bi_share_weights": bi_share_weights})
            options.setdefault("n_embd", n_embd)
            self.bi = build_mixer(mixer, rwkv, **options)

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        if state is not None or return_state:
            raise ValueError("model.arch=hybrid reads the whole sequence at once and keeps no recurrent "
                             "state: decode without use_cache")
        mods = layer_mods(mods, len(blocks))
        cos, sin = rotary(x.shape[1], self.head_dim, self.rope_base, x.device, x.dtype)
        v_first, j = None, 0
        for i, block in enumerate(blocks):
            if is_attention(block):
                x = self.run(run_attention_block, block, x, cos, sin, mods[i], self.autoregressive)
            elif self.autoregressive:
                x, v_first, _ = self.run(run_block, block, x, v_first, mods[i])
            else:
                x, v_first = self.bi.layer(j, block, x, v_first, mods[i])
                j += 1
        return x, None


def _check(m) -> None:
    check_sizes(m)
    Fusion.check(m.get("bi_fusion", "sum"))
    attention_layers(m["n_layer"], m.get("attn_layers"), m.get("attn_every"))


def _build(m, load=None) -> Hybrid:
    layers = attention_layers(m["n_layer"], m.get("attn_layers"), m.get("attn_every"))
    return Hybrid(HybridConfig(vocab_size=m["vocab_size"], n_layer=m["n_layer"], n_embd=m["n_embd"],
                               head_size=m["head_size"], attn_layers=layers,
                               wkv_backend=m.get("wkv_backend") or "auto"))


def _mixer(backbone: Hybrid, cfg) -> HybridMixer:
    c = backbone.config
    causal = MIXERS[cfg.mixer].autoregressive
    options = None
    if not causal:
        sizes = {"n_embd": c.n_embd, "n_head": c.n_head}
        options = {k: sizes[k] if k in sizes else cfg.mixer_option(k) for k in mixer_options(cfg.mixer)}
        if "bi_anneal_steps" in options:
            options["bi_anneal_steps"] = 0     # annealing is for a pretrained backbone; a hybrid has none
    return HybridMixer(backbone.blocks, c.n_embd, c.n_head, c.rope_base, cfg.bi_fusion, cfg.bi_share_weights,
                       causal=causal, mixer=cfg.mixer, options=options)


# model.arch=hybrid: built from scratch; its attention blocks see both sides at once, so the RWKV
# layers are read as bi reads them, or (the AR baseline) everything reads left to right
register_arch(Arch(name="hybrid", backbone=Hybrid, build=_build, make_mixer=_mixer, mixers=("bi", "causal", "bi_wkv"),
                   keys=("attn_layers", "attn_every"), check=_check))

