"""The likelihood of held-out text under a trained model, as training logs it and ``evaluate`` reports it.

A diffusion model gets the Monte-Carlo negative ELBO of masked diffusion
(:func:`~rwkv_diffusion_rnn.diffusion.elbo.masked_nelbo`, the schedule it was trained with, plus
the prior term of a schedule that does not end at all masks), an
autoregressive one its exact next-token NLL; both in nats per scored token. A text + latent
model is scored given each window's clean latent (``latent="clean"``) or the learned null
latent (``latent="null"``: what the text costs without its latent).
"""

from __future__ import annotations

from contextlib import nullcontext
from itertools import islice
from typing import Callable, Iterable, Optional

import torch

from ..diffusion.elbo import LikelihoodAccumulator, LikelihoodSummary, ar_nll, masked_nelbo, prior_nats
from ..diffusion.objective import next_token_inputs

LATENT_MODES = ("clean", "null")


def _chars(tokenizer, ids: torch.Tensor, valid: torch.Tensor) -> Optional[int]:
    count = getattr(tokenizer, "count_chars", None)
    return None if count is None else count(ids[valid].tolist())


@torch.no_grad()
def score(model, batches: Iterable[dict], *, objective: str, schedule=None, mask_id: Optional[int] = None,
          vocab_size: Optional[int] = None,
          generator: Optional[torch.Generator] = None, mc_samples: int = 1, max_batches: Optional[int] = None,
          tokenizer=None, latent: str = "clean", device: torch.device = torch.device("cpu"),
          autocast: Callable = nullcontext, progress: bool = False) -> LikelihoodSummary:
    """The bound (``objective="diffusion"``) or the NLL (``"ar"``) of ``batches`` (the first
    ``max_batches``); characters are counted when the tokenizer can."""
    if latent not in LATENT_MODES:
        raise ValueError(f"latent={latent!r}; choose one of {LATENT_MODES}")
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        batches = islice(batches, max_batches)
        total = max_batches if total is None else min(total, max_batches)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=total, desc="score", dynamic_ncols=True, disable=None)
    acc = LikelihoodAccumulator(exact=objective == "ar")
    prior = prior_nats(schedule, vocab_size - 1) if objective != "ar" else 0.0   # every id but the mask
    counting = tokenizer is not None
    for batch in batches:
        if objective == "ar":
            inputs, targets, valid = next_token_inputs(batch)
            with autocast():
                logits = model(inputs.to(device), torch.zeros(inputs.shape[0], device=device)).logits
            nats = ar_nll(logits, targets.to(device), valid=valid.to(device))
        else:
            targets, valid = batch["input_ids"], batch["attention_mask"].bool()
            z = batch["latent"].float().to(device) if latent == "clean" and "latent" in batch else None

            def denoise(xt, t):
                with autocast():
                    return model(xt, t, z, None if z is None else torch.zeros_like(t)).logits

            nats = masked_nelbo(denoise, targets.to(device), schedule, mask_id, generator,
                                valid=valid.to(device), mc_samples=mc_samples)
            nats = nats + prior * valid.sum(1).to(nats)
        chars = _chars(tokenizer, targets, valid) if counting else None
        counting = counting and chars is not None
        acc.add(nats.cpu(), valid.sum(1), chars)
    return acc.summary()
