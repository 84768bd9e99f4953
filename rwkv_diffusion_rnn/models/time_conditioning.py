"""Time conditioning of the denoiser: timestep embeddings, FiLM and AdaLN-Zero.

The denoiser is told two times: ``t`` (how masked the text is) and ``s`` (how noisy the latent
is), both in [0, 1]. :class:`TimeConditioner` turns them into one conditioning vector ``c``
[B, cond_dim], and each block reads ``c`` through :class:`FiLM` or :class:`AdaLNZero`.

Both modulations end in a zero-initialised linear layer, so a freshly built denoiser starts from
a known function:

* FiLM: ``x * (1 + gamma) + beta`` with ``gamma = beta = 0`` -> the identity.
* AdaLN-Zero with ``identity_init=False`` (DiT): shift = scale = 0 and gate = 0 -> each residual
  branch is switched off and the block is the identity. Right for a model trained from scratch.
* AdaLN-Zero with ``identity_init=True``: the gate is ``1 + raw`` -> shift = scale = 0, gate = 1
  -> the block computes exactly what it computes without conditioning. Right for a pretrained
  backbone, whose output must not change when the conditioning is added.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "TimeConditioner",
    "FiLM",
    "AdaLNZero",
    "AdaLNParams",
    "modulate",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       time_scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (float32) of times ``t`` [B] in [0, 1].

    ``t`` is first multiplied by ``time_scale`` (1000, so that [0, 1] spans the range that the
    usual 1000-step embedding was made for); then ``[cos(t f_k), sin(t f_k)]`` with frequencies
    ``f_k = max_period ** (-k / (dim // 2))``, ``k = 0 .. dim//2 - 1``; odd ``dim`` gets a zero column.
    """
    t = torch.as_tensor(t).float().reshape(-1) * time_scale
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Times [B] -> vectors [B, hidden_size]: sinusoidal embedding, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim, time_scale=self.time_scale)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TimeConditioner(nn.Module):
    """The text time ``t`` and the latent time ``s`` -> one conditioning vector [B, cond_dim].

    Args:
        cond_dim: size of the conditioning vector.
        freq_dim: size of the sinusoidal embeddings.
        latent_time: embed ``s`` as well (False: ``c`` depends on ``t`` only, ``s`` is refused).
        combine: ``"sum"`` adds the two embeddings (as DiT adds time and class);
            ``"concat"`` concatenates them and projects back to ``cond_dim`` with a Linear.
    """

    def __init__(self, cond_dim: int, freq_dim: int = 256, latent_time: bool = True, combine: str = "sum"):
        super().__init__()
        if combine not in ("sum", "concat"):
            raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
        self.latent_time = latent_time
        self.combine = combine
        self.text_embedder = TimestepEmbedder(cond_dim, freq_dim)
        self.latent_embedder = TimestepEmbedder(cond_dim, freq_dim) if latent_time else None
        self.proj = nn.Linear(2 * cond_dim, cond_dim) if (latent_time and combine == "concat") else None

    def forward(self, t: torch.Tensor, s: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` [B] text time, ``s`` [B] latent time (required iff ``latent_time``)."""
        c = self.text_embedder(t)
        if not self.latent_time:
            if s is not None:
                raise ValueError("s: this TimeConditioner was built with latent_time=False; pass s=None")
            return c
        if s is None:
            raise ValueError("s: the latent time is required (use torch.zeros(B) for a clean latent)")
        cs = self.latent_embedder(s)
        if self.combine == "sum":
            return c + cs
        return self.proj(torch.cat([c, cs], dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def _per_token(c: torch.Tensor) -> torch.Tensor:
    # [B, C] conditioning applies to every position: [B, 1, C]; [B, T, C] is already per position.
    return c.unsqueeze(1) if c.dim() == 2 else c


class FiLM(nn.Module):
    """``x * (1 + gamma(c)) + beta(c)`` for normalised ``x`` [B, T, hidden] and ``c`` [B, cond_dim]
    (or per position [B, T, cond_dim]); ``gamma, beta`` come from SiLU then a zero-initialised
    Linear, so at initialisation the module returns ``x`` unchanged."""

    def __init__(self, cond_dim: int, hidden: int):
        super().__init__()
        self.act = nn.SiLU()
        self.proj = nn.Linear(cond_dim, 2 * hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def params(self, c: torch.Tensor):
        """(gamma, beta), each [B, 1, hidden] (or [B, T, hidden] for per-position ``c``)."""
        gamma, beta = _per_token(self.proj(self.act(c))).chunk(2, dim=-1)
        return gamma, beta

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.params(c)
        return modulate(x, beta.to(x.dtype), gamma.to(x.dtype))


class AdaLNParams(NamedTuple):
    """Modulation of one block: for the time-mix (``att``) and channel-mix (``ffn``) paths,
    used as ``x + gate * branch(modulate(norm(x), shift, scale))``. Each is [B, 1, hidden]
    (or [B, T, hidden] for per-position conditioning)."""

    shift_att: torch.Tensor
    scale_att: torch.Tensor
    gate_att: torch.Tensor
    shift_ffn: torch.Tensor
    scale_ffn: torch.Tensor
    gate_ffn: torch.Tensor


class AdaLNZero(nn.Module):
    """Adaptive LayerNorm with zero initialisation: ``c`` -> :class:`AdaLNParams` (6 x hidden).

    One Linear on SiLU(c), weights and bias zero-initialised, gives shift, scale and gate of the
    time-mix and of the channel-mix path. What the block computes at initialisation depends on
    ``identity_init``:

    * ``False`` (DiT's AdaLN-Zero, for training from scratch): gate = raw = 0, so both residual
      branches are switched off and the block is the identity map.
    * ``True`` (for a pretrained backbone): gate = 1 + raw = 1 and shift = scale = 0, so the block
      computes exactly what the pretrained block computes; the conditioning is learnt on top.
    """

    def __init__(self, cond_dim: int, hidden: int, identity_init: bool = False):
        super().__init__()
        self.identity_init = bool(identity_init)
        self.act = nn.SiLU()
        self.proj = nn.Linear(cond_dim, 6 * hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def gate_offset(self) -> float:
        """Added to the raw gate: 1.0 with ``identity_init``, else 0.0."""
        return 1.0 if self.identity_init else 0.0

    def forward(self, c: torch.Tensor) -> AdaLNParams:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = _per_token(self.proj(self.act(c))).chunk(6, dim=-1)
        off = self.gate_offset
        return AdaLNParams(shift_a, scale_a, gate_a + off, shift_f, scale_f, gate_f + off)
