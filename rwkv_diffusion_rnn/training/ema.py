"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of the trainable weights, kept in a copy of the model (its
    buffers follow the model's)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        # buffers are statistics of the data, not weights (a learned latent's whitening): the
        # copy takes the model's as they are
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
