"""The random streams of a run, named in one place.

Training draws from generators derived from the run's ``seed``; their states are saved in every
checkpoint, so a resumed run draws exactly what the uninterrupted one would have. Evaluation
draws from fixed seeds of its own, so every evaluation of a run (and of different runs) sees
the same noise and never moves the training streams.

=================  =========================================================================
stream             what it draws
=================  =========================================================================
``init``           the model's initial weights (torch's global generator, seeded once)
``data_order``     the order of the training examples in each epoch (text + latent data)
``task_examples``  the synthetic task's examples
``noise``          truncation, diffusion times, row roles, latent drops, latent noise, masks
``eval_noise``     the noise of the validation loss
``eval_sampling``  the samplers run at evaluation
``eval_fresh``     the fresh synthetic batch scored at evaluation (plus the step)
=================  =========================================================================
"""

from __future__ import annotations

import torch

# Offsets from the run's seed (training streams) or absolute seeds (evaluation streams).
TRAIN_OFFSETS = {"init": 0, "data_order": 0, "task_examples": 17, "noise": 1}
EVAL_SEEDS = {"eval_noise": 1234, "eval_sampling": 0, "eval_fresh": 10_000}


def seed_of(stream: str, run_seed: int = 0) -> int:
    """The seed of ``stream`` for a run seeded ``run_seed``."""
    if stream in TRAIN_OFFSETS:
        return int(run_seed) + TRAIN_OFFSETS[stream]
    if stream in EVAL_SEEDS:
        return EVAL_SEEDS[stream]
    raise KeyError(f"unknown random stream {stream!r}; streams: {sorted({**TRAIN_OFFSETS, **EVAL_SEEDS})}")


def generator(stream: str, run_seed: int = 0, offset: int = 0) -> torch.Generator:
    """A CPU generator for ``stream`` (``offset`` shifts it, e.g. by the step)."""
    return torch.Generator().manual_seed(seed_of(stream, run_seed) + offset)
