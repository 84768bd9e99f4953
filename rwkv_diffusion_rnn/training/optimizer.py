"""Optimizers with parameter groups, and learning-rate schedules with warmup.

Groups: {backbone, new parts} x {weight decay, no weight decay}. No decay on biases, norm
weights, embeddings (token, token-type, position, null latent) and RWKV-7's per-channel mixing
parameters (x_r..x_g, w0, a0, v0, k_k, k_a, r_k, ffn.x_k), which are vectors in disguise.
The backbone (pretrained weights, and the backward copy of ``bi`` mixers) gets ``lr *
backbone_lr_mult``. The time-mix decay bases ``att.w0`` get a further ``decay_lr_mult`` (BlinkDL's
RWKV-7 trainer uses 2): the decays set how far back each channel remembers, and so how sharply
the network can tell positions apart.

``optimizer.name``: ``adamw`` (every parameter), or ``muon``: :class:`MuonAdamW`, Muon's
orthogonalised momentum on the hidden weight matrices (the decay-group 2-D weights other than
the token embedding and the output heads) and AdamW on everything else, as in modded-nanogpt.
``adamw8bit`` / ``lion8bit``: bitsandbytes' 8-bit AdamW / Lion on CUDA (their optimizer state in
8 bits); without CUDA or bitsandbytes a warning, and AdamW.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..common.checks import Num, Seq

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon", "adamw8bit", "lion8bit")
# the optimizer.* numbers, with their ranges (muon_* only in optimizer=muon configs)
OPTIONS = {
    "lr": Num(lo=0, lo_open=True), "weight_decay": Num(lo=0), "betas": Seq(Num(0, 1, hi_open=True), 2),
    "eps": Num(lo=0, lo_open=True), "backbone_lr_mult": Num(lo=0), "decay_lr_mult": Num(lo=0, lo_open=True),
    "warmup_steps": Num(lo=0, integer=True), "min_lr_ratio": Num(0, 1),
    "decay_steps": Num(lo=1, integer=True, optional=True),
    "muon_lr": Num(lo=0, lo_open=True), "muon_momentum": Num(0, 1, hi_open=True),
    "muon_ns_steps": Num(lo=1, integer=True),
}
EIGHT_BIT = {"adamw8bit": "AdamW8bit", "lion8bit": "Lion8bit"}    # optimizer.name -> bitsandbytes class

_NO_DECAY_SUFFIXES = (".bias", "emb.weight", "type_emb.weight", "pos_emb", "null_latent", ".r_k")
# 2-D weights that stay with AdamW under Muon: token-indexed rows, not linear maps of the stream.
_NOT_MUON_SUFFIXES = ("emb.weight", "head.weight")


def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.") or ".backward_blocks." in name or name.startswith("mixer.backward_blocks")


def _no_decay(name: str, p: torch.nn.Parameter, norm_params: set) -> bool:
    # fewer than two dimensions above 1 (from the shape: FSDP's sharded tensors cannot squeeze)
    return (sum(n > 1 for n in p.shape) < 2 or name in norm_params or name.endswith(_NO_DECAY_SUFFIXES))


def _is_muon(name: str, p: torch.nn.Parameter, no_decay: bool) -> bool:
    return p.dim() == 2 and not no_decay and not name.endswith(_NOT_MUON_SUFFIXES)


def _is_decay_base(name: str) -> bool:
    return name.endswith("att.w0")


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 backbone_lr_mult: float = 1.0, muon_lr: Optional[float] = None,
                 decay_lr_mult: float = 1.0) -> List[Dict]:
    """Parameter groups. Frozen parameters are included (they may be unfrozen later) but
    skipped by the optimizer while their grad is None. With ``muon_lr`` set, the hidden weight
    matrices form groups of their own (``use_muon=True``) with that learning rate. With
    ``decay_lr_mult != 1`` the ``att.w0`` vectors form groups of their own at that multiple."""
    norm_params = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            for pn, _ in mod.named_parameters(recurse=False):
                norm_params.add(f"{mod_name}.{pn}" if mod_name else pn)
    buckets: Dict[tuple, List] = {}
    for name, p in model.named_parameters():
        no_decay = _no_decay(name, p, norm_params)
        muon = muon_lr is not None and _is_muon(name, p, no_decay)
        w0 = decay_lr_mult != 1.0 and _is_decay_base(name)
        buckets.setdefault((muon, _is_backbone(name), no_decay, w0), []).append((name, p))
    groups = []
    for (muon, backbone, no_decay, w0), items in sorted(buckets.items()):
        mult = (backbone_lr_mult if backbone else 1.0) * (decay_lr_mult if w0 else 1.0)
        groups.append({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "lr": (muon_lr if muon else lr) * mult,
            "lr_mult": mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "use_muon": muon,
            "group_name": (f"{'muon_' if muon else ''}{'backbone' if backbone else 'new'}_"
                           f"{'no_decay' if no_decay else 'decay'}{'_w0' if w0 else ''}"),
        })
    return groups


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> U S' V^T with S' near 1) by Muon's
    quintic Newton-Schulz iteration, in the matrix's own dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``use_muon``, AdamW (decoupled weight decay) on the others.

    One optimizer object, so one LR scheduler, one ``state_dict`` and one checkpoint cover both.
    Muon step for a matrix of shape (A, B): momentum buffer ``m = mu m + g``, Nesterov update
    ``u = g + mu m``, ``p -= lr * max(1, A/B)**0.5 * newton_schulz(u)`` after the decay ``p *=
    1 - lr * wd`` (the ``adjust_lr_fn="original"`` form of ``torch.optim.Muon``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, use_muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if wd:
                    p.mul_(1.0 - lr * wd)
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(newton_schulz(u, group["ns_steps"]), alpha=-lr * scale)
                else:
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    beta1, beta2 = group["betas"]
                    state["step"] = state["step"] + 1
                    t = float(state["step"])
                    state["exp_avg"].lerp_(g, 1.0 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    denom = (state["exp_avg_sq"] / (1.0 - beta2 ** t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1 ** t))
        return loss


def build_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.01,
                    betas=(0.9, 0.99), eps: float = 1e-8, backbone_lr_mult: float = 1.0, *,
                    name: str = "adamw", muon_lr: float = 0.02, muon_momentum: float = 0.95,
                    muon_ns_steps: int = 5, decay_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """``name="adamw"``: torch's AdamW over :func:`param_groups`. ``name="muon"``:
    :class:`MuonAdamW`, with ``muon_lr`` for the hidden matrices and ``lr`` for the rest."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r}; choose one of {OPTIMIZERS}")
    if name == "muon":
        groups = param_groups(model, lr, weight_decay, backbone_lr_mult, muon_lr=muon_lr,
                              decay_lr_mult=decay_lr_mult)
        return MuonAdamW(groups, lr=lr, betas=betas, eps=eps, momentum=muon_momentum,
                         ns_steps=muon_ns_steps)
    groups = param_groups(model, lr, weight_decay, backbone_lr_mult, decay_lr_mult=decay_lr_mult)
    if name in EIGHT_BIT:
        eight_bit = _eight_bit(name, groups, lr, betas, eps, next(model.parameters()).device)
        if eight_bit is not None:
            return eight_bit
    # "names" is bookkeeping for logs and tests; AdamW keeps unknown group keys.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def _eight_bit(name: str, groups, lr: float, betas, eps: float, device: torch.device):
    """bitsandbytes' 8-bit optimizer ``name`` on CUDA, or None after a warning that says why not."""
    if device.type != "cuda":
        why = f"its 8-bit state is for CUDA, and the model is on {device.type}"
    else:
        try:
            import bitsandbytes as bnb
        except ImportError:
            why = "bitsandbytes is not installed (pip install bitsandbytes)"
        else:
            cls = getattr(bnb.optim, EIGHT_BIT[name])
            extra = {"eps": eps} if name == "adamw8bit" else {}
            return cls(groups, lr=lr, betas=tuple(betas), **extra)
    warnings.warn(f"optimizer.name={name}: {why}; training with AdamW (optimizer.name=adamw) instead",
                  stacklevel=3)
    return None


def lr_lambda(schedule: str, warmup_steps: int, total_steps: Optional[int],
              min_lr_ratio: float = 0.1, decay_steps: Optional[int] = None):
    """Multiplier of the base LR at a given optimizer step.

    Every schedule starts with a linear warmup over ``warmup_steps``. Then ``constant`` stays at
    1; ``linear`` and ``cosine`` go down to ``min_lr_ratio`` at ``total_steps``; ``wsd``
    (warmup-stable-decay, modded-nanogpt's "warmdown") stays at 1 and goes down linearly to
    ``min_lr_ratio`` over the last ``decay_steps`` steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}; choose one of {SCHEDULES}")
    if schedule != "constant" and not total_steps:
        raise ValueError(f"optimizer.schedule={schedule} needs the total number of steps "
                         "(training.max_steps, or num_epochs with a sized dataset)")
    if schedule == "wsd" and (decay_steps is None or decay_steps < 1):
        raise ValueError(f"optimizer.schedule=wsd needs optimizer.decay_steps >= 1 (the steps of "
                         f"the final decay), got {decay_steps!r}")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        # the decay starts after the warmup, or (wsd) decay_steps before the end
        start = max(warmup_steps, total_steps - decay_steps) if schedule == "wsd" else warmup_steps
        progress = min(1.0, max(0, step - start) / max(1, total_steps - start))
        if schedule == "cosine":
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str = "cosine",
                    warmup_steps: int = 0, total_steps: Optional[int] = None,
                    min_lr_ratio: float = 0.1,
                    decay_steps: Optional[int] = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(schedule, warmup_steps, total_steps, min_lr_ratio, decay_steps))
