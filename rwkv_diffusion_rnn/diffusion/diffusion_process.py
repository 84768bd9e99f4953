"""Masked diffusion for text: masking schedules, forward noising and the training losses.

Time ``t`` runs over [0, 1]. At time ``t`` every maskable token is independently replaced by the
mask token with probability ``p_mask(t) = 1 - alpha(t)``; ``alpha(t)`` is the probability that a
token is kept. ``t = 0`` is clean text, ``t = 1`` is all masks. The denoiser sees the noised
sequence ``xt`` and predicts the clean token at every masked position.

Schedules (``make_schedule(name, **kwargs)``), each with ``p_mask(0) = 0`` and ``p_mask(1) = 1``
unless stated:

=========== ================================================ ===================================
name        p_mask(t)                                        arguments
=========== ================================================ ===================================
linear      t                                                -
cosine      1 - cos(pi t / 2)                                -
loglinear   (1 - eps) t; p_mask(1) = 1 - eps, the total      eps (default 1e-3)
            noise -log(alpha(t)) = -log(1 - (1 - eps) t)
            is finite at t = 1
power       t ** exponent                                    exponent > 0 (default 2)
sigmoid     sigmoid(scale (t - shift)), rescaled so that     scale > 0 (default 10),
            the ends are exactly 0 and 1                     shift (default 0.5)
=========== ================================================ ===================================

:class:`MaskedDiffusion` holds one schedule plus the masking options (i.i.d. or span masking,
mask token or random replacement, a floor on the masking rate, LLaDA's random-length truncation)
and the loss (``mdlm``, ``llada`` or ``soft_ce``).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..common.checks import Flag, Num, check_options

__all__ = [
    "MaskSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "LogLinearSchedule",
    "PowerSchedule",
    "SigmoidSchedule",
    "SCHEDULES",
    "make_schedule",
    "MaskedDiffusion",
    "NOISE_TYPES",
    "LOSS_TYPES",
]


def _as_time(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.float()
    return t.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


class MaskSchedule:
    """A masking schedule: ``mask_rate(t)`` is increasing on [0, 1] from 0 to 1.

    Subclasses define ``mask_rate`` and its derivative ``mask_rate_prime``; everything else
    follows. Inputs are floats or tensors of any shape (clamped to [0, 1]); outputs have the same
    shape and the floating dtype of ``t`` (float32 for integer input).
    """

    name = "base"

    def mask_rate(self, t) -> torch.Tensor:
        raise NotImplementedError

    def mask_rate_prime(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        """Keep probability ``1 - mask_rate(t)``."""
        return 1.0 - self.mask_rate(t)

    def alpha_prime(self, t) -> torch.Tensor:
        """Exact derivative d alpha / dt (<= 0)."""
        return -self.mask_rate_prime(t)

    def elbo_weight(self, t) -> torch.Tensor:
        """MDLM's continuous-time ELBO weight ``-alpha'(t) / (1 - alpha(t))`` (``1/t`` for linear).

        Infinite at ``t = 0``; callers keep ``t`` away from 0 (see ``MaskedDiffusion.eps``).
        """
        return -self.alpha_prime(t) / self.mask_rate(t)

    def t_for_rate(self, rate: float) -> float:
        """Smallest ``t`` with ``mask_rate(t) >= rate`` (bisection; 1.0 if the rate is never reached)."""
        if rate <= 0.0:
            return 0.0
        lo, hi = 0.0, 1.0
        if float(self.mask_rate(torch.tensor(hi, dtype=torch.float64))) < rate:
            return 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(self.mask_rate(torch.tensor(mid, dtype=torch.float64))) >= rate:
                hi = mid
            else:
                lo = mid
        return hi

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class LinearSchedule(MaskSchedule):
    """``p_mask(t) = t``: the same share of tokens is unmasked per unit of time throughout."""

    name = "linear"

    def mask_rate(self, t):
        return _as_time(t)

    def mask_rate_prime(self, t):
        return torch.ones_like(_as_time(t))


class CosineSchedule(MaskSchedule):
    """``p_mask(t) = 1 - cos(pi t / 2)``: few masks early, most of the change near ``t = 1``."""

    name = "cosine"

    def mask_rate(self, t):
        # At t = 1, cos(pi/2) is ~6e-17, so the rate rounds to exactly 1 in float32 and float64.
        return 1.0 - torch.cos(0.5 * math.pi * _as_time(t))

    def mask_rate_prime(self, t):
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * _as_time(t))


class LogLinearSchedule(MaskSchedule):
    """MDLM's default: ``alpha(t) = 1 - (1 - eps) t``, i.e. total noise ``-log(1 - (1 - eps) t)``.

    ``p_mask(0) = 0`` and ``p_mask(1) = 1 - eps`` (not exactly 1: the total noise stays finite).
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"loglinear schedule: eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def mask_rate(self, t):
        return (1.0 - self.eps) * _as_time(t)

    def mask_rate_prime(self, t):
        return torch.full_like(_as_time(t), 1.0 - self.eps)


class PowerSchedule(MaskSchedule):
    """``p_mask(t) = t ** exponent``: exponent > 1 masks less early on, < 1 masks more."""

    name = "power"

    def __init__(self, exponent: float = 2.0):
        if not exponent > 0:
            raise ValueError(f"power schedule: exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def mask_rate(self, t):
        return _as_time(t) ** self.exponent

    def mask_rate_prime(self, t):
        return self.exponent * _as_time(t) ** (self.exponent - 1.0)


class SigmoidSchedule(MaskSchedule):
    """A sigmoid centred at ``shift`` with slope ``scale``, rescaled to go exactly from 0 to 1:

    ``p_mask(t) = (sigmoid(scale (t - shift)) - sigmoid(-scale shift)) / Z`` with
    ``Z = sigmoid(scale (1 - shift)) - sigmoid(-scale shift)``.
    """

    name = "sigmoid"

    def __init__(self, scale: float = 10.0, shift: float = 0.5):
        if not scale > 0:
            raise ValueError(f"sigmoid schedule: scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.shift = float(shift)
        lo = 1.0 / (1.0 + math.exp(self.scale * self.shift))
        hi = 1.0 / (1.0 + math.exp(-self.scale * (1.0 - self.shift)))
        self._lo, self._z = lo, hi - lo

    def mask_rate(self, t):
        s = torch.sigmoid(self.scale * (_as_time(t) - self.shift))
        return ((s - self._lo) / self._z).clamp(0.0, 1.0)

    def mask_rate_prime(self, t):
        s = torch.sigmoid(self.scale * (_as_time(t) - self.shift))
        return self.scale * s * (1.0 - s) / self._z


SCHEDULES = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "loglinear": LogLinearSchedule,
    "power": PowerSchedule,
    "sigmoid": SigmoidSchedule,
}


def make_schedule(name: str, **kwargs) -> MaskSchedule:
    """Build a schedule by name (``linear``, ``cosine``, ``loglinear``, ``power``, ``sigmoid``)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"schedule {name!r} got unexpected arguments {sorted(kwargs)}: {e}") from None


# --------------------------------------------------------------------------------------------
# Random draws that honour an optional generator
# --------------------------------------------------------------------------------------------


def _rand(shape, generator, device) -> torch.Tensor:
    if generator is not None:
        device = generator.device
    return torch.rand(shape, generator=generator, device=device)


def _randperm(n: int, generator, device) -> torch.Tensor:
    if generator is not None:
        device = generator.device
    return torch.randperm(n, generator=generator, device=device)


def _composition(total: int, parts: int, generator, device) -> list[int]:
    """A uniformly random split of ``total`` into ``parts`` non-negative integers (stars and bars)."""
    if parts == 1:
        return [total]
    bars = sorted(_randperm(total + parts - 1, generator, device)[: parts - 1].tolist())
    edges = [-1] + bars + [total + parts - 1]
    return [edges[i + 1] - edges[i] - 1 for i in range(parts)]


# --------------------------------------------------------------------------------------------
# Masked diffusion
# --------------------------------------------------------------------------------------------

NOISE_TYPES = ("mask", "random_replace")


def undecodable_noise(noise_type: str) -> Optional[str]:
    """Why a model trained with ``text_noise.noise_type=noise_type`` cannot be scored by the bound
    or decoded by the samplers (None when it can): both are masked diffusion's, they write and
    decode ``mask_id``, while uniform-state noise (``random_replace``, UDLM / Duo) corrupts tokens
    into other tokens, a process with its own bound and sampler that this project does not have.
    (Span masking, ``span_prob``, changes only which positions training masks: the bound with
    i.i.d. masks is still a bound of the model, measured under i.i.d. masking.)"""
    if noise_type == "mask":
        return None
    return (f"it was trained with text_noise.noise_type={noise_type} (uniform-state noise: tokens replaced by "
            "random tokens); the likelihood bound and the samplers are masked diffusion's, they write and "
            "decode mask_id, so they would score and sample another process than the one it learned. There is "
            "no bound or sampler for uniform noise here: train with text_noise.noise_type=mask")
LOSS_TYPES = ("mdlm", "llada", "soft_ce")
# the text_noise.* numbers and flags MaskedDiffusion reads, with their ranges
OPTIONS = {
    "min_masking_rate": Num(0, 1), "span_prob": Num(0, 1), "truncate_prob": Num(0, 1),
    "mean_span_length": Num(lo=1), "reweight_cap": Num(lo=0, lo_open=True, optional=True, null_means="no cap"),
    "label_smoothing": Num(0, 1, hi_open=True, optional=True), "low_discrepancy": Flag(), "sft": Flag(),
}


class MaskedDiffusion:
    """Forward process and loss of masked (absorbing-state) text diffusion.

    Args:
        schedule: a schedule name (see :data:`SCHEDULES`) or a :class:`MaskSchedule`.
        mask_id: id written at masked positions (65535 for the RWKV World vocabulary).
        vocab_size: number of token ids; ``random_replace`` draws from ``[0, vocab_size)`` minus ``mask_id``.
        schedule_kwargs: arguments of the named schedule (e.g. ``{"exponent": 3}`` for ``power``).
        noise_type: ``"mask"`` writes ``mask_id``; ``"random_replace"`` writes a uniformly random
            other token (never ``mask_id``; it may coincide with the clean token).
        min_masking_rate: floor on the masking rate. :meth:`sample_t` only draws times whose
            ``p_mask(t)`` is at least this, and :meth:`mask_rate` clamps explicit times up to it.
        span_prob: probability that a row is masked with contiguous spans instead of i.i.d.
        mean_span_length: average length of a span in span-masked rows.
        truncate_prob: probability that :meth:`maybe_truncate` cuts the whole batch to a random
            length uniform in ``[1, T]`` (LLaDA does this for 1% of pretraining batches).
        loss_type: ``"mdlm"``, ``"llada"`` or ``"soft_ce"`` (see :meth:`loss`).
        label_smoothing: smoothing of ``soft_ce`` (default 0.1 there); must be unset or 0 for the others.
        reweight_cap: if set, every per-row loss weight is clipped at this value.
        eps: :meth:`sample_t` draws ``t`` from ``[eps, 1]`` so the ``1/t``-like weights stay finite;
            it also bounds the weight denominators from below.
        low_discrepancy: draw the batch's times stratified (``(u + i) / B`` for row ``i`` with one
            shared uniform ``u``, then shuffled) as MDLM's antithetic sampling does; lowers the
            variance of the batch loss.
    """

    def __init__(
        self,
        schedule: str | MaskSchedule = "linear",
        mask_id: int = 65535,
        vocab_size: int = 65536,
        *,
        schedule_kwargs: Optional[Mapping] = None,
        noise_type: str = "mask",
        min_masking_rate: float = 0.0,
        span_prob: float = 0.0,
        mean_span_length: float = 8.0,
        truncate_prob: float = 0.01,
        loss_type: str = "mdlm",
        label_smoothing: Optional[float] = None,
        reweight_cap: Optional[float] = None,
        eps: float = 1e-3,
        low_discrepancy: bool = False,
    ):
        if isinstance(schedule, MaskSchedule):
            if schedule_kwargs:
                raise ValueError("schedule_kwargs: only allowed when schedule is given by name")
            self.schedule = schedule
        else:
            self.schedule = make_schedule(schedule, **dict(schedule_kwargs or {}))
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {list(NOISE_TYPES)}, got {noise_type!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        check_options("text_noise", dict(min_masking_rate=min_masking_rate, span_prob=span_prob,
                                         truncate_prob=truncate_prob, mean_span_length=mean_span_length,
                                         reweight_cap=reweight_cap), OPTIONS)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if loss_type == "soft_ce":
            label_smoothing = 0.1 if label_smoothing is None else label_smoothing
            OPTIONS["label_smoothing"].check("text_noise.label_smoothing", label_smoothing)
        elif label_smoothing:
            raise ValueError(
                f"label_smoothing={label_smoothing} is only used by loss_type='soft_ce' "
                f"(got loss_type={loss_type!r}); set it to null/0 or use soft_ce"
            )
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.noise_type = noise_type
        self.min_masking_rate = float(min_masking_rate)
        self.span_prob = float(span_prob)
        self.mean_span_length = float(mean_span_length)
        self.truncate_prob = float(truncate_prob)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing or 0.0)
        self.reweight_cap = None if reweight_cap is None else float(reweight_cap)
        self.eps = float(eps)
        self.low_discrepancy = bool(low_discrepancy)
        # Lowest time sample_t draws: away from 0, and late enough to honour the rate floor.
        self.t_min = max(self.eps, self.schedule.t_for_rate(self.min_masking_rate))

    # ---- time ---------------------------------------------------------------------------------

    def sample_t(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """Times ``t`` [batch_size] (float32), uniform on ``[t_min, 1]``."""
        if self.low_discrepancy:
            u = _rand((1,), generator, device)
            offsets = torch.arange(batch_size, device=u.device, dtype=u.dtype) / batch_size
            u = (u + offsets) % 1.0
            u = u[_randperm(batch_size, generator, u.device)]
        else:
            u = _rand((batch_size,), generator, device)
        return self.t_min + (1.0 - self.t_min) * u

    def mask_rate(self, t) -> torch.Tensor:
        """The masking probability actually used: ``max(p_mask(t), min_masking_rate)``."""
        return self.schedule.mask_rate(t).clamp_min(self.min_masking_rate)

    # ---- forward process ----------------------------------------------------------------------

    def noise(self, x0: torch.Tensor, t, maskable: Optional[torch.Tensor] = None, generator=None):
        """Noise clean tokens ``x0`` [B, T] at times ``t`` ([B] or a scalar).

        Each position where ``maskable`` [B, T] (bool; default all True) is set is masked with
        probability ``mask_rate(t)`` of its row; other positions are never touched. A row with
        at least one maskable position always gets at least one masked position (one is picked
        at random if the draw masked none). Rows chosen for span masking (probability
        ``span_prob``) mask ``round(rate * n)`` of their ``n`` maskable positions (at least 1)
        as about ``n_masked / mean_span_length`` contiguous runs, placed uniformly at random
        in the row's maskable positions taken in order.

        ``generator``, if given, must live on ``x0``'s device. Returns ``(xt, is_masked)``:
        the noised ids (``x0``'s dtype) and the bool [B, T] of noised positions.
        """
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [B, T] token ids, got shape {tuple(x0.shape)}")
        B, T = x0.shape
        device = x0.device
        if maskable is None:
            maskable = torch.ones(B, T, dtype=torch.bool, device=device)
        elif maskable.shape != x0.shape or maskable.dtype != torch.bool:
            raise ValueError(f"maskable must be a bool tensor of shape {tuple(x0.shape)}, got "
                             f"{maskable.dtype} {tuple(maskable.shape)}")
        rate = self.mask_rate(torch.as_tensor(t, device=device, dtype=torch.float32)).expand(B)

        is_masked = (_rand((B, T), generator, device) < rate[:, None]) & maskable
        if self.span_prob > 0:
            span_rows = (_rand((B,), generator, device) < self.span_prob).tolist()
            if any(span_rows):
                n_maskable = maskable.sum(1).tolist()
                rates = rate.tolist()
                for b in (i for i, s in enumerate(span_rows) if s and n_maskable[i] > 0):
                    positions = maskable[b].nonzero().squeeze(1)
                    row = self._span_mask(n_maskable[b], rates[b], generator, device)
                    is_masked[b] = False
                    is_masked[b, positions[row]] = True

        # At least one masked position in every row that has something maskable.
        empty = maskable.any(1) & ~is_masked.any(1)
        if empty.any():
            scores = _rand((B, T), generator, device).masked_fill(~maskable, -1.0)
            pick = scores.argmax(1)
            is_masked[empty, pick[empty]] = True

        if self.noise_type == "mask":
            fill = torch.full_like(x0, self.mask_id)
        else:
            fill = self._random_tokens((B, T), generator, device).to(x0.dtype)
        xt = torch.where(is_masked, fill, x0)
        return xt, is_masked

    def _span_mask(self, n: int, rate: float, generator, device) -> torch.Tensor:
        """Bool [n]: ``k = round(rate n)`` (clamped to [1, n]) positions in contiguous runs."""
        k = min(max(int(round(rate * n)), 1), n)
        m = max(1, int(round(k / self.mean_span_length)))
        m = min(m, k, n - k + 1)  # m runs need m-1 separating gaps of at least one position
        sizes = [s + 1 for s in _composition(k - m, m, generator, device)]  # m positive parts
        gaps = _composition(n - k - (m - 1), m + 1, generator, device)      # m+1 gaps >= 0 ...
        for i in range(1, m):
            gaps[i] += 1                                                     # ... inner ones >= 1
        row = torch.zeros(n, dtype=torch.bool)
        pos = gaps[0]
        for i in range(m):
            row[pos : pos + sizes[i]] = True
            pos += sizes[i] + gaps[i + 1]
        return row.to(device)

    def _random_tokens(self, shape, generator, device) -> torch.Tensor:
        """Uniform ids in ``[0, vocab_size)`` other than ``mask_id``."""
        exclude = 0 <= self.mask_id < self.vocab_size
        high = self.vocab_size - 1 if exclude else self.vocab_size
        u = _rand(shape, generator, device)
        ids = (u * high).long().clamp_max(high - 1)
        if exclude:
            ids = ids + (ids >= self.mask_id).long()
        return ids

    # ---- truncation ---------------------------------------------------------------------------

    def truncation_length(self, seq_len: int, generator=None, device=None) -> int:
        """With probability ``truncate_prob`` a length uniform in ``[1, seq_len]``, else ``seq_len``."""
        if self.truncate_prob <= 0.0 or seq_len <= 1:
            return seq_len
        coin, u = _rand((2,), generator, device).tolist()
        if coin >= self.truncate_prob:
            return seq_len
        return min(1 + int(u * seq_len), seq_len)

    def maybe_truncate(self, *tensors: Optional[torch.Tensor], generator=None) -> tuple:
        """Randomly truncate a batch (see :meth:`truncation_length`).

        Every tensor given is [B, T, ...] and is cut to ``[:, :L]`` with the same ``L``; ``None``
        passes through. Returns a tuple with one entry per argument. Meant for pretraining;
        in SFT it could cut away the answer, so use ``truncate_prob=0`` there.
        """
        present = [x for x in tensors if x is not None]
        if not present:
            return tuple(tensors)
        seq_len = present[0].shape[1]
        for x in present:
            if x.dim() < 2 or x.shape[1] != seq_len:
                raise ValueError(f"maybe_truncate: every tensor must be [B, {seq_len}, ...], "
                                 f"got shape {tuple(x.shape)}")
        L = self.truncation_length(seq_len, generator, present[0].device)
        if L == seq_len:
            return tuple(tensors)
        return tuple(None if x is None else x[:, :L] for x in tensors)

    # ---- loss ---------------------------------------------------------------------------------

    def loss_weight(self, t) -> torch.Tensor:
        """Per-row weight [B] of the masked-token cross-entropy (float32), clipped at ``reweight_cap``.

        ``mdlm``: ``-alpha'(t) / (1 - alpha(t))`` of the schedule (``1/t`` for linear; uses the
        schedule's own rate, so with a ``min_masking_rate`` floor it matches the rate used for
        noising whenever ``t`` comes from :meth:`sample_t`). ``llada`` and ``soft_ce``:
        ``1 / mask_rate(t)`` (the floored rate actually used for noising).
        Denominators are bounded below by ``eps``.
        """
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.loss_type == "mdlm":
            w = -self.schedule.alpha_prime(t) / self.schedule.mask_rate(t).clamp_min(self.eps)
        else:
            w = 1.0 / self.mask_rate(t).clamp_min(self.eps)
        if self.reweight_cap is not None:
            w = w.clamp_max(self.reweight_cap)
        return w

    def loss(
        self,
        logits: torch.Tensor,
        x0: torch.Tensor,
        is_masked: torch.Tensor,
        t,
        valid: Optional[torch.Tensor] = None,
        answer_lengths: Optional[torch.Tensor] = None,
        normalizer: Optional[float] = None,
    ):
        """Weighted cross-entropy at the masked positions.

        Args:
            logits: [B, T, V], any float dtype; the cross-entropy is computed in float32.
            x0: [B, T] clean ids; is_masked: [B, T] bool from :meth:`noise`; t: [B] times.
            valid: optional [B, T] bool of positions that exist (e.g. not padding).
            answer_lengths: optional [B] answer length per row: SFT normalisation.
            normalizer: optional divisor in place of ``N`` (or ``B`` with ``answer_lengths``):
                the whole batch's, when these rows are one process's share of it.

        With ``ce[b, i]`` the cross-entropy of row ``b`` position ``i`` (label-smoothed by
        ``label_smoothing`` for ``soft_ce``: ``(1 - s) ce + s mean_v(-log p_v)``), ``w[b]``
        from :meth:`loss_weight` and ``M`` the set of positions that are masked and valid:

        * ``mdlm``:    ``sum_{(b,i) in M} w[b] ce[b,i] / N`` with ``w = -alpha'(t)/(1-alpha(t))``
        * ``llada``:   ``sum_{(b,i) in M} ce[b,i] / mask_rate(t_b) / N``
        * ``soft_ce``: as ``llada`` with the label-smoothed cross-entropy

        where ``N`` is the number of valid positions (``B * T`` when ``valid`` is None). With
        ``answer_lengths`` (SFT, as LLaDA): ``(1/B) sum_b sum_{i: (b,i) in M} w[b] ce[b,i] / answer_lengths[b]``.

        Returns ``(loss, stats)``; ``stats`` holds detached 0-dim tensors: ``ce`` (mean unweighted
        cross-entropy over ``M``), ``acc`` (argmax accuracy over ``M``), ``masked_frac``
        (``|M| / N``), ``num_masked`` and ``weight`` (mean of ``w``).
        """
        B, T = x0.shape
        if logits.dim() != 3 or logits.shape[:2] != (B, T):
            raise ValueError(f"logits must be [B, T, V] = [{B}, {T}, V], got {tuple(logits.shape)}")
        if is_masked.shape != x0.shape:
            raise ValueError(f"is_masked must have shape {tuple(x0.shape)}, got {tuple(is_masked.shape)}")
        sel = is_masked.bool()
        if valid is not None:
            sel = sel & valid.bool()
            n_valid = valid.sum().float().clamp_min(1.0)
        else:
            n_valid = torch.tensor(float(B * T), device=x0.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=x0.device).expand(B)
        w_row = self.loss_weight(t).to(x0.device)

        picked = logits[sel].float()  # only masked rows of the (possibly huge) vocabulary
        targets = x0[sel]
        ce = F.cross_entropy(picked, targets, reduction="none", label_smoothing=self.label_smoothing)
        rows = torch.arange(B, device=x0.device)[:, None].expand(B, T)[sel]
        weighted = ce * w_row[rows]
        if answer_lengths is None:
            loss = weighted.sum() / (n_valid if normalizer is None else normalizer)
        else:
            lengths = torch.as_tensor(answer_lengths, device=x0.device).float().clamp_min(1.0)
            loss = (weighted / lengths[rows]).sum() / (B if normalizer is None else normalizer)

        with torch.no_grad():
            n = sel.sum()
            stats = {
                "ce": ce.detach().sum() / n.clamp_min(1),
                "acc": (picked.detach().argmax(-1) == targets).float().sum() / n.clamp_min(1),
                "masked_frac": n.float() / n_valid,
                "num_masked": n,
                "weight": w_row.mean(),
            }
        return loss, stats

    def __repr__(self) -> str:
        return (f"MaskedDiffusion(schedule={self.schedule!r}, noise_type={self.noise_type!r}, "
                f"loss_type={self.loss_type!r}, mask_id={self.mask_id}, vocab_size={self.vocab_size})")
