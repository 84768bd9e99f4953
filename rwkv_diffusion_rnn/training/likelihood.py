"""The likelihood of held-out text under a trained model, as training logs it and ``evaluate`` reports it.

A diffusion model gets the Monte-Carlo negative ELBO of masked diffusion
(:func:`~rwkv_diffusion_rnn.diffusion.elbo.masked_nelbo`, the schedule it was trained with, plus
the prior term of a schedule that does not end at all masks), an
autoregressive one its exact next-token NLL; both in nats per scored token. A text + latent
model is scored given each window's clean latent (``latent="clean"``) or the learned null
latent (``latent="null"``: what the text costs without its latent).

:func:`score_stream` reads a whole split as one stream, left to right in chunks with the model's
state carried, so every token is scored with all the text before it as context.

For the quality of generated samples, :func:`score_texts` gives the exact NLL of texts under an
autoregressive scorer (generative perplexity) and :func:`unigram_entropy` the entropy of a
sample's token histogram.
"""

from __future__ import annotations

from contextlib import nullcontext
from itertools import islice
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from ..diffusion.elbo import LikelihoodAccumulator, LikelihoodSummary, ar_nll, masked_nelbo, prior_nats
from ..diffusion.objective import answer_positions, next_token_inputs

LATENT_MODES = ("clean", "null")
CONTEXTS = ("windows", "stream")     # eval.context


def _chars(tokenizer, ids: torch.Tensor, valid: torch.Tensor) -> Optional[int]:
    count = getattr(tokenizer, "count_chars", None)
    return None if count is None else count(ids[valid].tolist())


@torch.no_grad()
def clean_latent(model, data_latent: torch.Tensor) -> torch.Tensor:
    """The model's clean latent of the data's latent vectors (``model.latent_projector`` projects
    them), through any DDP / compile wrapper."""
    from .checkpoints import _unwrap
    return _unwrap(model).clean_latent(data_latent)


def batch_nats(model, batch: dict, *, objective: str, schedule=None, mask_id: Optional[int] = None,
               generator: Optional[torch.Generator] = None, mc_samples: int = 1, latent: str = "clean",
               device: torch.device = torch.device("cpu"), autocast: Callable = nullcontext,
               rows: slice = slice(None), prior: float = 0.0):
    """The nats of each row of one batch, as :func:`score` sums them: ``(nats, targets, valid)``
    of the rows ``rows``, ``nats`` float64 [B] (AR, exact) or [mc_samples, B] (the diffusion
    bound, ``prior`` nats added per scored token); ``targets`` / ``valid`` the scored tokens.

    A diffusion batch with ``prompt_lengths`` is scored on the positions after each row's prompt,
    given the prompt clean (never masked): the bound of a continuation given its context
    (conversations; the lm-eval harness's ``loglikelihood``)."""
    if objective == "ar":
        inputs, targets, valid = (x[rows] for x in next_token_inputs(batch))
        with autocast():
            logits = model(inputs.to(device), torch.zeros(inputs.shape[0], device=device)).logits
        return ar_nll(logits, targets.to(device), valid=valid.to(device)), targets, valid
    targets, valid = batch["input_ids"], batch["attention_mask"].bool()
    if "prompt_lengths" in batch:       # conversations: the answers given their prompts
        valid = valid & answer_positions(batch)
    z = batch["latent"][rows].float().to(device) if latent == "clean" and "latent" in batch else None
    if z is not None:       # the data's vectors as the model's latent (a learned projection)
        z = clean_latent(model, z)
    clean = targets[rows].to(device)
    prompts = batch["prompt_lengths"][rows].to(device) if "prompt_lengths" in batch else None

    def denoise(xt, t):
        with autocast():
            return model(xt, t, z, None if z is None else torch.zeros_like(t), context_ids=clean,
                         prompt_lengths=prompts).logits

    nats = masked_nelbo(denoise, targets.to(device), schedule, mask_id, generator,
                        valid=valid.to(device), mc_samples=mc_samples, rows=rows)
    targets, valid = targets[rows], valid[rows]
    return nats + prior * valid.sum(1).to(nats), targets, valid


@torch.no_grad()
def score(model, batches: Iterable[dict], *, objective: str, schedule=None, mask_id: Optional[int] = None,
          vocab_size: Optional[int] = None,
          generator: Optional[torch.Generator] = None, mc_samples: int = 1, max_batches: Optional[int] = None,
          tokenizer=None, latent: str = "clean", device: torch.device = torch.device("cpu"),
          autocast: Callable = nullcontext, progress: bool = False, progress_desc: str = "score",
          dist=None) -> LikelihoodSummary:
    """The bound (``objective="diffusion"``) or the NLL (``"ar"``) of ``batches`` (the first
    ``max_batches``); characters are counted when the tokenizer can.

    A batch with ``prompt_lengths`` (conversations) is scored on its answers given the prompts:
    the prompt positions are context, never masked nor counted.

    ``dist`` (a :class:`~rwkv_diffusion_rnn.training.distributed.Dist`): each process scores its
    share of every batch's rows (with the draws of the whole batch) and every process returns
    the summary of all of them.

    ``progress``: a bar on a terminal, plain lines named ``progress_desc`` elsewhere
    (:func:`~rwkv_diffusion_rnn.training.events.progress`)."""
    if latent not in LATENT_MODES:
        raise ValueError(f"latent={latent!r}; choose one of {LATENT_MODES}")
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        batches = islice(batches, max_batches)
        total = max_batches if total is None else min(total, max_batches)
    if progress:
        from .events import progress as report
        batches = report(batches, desc=progress_desc, total=total, unit="batches")
    acc = LikelihoodAccumulator(exact=objective == "ar")
    prior = prior_nats(schedule, vocab_size - 1) if objective != "ar" else 0.0   # every id but the mask
    counting = tokenizer is not None
    for batch in batches:
        counting = counting and "prompt_lengths" not in batch     # answers end in EOS padding: no characters
        rows, counted = (slice(None), True) if dist is None else dist.eval_rows(batch["input_ids"].shape[0])
        nats, targets, valid = batch_nats(model, batch, objective=objective, schedule=schedule, mask_id=mask_id,
                                          generator=generator, mc_samples=mc_samples, latent=latent,
                                          device=device, autocast=autocast, rows=rows, prior=prior)
        if not counted:
            continue
        chars = _chars(tokenizer, targets, valid) if counting else None
        counting = counting and chars is not None
        acc.add(nats.cpu(), valid.sum(1), chars)
    if dist is not None and dist.world > 1:
        acc = LikelihoodAccumulator.combine(dist.gather(acc))
    return acc.summary()


@torch.no_grad()
def score_stream(model, tokens, *, objective: str, chunk: int, schedule=None, mask_id: Optional[int] = None,
                 vocab_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 mc_samples: int = 1, tokenizer=None, device: torch.device = torch.device("cpu"),
                 autocast: Callable = nullcontext, progress: bool = False) -> LikelihoodSummary:
    """The NLL (AR) or the bound (diffusion) of the 1-D ``tokens`` read as one stream: tokens
    1 .. N-1 are scored, in chunks of ``chunk`` tokens, each chunk given everything before it
    through the state a left-to-right mixer (``carries_state``) carries.

    AR: the exact NLL of each token given all tokens before it (the sum the model's recurrence
    gives token by token). Diffusion (``block_causal``): each chunk's masked-diffusion bound
    (``mc_samples`` draws) given the clean text before it: the chunk is denoised from the state
    of the clean earlier text, which the clean chunk then advances, read at time 0 (clean text);
    a model trained with clean context (``reads_context``) reads the chunk's own earlier blocks
    clean too, as in its training. The chunks' terms add up to a bound of the whole stream (the
    chain rule over chunks). Text-only models (no latent prefix)."""
    import numpy as np
    from .checkpoints import _unwrap
    net = _unwrap(model)
    if not net.mixer.carries_state:
        raise ValueError("a stream is scored through the state a left-to-right mixer carries (model.mixer=causal "
                         "or block_causal with model.arch=rwkv7)")
    if net.config.latent_prefix_len:
        raise ValueError("a stream is scored with text-only models (model.latent_prefix_len=0)")
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    N = int(ids.numel())
    if N < 2:
        raise ValueError(f"a stream of {N} token(s) has nothing to score")
    shift = net.config.shift_logits
    acc = LikelihoodAccumulator(exact=objective == "ar")
    prior = prior_nats(schedule, vocab_size - 1) if objective != "ar" else 0.0
    counting = tokenizer is not None
    starts = range(1, N, chunk)
    if progress:
        from .events import progress as report
        starts = report(starts, desc="evaluate (stream)", unit="chunks")
    state = None
    zero = torch.zeros(1, device=device)
    for a in starts:
        b = min(a + chunk, N)
        target = ids[a:b].view(1, -1).to(device)
        prev = ids[a - 1:a].to(device) if shift else None
        if objective == "ar":
            with autocast():
                out = model(ids[a - 1:b - 1].view(1, -1).to(device), zero, state=state, return_state=True,
                            pos_offset=a - 1)
            nats, state = ar_nll(out.logits, target), out.state
        else:
            def denoise(xt, t):
                with autocast():
                    return model(xt, t, state=state, pos_offset=a - 1, prev_ids=prev,
                                 context_ids=target if net.mixer.reads_context else None).logits

            nats = masked_nelbo(denoise, target, schedule, mask_id, generator, mc_samples=mc_samples)
            nats = nats + prior * (b - a)
            with autocast():
                state = model(target, zero, state=state, return_state=True, pos_offset=a - 1, prev_ids=prev).state
        chars = _chars(tokenizer, target.cpu(), torch.ones_like(target, dtype=torch.bool).cpu()) if counting else None
        counting = counting and chars is not None
        acc.add(nats.cpu(), torch.tensor([b - a]), chars)
    return acc.summary()


@torch.no_grad()
def score_texts(model, token_lists: Sequence[Sequence[int]], bos_id: int, device: torch.device,
                batch_size: int = 16, progress: bool = False,
                autocast: Callable = nullcontext) -> Tuple[List[float], List[int]]:
    """The exact NLL of each token list under a causal ``model``: per list, the total nats of
    every token given the tokens before it, and the number of tokens.

    ``bos_id`` (the document separator the training corpus was joined with) is read before the
    first token, so the inputs of a list ``ids`` are ``[bos_id, ids[:-1]]`` and its targets
    ``ids``: one causal forward per batch, log-softmax in float32 (float64 stays float64). Lists
    are batched by length and right-padded (a causal model's earlier positions do not see the
    padding), and the padding is not scored. An empty list scores 0 nats over 0 tokens. Returns
    ``(nats, tokens)`` in the order of ``token_lists``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(token_lists)
    nats, tokens = [0.0] * n, [len(ids) for ids in token_lists]
    order = sorted((i for i in range(n) if tokens[i]), key=lambda i: tokens[i])   # similar lengths together
    starts = range(0, len(order), batch_size)
    if progress:
        from .events import progress as report
        starts = report(starts, desc="score samples", unit="batches")
    for start in starts:
        rows = order[start:start + batch_size]
        T = max(tokens[i] for i in rows)
        targets = torch.full((len(rows), T), bos_id, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, i in enumerate(rows):
            targets[r, :tokens[i]] = torch.as_tensor(list(token_lists[i]), dtype=torch.long)
            valid[r, :tokens[i]] = True
        inputs = torch.cat([torch.full((len(rows), 1), bos_id, dtype=torch.long), targets[:, :-1]], 1)
        with autocast():
            logits = model(inputs.to(device), torch.zeros(len(rows), device=device)).logits
        row_nats = ar_nll(logits, targets.to(device), valid=valid.to(device)).cpu().tolist()
        for r, i in enumerate(rows):
            nats[i] = row_nats[r]
    return nats, tokens


def unigram_entropy(ids: Sequence[int]) -> float:
    """The entropy in nats, ``-sum_c p_c log p_c``, of the histogram of ``ids`` (``p_c``: the
    fraction of the ids equal to ``c``); 0 for a sequence of one repeated id or none. Low entropy
    with a low generative perplexity means repetitive samples (MDLM, BD3-LM and DUO report it)."""
    if len(ids) == 0:
        return 0.0
    counts = torch.unique(torch.as_tensor(list(ids), dtype=torch.long), return_counts=True)[1].double()
    p = counts / counts.sum()
    return max(0.0, float(-(p * p.log()).sum()))   # one id: 0.0, not -0.0
