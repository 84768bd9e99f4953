"""RWKV-7 ("x070", Goose): blocks and the causal language model.

Parameter names and shapes are those of BlinkDL's checkpoints (``blocks.0.att.x_r`` is
``[1, 1, C]``, ``blocks.0.att.r_k`` is ``[H, N]``, linear weights are ``[out, in]``), so a
BlinkDL ``.pth`` state dict loads with ``load_state_dict`` and means what it meant.

The forward pass follows BlinkDL's RWKV-7 time-mix exactly: token shift, LoRA decay / in-context
learning rate ``a`` / value residual / gate, ``k_k`` normalisation, ``k_a``, the ``v_first``
residual from layer 0, the ``r_k`` bonus and a per-head GroupNorm (eps 64e-5). The WKV
recurrence itself is :func:`rwkv_diffusion_rnn.ops.wkv7.wkv7` (fla on CUDA, chunked torch on CPU).

State: one ``LayerState`` per layer (time-mix shift ``[B, C]``, WKV state ``[B, H, K, V]`` in
float32, channel-mix shift ``[B, C]``), so a long sequence can be fed in pieces and generation can
go token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops.wkv7 import wkv7

# log decay = -DECAY_SCALE * sigmoid(.): per-token decay in (exp(-e^-0.5), 1) = (0.545, 1)
DECAY_SCALE = math.exp(-0.5)
LN_X_EPS = 64e-5


def _lora_dim(n_embd: int, factor: float, power: float) -> int:
    """BlinkDL's default LoRA width: a multiple of 32, at least 32."""
    return max(32, int(round((factor * (n_embd ** power)) / 32) * 32))


@dataclass
class RWKV7Config:
    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: Optional[int] = None          # default 4 * n_embd
    decay_lora: Optional[int] = None       # default: BlinkDL's formulas from n_embd
    aaa_lora: Optional[int] = None
    mv_lora: Optional[int] = None
    gate_lora: Optional[int] = None
    wkv_backend: str = "auto"              # see rwkv_diffusion_rnn.ops.wkv7.BACKENDS

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"RWKV7Config: n_embd={self.n_embd} is not a multiple of "
                             f"head_size={self.head_size}")
        C = self.n_embd
        self.dim_ffn = self.dim_ffn or 4 * C
        self.decay_lora = self.decay_lora or _lora_dim(C, 1.8, 0.5)
        self.aaa_lora = self.aaa_lora or _lora_dim(C, 1.8, 0.5)
        self.mv_lora = self.mv_lora or _lora_dim(C, 1.3, 0.5)
        self.gate_lora = self.gate_lora or _lora_dim(C, 0.6, 0.8)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


class LayerState(NamedTuple):
    att_shift: torch.Tensor   # [B, C]   last input of the time-mix
    wkv: torch.Tensor         # [B, H, K, V] float32
    ffn_shift: torch.Tensor   # [B, C]   last input of the channel-mix


def last_position(x: torch.Tensor) -> torch.Tensor:
    """``x[:, -1]`` [B, C] in its own storage: a carried state outlives its call (a chunked window
    keeps every chunk's state for the backward), and a view would keep all of ``x`` with it."""
    return x[:, -1].clone()


def token_shift(x: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    """x_{t-1} - x_t, with ``prev`` (or zeros) standing in for x_{-1}."""
    if prev is None:
        prev = torch.zeros_like(x[:, 0])
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1) - x


class _ShiftMix(torch.autograd.Function):
    """``x + token_shift(x, prev) * mu`` for each mixing vector ``mu`` ([1, 1, C]), as one op.

    The same arithmetic as BlinkDL's lerps; autograd through them allocates two or three
    [B, T, C] temporaries per vector in the backward, here the gradients are summed in place
    (the gradients of x, prev and every mu from one pass over each incoming gradient).
    """

    @staticmethod
    def forward(ctx, x, prev, *mus):
        xx = token_shift(x, prev)
        ctx.save_for_backward(xx, *mus)
        ctx.prev_dtype = None if prev is None else prev.dtype
        return tuple(torch.addcmul(x, xx, mu) for mu in mus)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        xx, *mus = ctx.saved_tensors
        gx = gxx = None
        gmus = []
        for g, mu, need in zip(grads, mus, ctx.needs_input_grad[2:]):
            if g is None:
                gmus.append(None)
                continue
            gx = g.clone() if gx is None else gx.add_(g)
            gxx = g * mu if gxx is None else gxx.addcmul_(g, mu)
            gmus.append((g * xx).sum_to_size(mu.shape).to(mu.dtype) if need else None)
        if gx is None:
            return (None, None, *gmus)
        # xx_t = x_{t-1} - x_t (x_{-1} = prev): x_t gets -gxx_t + gxx_{t+1}, prev gets gxx_0
        gx.sub_(gxx)
        gx[:, :-1] += gxx[:, 1:]
        gprev = None if ctx.prev_dtype is None else gxx[:, 0].to(ctx.prev_dtype)
        return (gx, gprev, *gmus)


def shift_mix(x: torch.Tensor, prev: Optional[torch.Tensor], *mus: torch.Tensor):
    """``tuple(x + token_shift(x, prev) * mu for mu in mus)`` with a lighter backward."""
    if not torch.is_grad_enabled():
        xx = token_shift(x, prev)
        return tuple(torch.addcmul(x, xx, mu) for mu in mus)
    return _ShiftMix.apply(x, prev, *mus)


class _ReluSquare(torch.autograd.Function):
    """relu(k) ** 2 keeping relu(k) for a two-pass backward (2 relu(k) * grad)."""

    @staticmethod
    def forward(ctx, k):
        r = torch.relu(k)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        r, = ctx.saved_tensors
        return torch.mul(g, r).mul_(2)


def relu_square(k: torch.Tensor) -> torch.Tensor:
    return _ReluSquare.apply(k) if torch.is_grad_enabled() else torch.relu(k).square()


class RWKV7TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.wkv_backend = cfg.wkv_backend
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size

        def p(*shape):
            return nn.Parameter(torch.empty(*shape))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (p(1, 1, C) for _ in range(6))
        self.w0, self.w1, self.w2 = p(1, 1, C), p(C, cfg.decay_lora), p(cfg.decay_lora, C)
        self.a0, self.a1, self.a2 = p(1, 1, C), p(C, cfg.aaa_lora), p(cfg.aaa_lora, C)
        if layer_id > 0:  # layer 0 defines v_first; the others mix towards it
            self.v0, self.v1, self.v2 = p(1, 1, C), p(C, cfg.mv_lora), p(cfg.mv_lora, C)
        self.g1, self.g2 = p(C, cfg.gate_lora), p(cfg.gate_lora, C)
        self.k_k, self.k_a, self.r_k = p(1, 1, C), p(1, 1, C), p(H, N)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x: torch.Tensor, v_first: Optional[torch.Tensor],
                shift: Optional[torch.Tensor] = None, wkv_state: Optional[torch.Tensor] = None,
                return_state: bool = False, state_starts: Optional[Tuple[int, int]] = None):
        """x: normalised input [B, T, C]. Returns (out, v_first, last_x, final wkv state); with
        ``state_starts=(offset, every)`` the wkv states before positions offset, offset + every, ...
        ([n, B, H, K, V], see :func:`~rwkv_diffusion_rnn.ops.wkv7.wkv7`) instead of the final one."""
        mixed = shift_mix(x, shift, self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        (r, log_w, k, v, a, b, g), v_first = self.wkv_inputs(mixed, v_first)
        o, S = wkv7(r, log_w, k, v, a, b, initial_state=wkv_state, output_final_state=return_state,
                    backend=self.wkv_backend, state_starts=state_starts)
        return self.wkv_output(o.to(x.dtype), r, k, v, g), v_first, last_position(x), S

    def wkv_inputs(self, mixed, v_first: Optional[torch.Tensor]):
        """The WKV operator's inputs from the token-shift mixes ``mixed`` = (xr, xw, xk, xv, xa, xg),
        each [B, T, C]: ``((r, log_w, k, v, a, b) [B, T, H, N], g [B, T, C]), v_first``. A mixer that
        runs the recurrence more than once (``bi_wkv``) computes these once."""
        xr, xw, xk, xv, xa, xg = mixed
        B, T, C = xr.shape
        H, N = self.n_head, self.head_size
        r = self.receptance(xr)
        w = torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        log_w = -DECAY_SCALE * torch.sigmoid((self.w0 + w).float())
        a4 = a.view(B, T, H, N)
        return (r.view(B, T, H, N), log_w.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                -kk, kk * a4, g), v_first

    def wkv_output(self, o: torch.Tensor, r, k, v, g) -> torch.Tensor:
        """The time mix's output from the WKV output ``o`` [B, T, H, N] (in the input dtype): the
        per-head GroupNorm, the ``r_k`` bonus of the current token, the gate and the projection."""
        B, T, H, N = r.shape
        C = H * N
        o = F.group_norm(o.reshape(B * T, C), H, self.ln_x.weight, self.ln_x.bias,
                         eps=LN_X_EPS).view(B, T, C)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True)
        o = o + (bonus * v).view(B, T, C)
        return self.output(o * g)


class RWKV7ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, shift: Optional[torch.Tensor] = None):
        """x: normalised input [B, T, C]. Returns (out, last_x)."""
        k, = shift_mix(x, shift, self.x_k)
        return self.value(relu_square(self.key(k))), last_position(x)


class RWKV7Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)  # applied once to the embeddings
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = RWKV7TimeMix(cfg, layer_id)
        self.ffn = RWKV7ChannelMix(cfg)

    def forward(self, x: torch.Tensor, v_first: Optional[torch.Tensor],
                state: Optional[LayerState] = None, return_state: bool = False):
        """Returns (x, v_first, new LayerState or None)."""
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        h, v_first, att_last, S = self.att(self.ln1(x), v_first, att_shift, wkv_state, return_state)
        x = x + h
        h, ffn_last = self.ffn(self.ln2(x), ffn_shift)
        x = x + h
        new_state = LayerState(att_last, S, ffn_last) if return_state else None
        return x, v_first, new_state


class RWKV7(nn.Module):
    """The RWKV-7 causal language model. ``model(input_ids)`` gives logits [B, T, vocab]."""

    def __init__(self, cfg: RWKV7Config, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(RWKV7Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if init_weights:  # skipped when a checkpoint overwrites every tensor anyway
            self.reset_parameters()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.blocks[0].ln0(self.emb(input_ids))

    def forward_hidden(self, x: torch.Tensor, state: Optional[List[LayerState]] = None,
                       return_state: bool = False):
        """Runs the blocks on embeddings x [B, T, C]; returns (hidden before ln_out, state)."""
        v_first = None
        new_state: List[LayerState] = []
        for i, block in enumerate(self.blocks):
            x, v_first, s = block(x, v_first, state[i] if state is not None else None, return_state)
            new_state.append(s)
        return x, (new_state if return_state else None)

    def forward(self, input_ids: torch.Tensor, state: Optional[List[LayerState]] = None,
                return_state: bool = False):
        """Logits [B, T, vocab]; with ``return_state`` also the state after the last token."""
        if input_ids.dim() != 2:
            raise ValueError(f"RWKV7: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"RWKV7: state has {len(state)} layers, the model {len(self.blocks)}")
        x, new_state = self.forward_hidden(self.embed(input_ids), state, return_state)
        logits = self.head(self.ln_out(x))
        return (logits, new_state) if return_state else logits

    @torch.no_grad()
    def reset_parameters(self):
        """BlinkDL-style initialisation for training from scratch."""
        cfg = self.config
        C, L = cfg.n_embd, cfg.n_layer
        ddd = torch.arange(C, dtype=torch.float32).view(1, 1, C) / C
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        for block in self.blocks:
            i = block.layer_id
            r01 = i / max(L - 1, 1)          # 0 at the first layer, 1 at the last
            r10 = 1.0 - i / L                # 1 at the first layer, towards 0 at the last
            att, ffn = block.att, block.ffn
            att.x_r.copy_(1 - ddd ** (0.2 * r10))
            att.x_w.copy_(1 - ddd ** (0.9 * r10))
            att.x_k.copy_(1 - ddd ** (0.7 * r10))
            att.x_v.copy_(1 - ddd ** (0.7 * r10))
            att.x_a.copy_(1 - ddd ** (0.9 * r10))
            att.x_g.copy_(1 - ddd ** (0.2 * r10))
            n = torch.arange(C, dtype=torch.float32)
            decay = -7 + 5 * (n / max(C - 1, 1)) ** (0.85 + 1.0 * r01 ** 0.5)
            att.w0.copy_((decay + 0.5).view(1, 1, C))
            att.w1.zero_(); _ortho_(att.w2, 0.1)
            att.a0.zero_(); att.a1.zero_(); _ortho_(att.a2, 0.1)
            if i > 0:
                att.v0.fill_(1.0); att.v1.zero_(); _ortho_(att.v2, 0.1)
            att.g1.zero_(); _ortho_(att.g2, 0.1)
            att.k_k.fill_(0.85); att.k_a.fill_(1.0); att.r_k.fill_(-0.04)
            bound = 0.5 / math.sqrt(C)
            nn.init.uniform_(att.receptance.weight, -bound, bound)
            nn.init.uniform_(att.key.weight, -0.1 * bound, 0.1 * bound)
            nn.init.uniform_(att.value.weight, -bound, bound)
            att.output.weight.zero_()
            att.ln_x.weight.fill_(((1 + i) / L) ** 0.7); att.ln_x.bias.zero_()
            ffn.x_k.copy_(1 - ddd ** (r10 ** 4))
            nn.init.uniform_(ffn.key.weight, -bound, bound)
            ffn.value.weight.zero_()
            for ln in (block.ln1, block.ln2) + ((block.ln0,) if i == 0 else ()):
                ln.weight.fill_(1.0); ln.bias.zero_()
        self.ln_out.weight.fill_(1.0); self.ln_out.bias.zero_()
        scale = 0.5 * math.sqrt(cfg.vocab_size / C) if cfg.vocab_size > C else 0.5
        nn.init.orthogonal_(self.head.weight, gain=scale)


def _ortho_(p: torch.Tensor, gain: float):
    nn.init.orthogonal_(p, gain=gain)
