"""Likelihoods of held-out text: the masked-diffusion NELBO and the autoregressive NLL.

Masked (absorbing) diffusion
----------------------------
With keep probability ``alpha(t)`` (``t = 0`` clean, ``t = 1`` all masks), the continuous-time
negative ELBO of a sequence ``x`` of ``L`` tokens (MDLM, Sahoo et al. 2024, eq. 10) is

    NELBO(x) = E_{t ~ U(0,1)} E_{x_t ~ q(.|x, t)} [ w(t) * sum_{i masked in x_t} -log p_theta(x_i | x_t, t) ],
    w(t) = -alpha'(t) / (1 - alpha(t)),

where ``q(.|x, t)`` masks each position independently with probability ``1 - alpha(t)``. It
bounds ``-log p_theta(x)`` from above, so ``exp(NELBO / L)`` bounds the perplexity from above.
``p_theta`` excludes the mask token (its logit is set to ``-inf`` before the log-softmax): the
clean token is never the mask, MDLM's "zero masking probabilities" parameterisation, which only
moves probability the model wasted on the mask onto real tokens.

The full bound also has a reconstruction term ``E -log p(x | x_0)`` and a prior term
``KL(q(x_1 | x) || p(x_1))``. The reconstruction term is 0 for every schedule here
(``alpha(0) = 1``: nothing is masked at ``t = 0``). The prior term is 0 when ``alpha(1) = 0``
(``linear``, ``cosine``, ``power``, ``sigmoid``: ``x_1`` is all masks, as is the prior). For
``loglinear``, ``alpha(1) = eps``: ``x_1`` still holds each token with probability ``eps``, and
coding them from a prior that keeps a position with probability ``eps`` and draws its token
uniformly costs ``eps * log(V - 1)`` nats per token (about 0.011 for ``eps = 1e-3``, ``V = 65536``).
:func:`masked_nelbo` returns the diffusion term only (MDLM reports that); :func:`prior_nats`
gives the prior term per token, which the trainer and ``evaluate`` add so that what they report
is a strict bound for every schedule.

:func:`masked_nelbo` estimates the bound without bias by drawing exactly this forward process:
one ``t`` per sequence (stratified over the batch, MDLM's low-discrepancy sampler), each valid
position masked independently with probability ``mask_rate(t)``. None of the training-time
options of :class:`~rwkv_diffusion_rnn.diffusion.diffusion_process.MaskedDiffusion` (a forced
mask in a row that drew none, a rate floor, spans, truncation, a weight cap) is applied: each
would change the expectation (a forced mask or a rate floor even makes it infinite under the
``~1/t`` weight). A single row has a heavy tail: for ``t < 1/L`` it masks one token with
probability ``~L t`` and weighs it by ``~1/t``, so its variance diverges like ``log(1/t_min)``.
The mean still converges; the tail matters for short sequences (a few tokens: the reported
standard error then varies from sample to sample) and hardly for long ones, where it is a
``~1/L`` share of the variance.

Autoregressive
--------------
:func:`ar_nll` is the exact ``-log p(x)`` of a left-to-right model from its logits.

:class:`LikelihoodAccumulator` sums either over batches into a :class:`LikelihoodSummary`
(nats, bits per token and per character, perplexity, Monte-Carlo standard error).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch

from .diffusion_process import MaskSchedule

__all__ = ["masked_nelbo", "prior_nats", "ar_nll", "LikelihoodSummary", "LikelihoodAccumulator"]

# Positions whose log-softmax is taken at once: bounds the float32 copy of [rows, V] logits to
# 2**26 elements (256 MiB) however large the batch and vocabulary are.
_MAX_SOFTMAX_ELEMENTS = 1 << 26


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 at least (bf16 logits lose nats in the log-softmax); float64 logits stay float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _token_logprob(logits: torch.Tensor, targets: torch.Tensor,
                   exclude: Optional[int] = None) -> torch.Tensor:
    """``log softmax(logits)[target]`` per row of ``logits`` [N, V] (at least float32), in chunks.

    ``exclude``: a token id whose logit is set to ``-inf`` first (the mask token).
    """
    N, V = logits.shape
    out = torch.empty(N, dtype=_compute_dtype(logits), device=logits.device)
    step = max(1, _MAX_SOFTMAX_ELEMENTS // max(V, 1))
    for i in range(0, N, step):
        chunk = logits[i:i + step].to(out.dtype)
        if exclude is not None and 0 <= exclude < V:
            chunk = chunk.clone()
            chunk[:, exclude] = float("-inf")
        out[i:i + step] = torch.log_softmax(chunk, dim=-1).gather(1, targets[i:i + step, None]).squeeze(1)
    return out


def _check_valid(valid: Optional[torch.Tensor], shape, device, name: str = "valid") -> torch.Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(valid.shape)}")
    return valid.to(device=device, dtype=torch.bool)


def masked_nelbo(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                 schedule: MaskSchedule, mask_id: int, generator: torch.Generator, *,
                 valid: Optional[torch.Tensor] = None, mc_samples: int = 1,
                 rows: slice = slice(None)) -> torch.Tensor:
    """Unbiased Monte-Carlo estimates of the masked-diffusion NELBO of each sequence (module docstring).

    Args:
        denoise: ``denoise(xt [B, T] long, t [B] float32) -> logits [B, T, V]`` (any float
            dtype), e.g. ``lambda xt, t: model(xt, t).logits``.
        x0: [B, T] clean ids on the model's device; no valid position may hold ``mask_id``.
        schedule: the masking schedule the model was trained with.
        mask_id: id written at masked positions; excluded from the predicted distribution.
        generator: a CPU ``torch.Generator``, the only source of randomness. Each draw takes, in
            this order, one uniform ``u``, a permutation of ``B`` and ``B x T`` uniforms (for
            every position, valid or not, so ``valid`` does not shift later draws); the same
            generator state gives the same value.
        valid: optional bool [B, T]: positions that exist. Only they are masked and scored;
            the others are passed to ``denoise`` as they are.
        mc_samples: independent draws per sequence (one ``denoise`` call of [B, T] each).
        rows: score only these rows (one process's share of the batch): the draws are made for
            all ``B`` rows as always, ``denoise`` sees only these, and the result has their columns.

    Each draw gives row ``b`` the time ``t_b = 1 - (u + pi(b)) / B`` (in (0, 1]; every stratum
    ``[k/B, (k+1)/B)`` holds one row, and each row's ``t`` alone is uniform), masks each of its
    valid positions with probability ``schedule.mask_rate(t_b)`` and scores
    ``w(t_b) * sum over masked positions of -log p(x0_i | xt, t_b)``. A row that drew no mask
    scores 0. The log-softmax is taken in float32 (float64 logits stay float64), sums in float64.

    Returns float64 [mc_samples, B] (B: the rows scored) on ``x0``'s device: nats per
    sequence, summed over its tokens. The result is differentiable; call under ``torch.no_grad()`` to evaluate.
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [B, T] token ids, got shape {tuple(x0.shape)}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (draws are made on the CPU so "
                         f"that a value does not depend on the device), got one on {generator.device}")
    B, T = x0.shape
    device = x0.device
    valid = _check_valid(valid, (B, T), device)
    if bool((x0.eq(mask_id) & valid).any()):
        raise ValueError(f"x0 holds the mask id {mask_id} at a valid position: its likelihood is 0 "
                         "under a model that never predicts the mask; mark it invalid or remap it")
    x0_r, valid_r = x0[rows], valid[rows]
    n = x0_r.shape[0]
    row_ids = torch.arange(n, device=device)[:, None].expand(n, T)
    estimates = []
    for _ in range(mc_samples):
        # Randomness on the CPU, in float64 (so t stays strictly inside (0, 1] for any B).
        u = torch.rand((1,), generator=generator, dtype=torch.float64)
        perm = torch.randperm(B, generator=generator)
        t = (1.0 - (u + perm.to(torch.float64)) / B)[rows]
        rate = schedule.mask_rate(t)
        weight = schedule.elbo_weight(t)
        draw = torch.rand((B, T), generator=generator, dtype=torch.float64)[rows]
        is_masked = (draw < rate[:, None]).to(device) & valid_r
        xt = torch.where(is_masked, torch.full_like(x0_r, mask_id), x0_r)

        logits = denoise(xt, t.to(device=device, dtype=torch.float32))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (n, T):
            raise ValueError(f"denoise must return logits [B, T, V] = [{n}, {T}, V], got "
                             f"{tuple(logits.shape)}")
        # Only the masked positions go through the log-softmax: with a 65536-token vocabulary the
        # full [B, T, V] float32 copy would dwarf the model's own activations.
        logp = _token_logprob(logits[is_masked], x0_r[is_masked], exclude=mask_id)
        nll = torch.zeros(n, dtype=torch.float64, device=device).index_add(
            0, row_ids[is_masked], -logp.to(torch.float64))
        # A row without a mask contributes exactly 0, also where its weight is large.
        estimates.append(torch.where(is_masked.any(1), weight.to(device) * nll, torch.zeros_like(nll)))
    return torch.stack(estimates)


def prior_nats(schedule: MaskSchedule, num_tokens: int) -> float:
    """The prior term of the bound per token: ``alpha(1) * log(num_tokens)`` nats, the cost of the
    tokens still clean at ``t = 1`` under a prior that keeps a position with probability
    ``alpha(1)`` and draws its token uniformly from the ``num_tokens`` real (non-mask) tokens.
    0 for schedules that end at all masks."""
    keep = float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    # below 1e-12 is rounding (cosine's alpha(1) = cos(pi/2) = 6e-17), not a schedule that keeps tokens
    return keep * math.log(num_tokens) if keep > 1e-12 else 0.0


def ar_nll(logits: torch.Tensor, targets: torch.Tensor, *,
           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact negative log-likelihood of a left-to-right model, per sequence.

    ``logits`` [B, T, V] (any float dtype) predict ``targets`` [B, T] at the same position
    (the caller shifts: logits of tokens ``0..T-2`` with targets ``1..T-1``). ``valid``: optional
    bool [B, T] of the positions to score; targets elsewhere may be any id (padding, -100).
    Log-softmax in float32 (float64 stays float64); returns float64 [B]: the sum over valid
    positions of ``-log softmax(logits)[target]``.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(targets.shape):
        raise ValueError(f"logits must be [B, T, V] with [B, T] = targets' shape "
                         f"{tuple(targets.shape)}, got {tuple(logits.shape)}")
    B, T = targets.shape
    valid = _check_valid(valid, (B, T), targets.device)
    rows = torch.arange(B, device=targets.device)[:, None].expand(B, T)
    logp = _token_logprob(logits[valid], targets[valid])
    return torch.zeros(B, dtype=torch.float64, device=targets.device).index_add(
        0, rows[valid], -logp.to(torch.float64))


@dataclass
class LikelihoodSummary:
    """Corpus-level likelihood of a model (see :class:`LikelihoodAccumulator`)."""
    nats_per_token: float
    bits_per_token: float
    bits_per_char: Optional[float]   # None when the character count is unknown
    perplexity: float                # exp(nats_per_token); an upper bound for a diffusion model
    tokens: int                      # tokens scored (each once, not times mc_samples)
    chars: Optional[int]
    stderr: float                    # Monte-Carlo standard error of nats_per_token (0.0 for an exact NLL)
    mc_samples: int

    def as_dict(self, prefix: str = "") -> dict:
        """The fields as a dict, each key ``prefix + name`` (e.g. ``"eval/nats_per_token"``)."""
        return {prefix + k: v for k, v in asdict(self).items()}


class LikelihoodAccumulator:
    """Sums per-sequence estimates over batches; summary() gives a LikelihoodSummary.

    ``exact=True`` for exact NLLs (:func:`ar_nll`): the standard error is then 0.0.
    Per sequence it keeps ``r_b`` (its nats, averaged over the Monte-Carlo draws) and ``n_b``
    (its scored tokens); sequences with no scored token (batch padding) are not counted.
    """

    def __init__(self, exact: bool = False):
        self.exact = bool(exact)
        self._nats: List[torch.Tensor] = []
        self._tokens: List[torch.Tensor] = []
        self._chars: Optional[int] = 0
        self._mc_samples: Optional[int] = None

    def add(self, nats: torch.Tensor, tokens: torch.Tensor, chars: Optional[int] = None) -> None:
        """Adds one batch.

        ``nats``: [mc_samples, B] (:func:`masked_nelbo`) or [B] (:func:`ar_nll`); ``tokens``: [B]
        scored tokens per sequence; ``chars``: characters of the batch's scored tokens (None if
        unknown; once None, the summary's ``bits_per_char`` stays None).
        """
        nats = torch.as_tensor(nats).detach().to("cpu", torch.float64)
        if nats.dim() == 1:
            nats = nats[None]
        tokens = torch.as_tensor(tokens).detach().to("cpu", torch.float64).reshape(-1)
        if nats.dim() != 2 or nats.shape[1] != tokens.shape[0]:
            raise ValueError(f"nats must be [mc_samples, B] or [B] with B = len(tokens) = "
                             f"{tokens.shape[0]}, got shape {tuple(nats.shape)}")
        if self._mc_samples is not None and nats.shape[0] != self._mc_samples:
            raise ValueError(f"nats has {nats.shape[0]} Monte-Carlo draws per sequence but earlier "
                             f"batches had {self._mc_samples}; use one mc_samples per accumulator")
        self._mc_samples = nats.shape[0]
        keep = tokens > 0
        self._nats.append(nats.mean(0)[keep])
        self._tokens.append(tokens[keep])
        if chars is None or self._chars is None:
            self._chars = None
        else:
            self._chars += int(chars)

    @classmethod
    def combine(cls, parts: Sequence["LikelihoodAccumulator"]) -> "LikelihoodAccumulator":
        """One accumulator holding the sequences of all ``parts`` (the shares of several
        processes that scored one corpus)."""
        out = cls(exact=parts[0].exact)
        for part in parts:
            out._nats += part._nats
            out._tokens += part._tokens
            out._chars = None if out._chars is None or part._chars is None else out._chars + part._chars
            out._mc_samples = out._mc_samples if part._mc_samples is None else part._mc_samples
        return out

    def summary(self) -> LikelihoodSummary:
        """The corpus summary; ``nats_per_token = sum_b r_b / sum_b n_b``.

        The standard error is the ratio estimator's: with ``R`` that ratio and ``S`` sequences,
        ``sqrt(sum_b (r_b - R n_b)^2 / (S (S - 1))) / mean(n_b)`` (0.0 if ``exact`` or
        ``S < 2``). Sequences are its sampling unit, so it counts the spread of the sequences'
        own values as well as the Monte-Carlo noise: it is the error of the corpus value as an
        estimate of the model's expected NELBO per token on text like the corpus, and it is
        (in expectation) not below the Monte-Carlo error of the corpus value alone.
        ``bits_per_char`` is None when any batch's character count was unknown (or all were 0).
        """
        if not self._nats:
            raise ValueError("LikelihoodAccumulator.summary: no sequence with a scored token was added")
        r = torch.cat(self._nats)
        n = torch.cat(self._tokens)
        total_tokens = float(n.sum())
        if total_tokens == 0:
            raise ValueError("LikelihoodAccumulator.summary: no scored token was added")
        total_nats = float(r.sum())
        R = total_nats / total_tokens
        S = r.numel()
        stderr = 0.0
        if not self.exact and S >= 2:
            stderr = math.sqrt(float(((r - R * n) ** 2).sum()) / (S * (S - 1))) / float(n.mean())
        try:
            perplexity = math.exp(R)
        except OverflowError:
            perplexity = math.inf
        chars = self._chars
        return LikelihoodSummary(
            nats_per_token=R,
            bits_per_token=R / math.log(2),
            bits_per_char=(total_nats / chars / math.log(2)) if chars else None,
            perplexity=perplexity,
            tokens=int(round(total_tokens)),
            chars=chars,
            stderr=stderr,
            mc_samples=self._mc_samples,
        )
