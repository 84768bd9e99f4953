"""Gaussian diffusion for the sentence latent (a vector [B, D], D = 32 by default).

Variance-preserving forward process in continuous time ``s`` in [0, 1]:

    z_s = alpha(s) x0 + sigma(s) eps,    alpha(s)^2 + sigma(s)^2 = 1,    eps ~ N(0, I).

The *noise level* is ``sigma(s)``, the standard deviation of the noise. ``min_noise_level`` is
``sigma(0)`` (how noisy the cleanest training point is) and ``max_noise_level`` is ``sigma(1)``
(how noisy the noisiest is); both in (0, 1). In log-SNR terms, ``log(alpha^2 / sigma^2)`` goes
from ``log((1 - min^2) / min^2)`` down to ``log((1 - max^2) / max^2)``. Schedules:

* ``cosine``: the angle ``phi = asin(sigma)`` grows linearly in ``s`` from ``asin(min)`` to
  ``asin(max)``; ``alpha = cos(phi)``, ``sigma = sin(phi)`` (the cosine schedule, truncated to the range).
* ``linear``: the log-SNR falls linearly in ``s`` between its two ends (VDM's fixed linear schedule).

The network predicts one of three targets (``target``): ``eps`` (the noise), ``x0`` (the clean
latent) or ``v = alpha eps - sigma x0``; :meth:`GaussianDiffusion.predict_x0` and
:meth:`GaussianDiffusion.predict_eps` turn any of them back into the others.

Sampling runs from ``s = 1`` (started from N(0, I)) to ``s = 0`` on a uniform grid of ``steps``
intervals; the last step returns the model's prediction of x0.

Classifier-free guidance: the denoiser's learned null latent stands in for a row's latent during
training (``training.latent_drop_prob``); :func:`cfg_combine` mixes the two predictions at
sampling time.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..common.checks import Flag, Num, check_options

__all__ = ["GaussianDiffusion", "cfg_combine", "LATENT_SCHEDULES", "TARGETS"]

LATENT_SCHEDULES = ("cosine", "linear")
TARGETS = ("eps", "x0", "v")
# the latent_noise.* numbers and flags GaussianDiffusion reads, with their ranges
OPTIONS = {"min_noise_level": Num(0, 1, lo_open=True, hi_open=True),
           "max_noise_level": Num(0, 1, lo_open=True, hi_open=True),
           "num_train_steps": Num(lo=1, integer=True), "low_discrepancy": Flag()}


def _rand(shape, generator, device, normal=False) -> torch.Tensor:
    if generator is not None:
        device = generator.device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=device)


def _per_row(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-row coefficient [B] (or a scalar) so it broadcasts against ``x`` [B, ...]."""
    if a.dim() == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (x.dim() - 1)))


class GaussianDiffusion:
    """Variance-preserving Gaussian diffusion of a latent vector (no parameters).

    Args:
        schedule: ``"cosine"`` or ``"linear"`` (see the module docstring).
        min_noise_level: ``sigma(0)``, in (0, 1).
        max_noise_level: ``sigma(1)``, in (min_noise_level, 1).
        target: what the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        num_train_steps: default number of steps of the samplers.
        low_discrepancy: stratify the batch's times in :meth:`sample_s`.
    """

    def __init__(
        self,
        schedule: str = "cosine",
        min_noise_level: float = 1e-3,
        max_noise_level: float = 0.9999,
        target: str = "eps",
        num_train_steps: int = 1000,
        low_discrepancy: bool = False,
    ):
        if schedule not in LATENT_SCHEDULES:
            raise ValueError(f"schedule must be one of {list(LATENT_SCHEDULES)}, got {schedule!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        check_options("latent_noise", dict(min_noise_level=min_noise_level, max_noise_level=max_noise_level,
                                           num_train_steps=num_train_steps), OPTIONS)
        if not min_noise_level < max_noise_level:
            raise ValueError(
                "noise levels must satisfy 0 < min_noise_level < max_noise_level < 1, got "
                f"min_noise_level={min_noise_level}, max_noise_level={max_noise_level}"
            )
        self.schedule = schedule
        self.min_noise_level = float(min_noise_level)
        self.max_noise_level = float(max_noise_level)
        self.target_type = target
        self.num_train_steps = int(num_train_steps)
        self.low_discrepancy = bool(low_discrepancy)
        self._phi = (math.asin(self.min_noise_level), math.asin(self.max_noise_level))
        self._logsnr = tuple(math.log((1.0 - n * n) / (n * n)) for n in (self.min_noise_level, self.max_noise_level))

    # ---- schedule -----------------------------------------------------------------------------

    def log_snr(self, s) -> torch.Tensor:
        """``log(alpha(s)^2 / sigma(s)^2)``, decreasing in ``s``."""
        alpha, sigma = self.alpha_sigma(s)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))

    def alpha_sigma(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise scales at ``s`` (clamped to [0, 1]); ``alpha^2 + sigma^2 = 1``."""
        s = torch.as_tensor(s)
        if not s.is_floating_point():
            s = s.float()
        s = s.clamp(0.0, 1.0)
        if self.schedule == "cosine":
            phi = self._phi[0] + s * (self._phi[1] - self._phi[0])
            return torch.cos(phi), torch.sin(phi)
        logsnr = self._logsnr[0] + s * (self._logsnr[1] - self._logsnr[0])
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def sample_s(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """Training times [batch_size] (float32), uniform on [0, 1]."""
        if self.low_discrepancy:
            u = _rand((1,), generator, device)
            offsets = torch.arange(batch_size, device=u.device, dtype=u.dtype) / batch_size
            s = (u + offsets) % 1.0
            if generator is not None:
                return s[torch.randperm(batch_size, generator=generator, device=generator.device)]
            return s[torch.randperm(batch_size, device=s.device)]
        return _rand((batch_size,), generator, device)

    # ---- forward process and targets ----------------------------------------------------------

    def _coefs(self, s, x: torch.Tensor):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        alpha, sigma = self.alpha_sigma(torch.as_tensor(s, device=x.device, dtype=dtype))
        return _per_row(alpha, x), _per_row(sigma, x)

    def q_sample(self, x0: torch.Tensor, s, noise: torch.Tensor) -> torch.Tensor:
        """``z_s = alpha(s) x0 + sigma(s) noise`` with ``s`` [B] or a scalar."""
        alpha, sigma = self._coefs(s, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, s) -> torch.Tensor:
        """What the network should output for the configured ``target`` type."""
        if self.target_type == "eps":
            return noise
        if self.target_type == "x0":
            return x0
        alpha, sigma = self._coefs(s, x0)
        return alpha * noise - sigma * x0

    def predict_x0(self, xt: torch.Tensor, s, model_out: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by ``model_out`` (of the configured target type) at ``(xt, s)``."""
        model_out = model_out.to(xt.dtype)
        if self.target_type == "x0":
            return model_out
        alpha, sigma = self._coefs(s, xt)
        if self.target_type == "eps":
            return (xt - sigma * model_out) / alpha
        return alpha * xt - sigma * model_out

    def predict_eps(self, xt: torch.Tensor, s, model_out: torch.Tensor) -> torch.Tensor:
        """The noise implied by ``model_out`` (of the configured target type) at ``(xt, s)``."""
        model_out = model_out.to(xt.dtype)
        if self.target_type == "eps":
            return model_out
        alpha, sigma = self._coefs(s, xt)
        if self.target_type == "x0":
            return (xt - alpha * model_out) / sigma
        return sigma * xt + alpha * model_out

    def predict_v(self, xt: torch.Tensor, s, model_out: torch.Tensor) -> torch.Tensor:
        """The velocity ``alpha eps - sigma x0`` implied by ``model_out``."""
        alpha, sigma = self._coefs(s, xt)
        return alpha * self.predict_eps(xt, s, model_out) - sigma * self.predict_x0(xt, s, model_out)

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, s,
             row_mask: Optional[torch.Tensor] = None, normalizer: Optional[float] = None) -> torch.Tensor:
        """Mean squared error to :meth:`target`, in float32.

        ``row_mask`` (optional [B] bool) keeps only some rows, e.g. those whose latent was
        noised; the mean is then over the kept rows (0 with the graph kept if none is kept).
        ``normalizer`` replaces the number of kept rows: the whole batch's, when these rows are
        one process's share of it.
        """
        target = self.target(x0.float(), noise.float(), s)
        err = (model_out.float() - target).pow(2)
        if row_mask is None and normalizer is None:
            return err.mean()
        err = err.reshape(err.shape[0], -1).mean(1)
        keep = torch.ones_like(err) if row_mask is None else row_mask.to(err.device).float()
        return (err * keep).sum() / (keep.sum().clamp_min(1.0) if normalizer is None else normalizer)

    # ---- samplers -----------------------------------------------------------------------------

    def _run_model(self, model_fn, x: torch.Tensor, s: float):
        s_vec = torch.full((x.shape[0],), s, device=x.device, dtype=torch.float32)
        out = model_fn(x, s_vec).float()
        return self.predict_x0(x, s_vec, out), self.predict_eps(x, s_vec, out)

    def _start(self, shape, generator, device, init_noise):
        if init_noise is not None:
            return init_noise.float().clone()
        return _rand(tuple(shape), generator, device, normal=True)

    @torch.no_grad()
    def ddpm_sample(self, model_fn: Callable, shape: Sequence[int], steps: Optional[int] = None,
                    generator=None, device=None, init_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ancestral sampling: each step draws from the Gaussian posterior ``q(z_s' | z_s, x0_hat)``.

        ``model_fn(z, s) -> model_out`` with ``s`` [B]; ``steps`` defaults to ``num_train_steps``;
        ``init_noise`` replaces the N(0, I) start. Returns float32 latents of ``shape``.
        """
        steps = self.num_train_steps if steps is None else int(steps)
        x = self._start(shape, generator, device, init_noise)
        for k in range(steps, 0, -1):
            s, s_next = k / steps, (k - 1) / steps
            x0_hat, _ = self._run_model(model_fn, x, s)
            if k == 1:
                return x0_hat
            a, sig = self.alpha_sigma(torch.tensor(s))
            a2, sig2 = self.alpha_sigma(torch.tensor(s_next))
            a_ts = a / a2                            # alpha of z_s given z_s'
            var_ts = sig**2 - a_ts**2 * sig2**2      # its variance
            mean = (a_ts * sig2**2 / sig**2) * x + (a2 * var_ts / sig**2) * x0_hat
            std = (var_ts * sig2**2 / sig**2).clamp_min(0).sqrt()
            x = mean + std * _rand(x.shape, generator, x.device, normal=True)
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: Callable, shape: Sequence[int], steps: Optional[int] = None,
                    eta: float = 0.0, generator=None, device=None,
                    init_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DDIM sampling; ``eta = 0`` is deterministic given the start, ``eta = 1`` matches DDPM.

        Arguments as :meth:`ddpm_sample`; ``eta`` scales the fresh noise of each step.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        steps = self.num_train_steps if steps is None else int(steps)
        x = self._start(shape, generator, device, init_noise)
        for k in range(steps, 0, -1):
            s, s_next = k / steps, (k - 1) / steps
            x0_hat, eps_hat = self._run_model(model_fn, x, s)
            if k == 1:
                return x0_hat
            a, sig = self.alpha_sigma(torch.tensor(s))
            a2, sig2 = self.alpha_sigma(torch.tensor(s_next))
            c = eta * (sig2 / sig) * (1.0 - (a / a2) ** 2).clamp_min(0).sqrt()
            x = a2 * x0_hat + (sig2**2 - c**2).clamp_min(0).sqrt() * eps_hat
            if eta > 0:
                x = x + c * _rand(x.shape, generator, x.device, normal=True)
        return x

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(schedule={self.schedule!r}, min_noise_level={self.min_noise_level}, "
                f"max_noise_level={self.max_noise_level}, target={self.target_type!r}, "
                f"num_train_steps={self.num_train_steps})")


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``cond + scale * (cond - uncond)``.

    ``scale = 0`` is the conditional prediction, larger values push away from the unconditional
    one (``scale = w - 1`` in the ``uncond + w (cond - uncond)`` convention).
    """
    if scale == 0:
        return cond
    return cond + scale * (cond - uncond)
