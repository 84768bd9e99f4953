"""A pre-norm transformer with rotary positions, the baseline denoiser (``model.arch=transformer``).

In the style of MDLM's DiT: per block ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, the
attention through ``scaled_dot_product_attention`` (flash kernels on GPU) with no mask, so every
position sees both sides (``model.mixer=bi``, the one mixer it takes). The
module has the same parts the denoiser reads from an RWKV-7 backbone (``embed``, ``blocks``,
``ln_out``, ``head``, ``config`` with ``n_layer`` / ``n_embd`` / ``n_head`` / ``vocab_size``), and
:class:`AttentionMixer` runs its blocks with the same per-layer FiLM / AdaLN-Zero
:class:`~rwkv_diffusion_rnn.models.mixers.Modulation` the RWKV blocks get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .archs import Arch, check_sizes, register_arch
from .mixers.base import MIXERS, Mixer, Modulation, _modulate


@dataclass
class TransformerConfig:
    vocab_size: int
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.n_embd={self.n_embd} must be a multiple of model.n_head={self.n_head} "
                             "with an even head size (rotary positions rotate pairs of channels)")


def rotary(T: int, head_dim: int, base: float, device, dtype):
    """cos, sin [T, head_dim / 2] of the rotary position angles."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel pairs (first half, second half) of x [B, H, T, D] by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, causal: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # no mask: every position sees every other; causal: the AR baseline's
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, hidden)
        self.proj = nn.Linear(hidden, cfg.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)


def run_attention_block(block: TransformerBlock, x, cos, sin, mod: Optional[Modulation] = None,
                        causal: bool = False):
    """One block, modulated exactly as :func:`~rwkv_diffusion_rnn.models.mixers.run_block`
    modulates an RWKV-7 block: ``norm(x) * (1 + scale) + shift`` in, ``x + gate * branch`` out."""
    mod = mod or Modulation()
    h = block.attn(_modulate(block.ln1(x), mod.shift1, mod.scale1), cos, sin, causal)
    x = x + (h if mod.gate1 is None else mod.gate1 * h)
    h = block.mlp(_modulate(block.ln2(x), mod.shift2, mod.scale2))
    return x + (h if mod.gate2 is None else mod.gate2 * h)


def _init_linear_embedding(m: nn.Module):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def init_gpt2(module: nn.Module, blocks: Sequence[TransformerBlock], n_layer: int) -> None:
    """GPT-2's initialisation of ``module``: N(0, 0.02) weights, then the residual projections of
    ``blocks`` scaled down by sqrt(2 * n_layer) so that the residual stream's variance does not
    grow with depth."""
    module.apply(_init_linear_embedding)
    for block in blocks:
        for p in (block.attn.proj.weight, block.mlp.proj.weight):
            nn.init.normal_(p, std=0.02 / (2 * n_layer) ** 0.5)


class Transformer(nn.Module):
    """Token embedding, blocks, final norm and LM head (the parts the denoiser uses)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_gpt2(self, self.blocks, cfg.n_layer)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)


class AttentionMixer(Mixer):
    """Runs transformer blocks over [latent prefix | text] with rotary positions 0..L-1 and no
    mask (both sides), or with the causal mask (``causal``: ``model.mixer=causal``, the AR
    baseline, decoded by recomputing the prefix at every token). Keeps no recurrent state."""

    def __init__(self, n_embd: int, n_head: int, rope_base: float = 10000.0, causal: bool = False):
        super().__init__()
        self.head_dim, self.rope_base = n_embd // n_head, rope_base
        self.autoregressive = causal

    def forward(self, blocks: Sequence[TransformerBlock], x: torch.Tensor,
                mods: Optional[Sequence[Modulation]] = None, state=None, return_state: bool = False,
                prefix_len: int = 0):
        if state is not None or return_state:
            raise ValueError("model.arch=transformer keeps no recurrent state: decode without use_cache "
                             "(the state cache is RWKV-7's, for model.mixer=block_causal)")
        cos, sin = rotary(x.shape[1], self.head_dim, self.rope_base, x.device, x.dtype)
        for i, block in enumerate(blocks):
            x = self.run(run_attention_block, block, x, cos, sin, None if mods is None else mods[i],
                         self.autoregressive)
        return x, None


def _build(m, load=None) -> Transformer:
    return Transformer(TransformerConfig(vocab_size=m["vocab_size"], n_layer=m["n_layer"], n_embd=m["n_embd"],
                                         n_head=m["n_embd"] // m["head_size"]))


# model.arch=transformer: a baseline built from scratch; its attention sees both sides at once
# (bi) or, for the AR baseline, the tokens before (causal)
register_arch(Arch(
    name="transformer", backbone=Transformer, build=_build, mixers=("bi", "causal"), check=check_sizes,
    make_mixer=lambda backbone, cfg: AttentionMixer(backbone.config.n_embd, backbone.config.n_head,
                                                    backbone.config.rope_base, causal=MIXERS[cfg.mixer].autoregressive)))

