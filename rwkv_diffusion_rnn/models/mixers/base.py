"""Shared pieces of the sequence mixers: one conditioned RWKV-7 block, and direction fusion.

A mixer decides in which order and with which initial state the RWKV-7 blocks read the
sequence. It does not own the backbone's blocks (they are passed to ``forward``), so the
backbone keeps its BlinkDL parameter names and a pretrained checkpoint loads unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..rwkv7 import LayerState, RWKV7Block


@dataclass
class Modulation:
    """Per-layer time conditioning, each tensor [B, 1, C] or None (= identity).

    Applied as ``norm(x) * (1 + scale) + shift`` before the time-mix (1) and channel-mix (2),
    and ``x + gate * branch`` after them. FiLM sets shift/scale, AdaLN-Zero all three.
    """
    shift1: Optional[torch.Tensor] = None
    scale1: Optional[torch.Tensor] = None
    gate1: Optional[torch.Tensor] = None
    shift2: Optional[torch.Tensor] = None
    scale2: Optional[torch.Tensor] = None
    gate2: Optional[torch.Tensor] = None

    def _map(self, fn) -> "Modulation":
        return Modulation(*(None if t is None else fn(t)
                            for t in (self.shift1, self.scale1, self.gate1,
                                      self.shift2, self.scale2, self.gate2)))

    def repeat(self, n: int) -> "Modulation":
        """For a batch reshaped from [B, ...] to [B * n, ...] (row b -> rows b*n .. b*n+n-1)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def tile(self, n: int) -> "Modulation":
        """For n batches stacked along dim 0, ``torch.cat([x] * n)`` (row b -> rows b, B + b, ...)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))


def _modulate(x, shift, scale):
    if scale is not None:
        x = x * (1 + scale)
    if shift is not None:
        x = x + shift
    return x


def run_block(block: RWKV7Block, x: torch.Tensor, v_first: Optional[torch.Tensor],
              mod: Optional[Modulation] = None, state: Optional[LayerState] = None,
              return_state: bool = False, wkv_init: Optional[torch.Tensor] = None,
              state_starts: Optional[Tuple[int, int]] = None):
    """One RWKV-7 block with optional modulation. ``wkv_init`` overrides the initial WKV state.

    Returns (x, v_first, LayerState or None). Without ``mod`` this is exactly ``block(x, ...)``.
    With ``state_starts=(offset, every)`` the LayerState holds, stacked on a first dimension, the
    states before positions offset, offset + every, ...: what a run from each of them starts from.
    """
    att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
    if wkv_init is not None:
        wkv_state = wkv_init
    mod = mod or Modulation()
    h1 = _modulate(block.ln1(x), mod.shift1, mod.scale1)
    h, v_first, att_last, S = block.att(h1, v_first, att_shift, wkv_state, return_state, state_starts)
    x = x + (h if mod.gate1 is None else mod.gate1 * h)
    h2 = _modulate(block.ln2(x), mod.shift2, mod.scale2)
    h, ffn_last = block.ffn(h2, ffn_shift)
    x = x + (h if mod.gate2 is None else mod.gate2 * h)
    if state_starts is not None:
        offset, every = state_starts
        return x, v_first, LayerState(_before(h1, att_shift, offset, every), S, _before(h2, ffn_shift, offset, every))
    return x, v_first, (LayerState(att_last, S, ffn_last) if return_state else None)


def run_block_split(block: RWKV7Block, x: torch.Tensor, v_first: Optional[torch.Tensor],
                    mod: Optional[Modulation], state: Optional[LayerState], at: int):
    """:func:`run_block` over all of ``x`` [B, T, C], returning the LayerState after its first
    ``at`` positions (0 < at <= T) instead of the last: the block runs on ``x[:, :at]`` with
    ``return_state`` and continues on ``x[:, at:]`` from that state, which is the same computation
    as one call (every part of a block reads only the past and its carried state)."""
    if not 0 < at <= x.shape[1]:
        raise ValueError(f"state_at={at} must be within the {x.shape[1]} positions of the call (and > 0)")
    if at == x.shape[1]:
        return run_block(block, x, v_first, mod, state, True)
    y1, vf1, st = run_block(block, x[:, :at], None if v_first is None else v_first[:, :at], mod, state, True)
    y2, vf2, _ = run_block(block, x[:, at:], None if v_first is None else v_first[:, at:], mod, st)
    return torch.cat([y1, y2], 1), torch.cat([vf1, vf2], 1), st


def _before(h: torch.Tensor, first: Optional[torch.Tensor], offset: int, every: int) -> torch.Tensor:
    """[n, B, C]: the token-shift input before positions offset, offset + every, ... of ``h``
    [B, T, C] (``first``, or zeros, before position 0)."""
    prev = torch.cat([(torch.zeros_like(h[:, 0]) if first is None else first.to(h.dtype)).unsqueeze(1), h[:, :-1]], 1)
    return prev[:, offset::every].transpose(0, 1).clone()     # its own storage, as last_position


class Mixer(nn.Module):
    """Base of every mixer: the ``model.mixer`` scan orders (registered with :func:`register_mixer`)
    and the stacks of the other archs (attention, hybrid, Qwen3).

    A mixer declares its traits here, and the rest of the project (sampling, validation, the
    builders, evaluate) asks them instead of comparing names:

    * ``carries_state``: it reads left to right and ``forward(..., state=s, return_state=True)``
      continues where the call that returned ``s`` stopped (generation caches, chunked sequences).
    * ``autoregressive``: position i sees no j > i, so it can train and decode next-token
      (``training.objective=ar``) and score samples as an AR model.
    * ``length_option``: the option whose value the text length must be a multiple of (None: any).
    * ``folds_state`` (with ``carries_state``): ``forward(..., state=s, state_at=k)`` returns, as
      its state, the one after the first ``k`` positions of its input while computing the
      outputs of every position; the sampler's cache then folds a finished block into the state
      in the same call that takes the next block's first step.
    * ``reads_context``: in training and scoring it is also given the clean sequence
      (``forward(..., context=...)``) and conditions on it (``block_causal`` with clean context).
    * ``reads_prompt``: it is given each row's prompt length (``forward(..., prompt_lengths=...)``,
      text positions visible to all: Qwen3's block attention).
    * :meth:`cache_unit`: how many tokens a generation cache commits at once (None: no cache).
    * :meth:`check_options`: its options' checks (ValueError naming the ``model.*`` key), run by
      the constructor and by config validation before anything is built.

    A mixer's options are its constructor's keyword arguments after ``blocks`` (``n_embd`` and
    ``n_head`` come from the backbone); each is read from the ``model.<option>`` config key.

    With ``grad_checkpointing`` (``training.grad_checkpointing``) each block's activations are not
    kept for the backward: :meth:`run` recomputes the block then (PyTorch's non-reentrant
    ``checkpoint``; the blocks draw no random numbers, so the recomputed values are the same)."""

    name = ""                   # the model.mixer value (registered mixers)
    carries_state = False
    folds_state = False
    autoregressive = False
    length_option: Optional[str] = None
    reads_context = False
    reads_prompt = False
    grad_checkpointing = False

    @classmethod
    def check_options(cls, **options) -> None:
        """Refuses option values that cannot work (ValueError naming the ``model.*`` key)."""

    def cache_unit(self) -> Optional[int]:
        return None

    def set_step(self, step: int) -> None:
        """The training step about to run (a mixer whose reading changes over training, e.g. an
        annealing, follows it here; the trainer calls this after every step)."""

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, one block's computation, checkpointed when enabled and training."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)



def read_layers(mixer: "Mixer", blocks, x: torch.Tensor, mods, state, return_state: bool, how: str):
    """The forward of a mixer that reads the whole sequence at each layer (``mixer.layer(i, block,
    x, v_first, mod) -> (x, v_first)``) and so has no state to carry: ``how`` it reads, for the
    refusal of a state."""
    if state is not None or return_state:
        raise ValueError(f"model.mixer={mixer.name} reads the whole sequence {how} and has no recurrent "
                         "state to carry; use block_causal for cached block generation")
    mods = layer_mods(mods, len(blocks))
    v_first = None
    for i, block in enumerate(blocks):
        x, v_first = mixer.layer(i, block, x, v_first, mods[i])
    return x, None

# model.mixer -> the mixer class; filled by register_mixer where each mixer is defined
MIXERS: Dict[str, Type[Mixer]] = {}


def register_mixer(cls: Type[Mixer]) -> Type[Mixer]:
    """Class decorator: makes ``cls`` the ``model.mixer={cls.name}`` choice."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name (the model.mixer value) to be registered")
    MIXERS[cls.name] = cls
    return cls


def layer_mods(mods: Optional[Sequence[Modulation]], n: int) -> List[Optional[Modulation]]:
    return list(mods) if mods is not None else [None] * n


class Fusion(nn.Module):
    """Fuses the outputs of a forward and a backward pass of one layer (input x).

    * ``sum``: ``x + (d_f + d_b) / 2`` with d = output - x, i.e. the mean of the two outputs;
    * ``concat``: ``x + W [d_f; d_b]``, W initialised to ``[I/2, I/2]`` (= ``sum`` at start);
    * ``gated``: ``g * y_f + (1 - g) * y_b``, ``g = sigmoid(U [y_f; y_b])`` per channel, U zero
      initialised (g = 1/2, = ``sum`` at start).
    """

    KINDS = ("sum", "concat", "gated")

    def __init__(self, kind: str, n_embd: int):
        super().__init__()
        self.check(kind)
        self.kind = kind
        if kind == "concat":
            self.proj = nn.Linear(2 * n_embd, n_embd, bias=False)
            with torch.no_grad():
                eye = torch.eye(n_embd) / 2
                self.proj.weight.copy_(torch.cat([eye, eye], dim=1))
        elif kind == "gated":
            self.gate = nn.Linear(2 * n_embd, n_embd)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @classmethod
    def check(cls, kind: str) -> None:
        if kind not in cls.KINDS:
            raise ValueError(f"model.bi_fusion={kind!r} is not valid; choose one of {', '.join(cls.KINDS)}")

    def forward(self, x, y_f, y_b):
        if self.kind == "sum":
            return (y_f + y_b) / 2
        if self.kind == "concat":
            return x + self.proj(torch.cat([y_f - x, y_b - x], dim=-1))
        g = torch.sigmoid(self.gate(torch.cat([y_f, y_b], dim=-1)))
        return g * y_f + (1 - g) * y_b


class TwoWay(Mixer):
    """A mixer whose layers read left to right and right to left and fuse the two (``bi``,
    ``block_causal``): one :class:`Fusion` per layer, and bidirectional annealing.

    Annealing (``bi_anneal_steps=N``, for a backbone pretrained left to right): each layer's output
    is ``y_f + a * (fuse(x, y_f, y_b) - y_f)`` with ``a`` growing from 0 at step 0 to 1 at step N
    (what attention-mask annealing is for a scan), so at the first step the model is the forward
    scan alone, exactly the pretrained causal model. ``a`` is a buffer (saved with the weights, so
    a checkpoint decodes at its step's value) that :meth:`set_step` sets."""

    def __init__(self, blocks, n_embd: int, bi_fusion: str, bi_anneal_steps: int):
        super().__init__()
        self.anneal_steps = int(bi_anneal_steps)
        if self.anneal_steps:
            self.register_buffer("anneal", torch.zeros(()))
        self.fusion = nn.ModuleList(Fusion(bi_fusion, n_embd) for _ in blocks)

    @staticmethod
    def check_anneal(bi_anneal_steps) -> None:
        if isinstance(bi_anneal_steps, bool) or not isinstance(bi_anneal_steps, int) or bi_anneal_steps < 0:
            raise ValueError(f"model.bi_anneal_steps={bi_anneal_steps!r} must be an integer >= 0 (0: no annealing)")

    def set_step(self, step: int) -> None:
        if self.anneal_steps:
            self.anneal.fill_(min(1.0, step / self.anneal_steps))

    def _fuse(self, i: int, x, y_f, y_b):
        out = self.fusion[i](x, y_f, y_b)
        if self.anneal_steps:
            out = y_f + self.anneal.to(out.dtype) * (out - y_f)
        return out
