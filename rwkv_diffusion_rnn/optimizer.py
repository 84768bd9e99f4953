"""AdamW with parameter groups, and learning-rate schedules with warmup.

Groups: {backbone, new parts} x {weight decay, no weight decay}. No decay on biases, norm
weights, embeddings (token, token-type, null latent) and RWKV-7's per-channel mixing
parameters (x_r..x_g, w0, a0, v0, k_k, k_a, r_k, ffn.x_k), which are vectors in disguise.
The backbone (pretrained weights, and the backward copy of ``bi`` mixers) gets ``lr *
backbone_lr_mult``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn

SCHEDULES = ("cosine", "linear", "constant")

_NO_DECAY_SUFFIXES = (".bias", "emb.weight", "type_emb.weight", "null_latent", ".r_k")


def _is_backbone(name: str) -> bool:
    return name.startswith("backbone.") or ".backward_blocks." in name or name.startswith("mixer.backward_blocks")


def _no_decay(name: str, p: torch.nn.Parameter, norm_params: set) -> bool:
    return (p.squeeze().dim() < 2 or name in norm_params or name.endswith(_NO_DECAY_SUFFIXES))


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 backbone_lr_mult: float = 1.0) -> List[Dict]:
    """Parameter groups for AdamW. Frozen parameters are included (they may be unfrozen later)
    but skipped by the optimizer while their grad is None."""
    norm_params = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            for pn, _ in mod.named_parameters(recurse=False):
                norm_params.add(f"{mod_name}.{pn}" if mod_name else pn)
    buckets: Dict[tuple, List] = {}
    for name, p in model.named_parameters():
        key = (_is_backbone(name), _no_decay(name, p, norm_params))
        buckets.setdefault(key, []).append((name, p))
    groups = []
    for (backbone, no_decay), items in sorted(buckets.items()):
        groups.append({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "lr": lr * (backbone_lr_mult if backbone else 1.0),
            "lr_mult": backbone_lr_mult if backbone else 1.0,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "group_name": f"{'backbone' if backbone else 'new'}_{'no_decay' if no_decay else 'decay'}",
        })
    return groups


def build_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.01,
                    betas=(0.9, 0.99), eps: float = 1e-8, backbone_lr_mult: float = 1.0
                    ) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, backbone_lr_mult)
    # "names" is bookkeeping for logs and tests; AdamW keeps unknown group keys.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: Optional[int],
              min_lr_ratio: float = 0.1):
    """Multiplier of the base LR at a given optimizer step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={schedule!r}; choose one of {SCHEDULES}")
    if schedule != "constant" and not total_steps:
        raise ValueError(f"optimizer.schedule={schedule} needs the total number of steps "
                         "(training.max_steps, or num_epochs with a sized dataset)")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str = "cosine",
                    warmup_steps: int = 0, total_steps: Optional[int] = None,
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(schedule, warmup_steps, total_steps, min_lr_ratio))
