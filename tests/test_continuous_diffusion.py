"""Gaussian latent diffusion: schedules, target conversions, samplers and guidance helpers."""

import math

import pytest
import torch

from rwkv_diffusion_rnn.diffusion.continuous_diffusion import (
    GaussianDiffusion,
    cfg_combine,
)

SCHEDULES = ["cosine", "linear"]
TARGETS = ["eps", "x0", "v"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_variance_preserving_monotone_and_ends(schedule):
    d = GaussianDiffusion(schedule, min_noise_level=0.01, max_noise_level=0.995)
    s = torch.linspace(0, 1, 501, dtype=torch.float64)
    alpha, sigma = d.alpha_sigma(s)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(s), rtol=0, atol=1e-12)
    assert (sigma.diff() > 0).all() and (alpha.diff() < 0).all()
    assert (d.log_snr(s).diff() < 0).all()
    assert sigma[0].item() == pytest.approx(0.01, rel=1e-9)
    assert sigma[-1].item() == pytest.approx(0.995, rel=1e-9)
    a32, s32 = d.alpha_sigma(torch.rand(100))
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32**2 + s32**2, torch.ones(100), rtol=0, atol=1e-6)


def test_linear_schedule_is_linear_in_log_snr():
    d = GaussianDiffusion("linear", min_noise_level=0.01, max_noise_level=0.99)
    lam = d.log_snr(torch.linspace(0, 1, 11, dtype=torch.float64))
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=torch.float64))
    assert lam[0].item() == pytest.approx(math.log((1 - 0.01**2) / 0.01**2))


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="schedule must be one of"):
        GaussianDiffusion("sqrt")
    with pytest.raises(ValueError, match="target must be one of"):
        GaussianDiffusion(target="score")
    with pytest.raises(ValueError, match="max_noise_level"):
        GaussianDiffusion(min_noise_level=0.5, max_noise_level=0.2)
    with pytest.raises(ValueError, match="max_noise_level"):
        GaussianDiffusion(max_noise_level=1.0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", TARGETS)
def test_target_conversions_round_trip(schedule, target):
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion(schedule, target=target)
    x0, eps = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    # float32: only times with alpha, sigma >= 0.1, since x0 -> eps divides by sigma (~1e-3 at
    # s = 0) and eps -> x0 by alpha; the float64 test below covers all of [0, 1]
    s = torch.rand(4096, generator=g)
    s = s[torch.minimum(*d.alpha_sigma(s)) >= 0.1][:64]
    assert s.numel() == 64
    xt = d.q_sample(x0, s, eps)
    alpha, sigma = d.alpha_sigma(s)
    torch.testing.assert_close(xt, alpha[:, None] * x0 + sigma[:, None] * eps)
    out = d.target(x0, eps, s)
    expected = {"eps": eps, "x0": x0, "v": alpha[:, None] * eps - sigma[:, None] * x0}[target]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(d.predict_x0(xt, s, out), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.predict_eps(xt, s, out), eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.predict_v(xt, s, out), alpha[:, None] * eps - sigma[:, None] * x0,
                               rtol=1e-5, atol=1e-5)


def test_conversions_between_target_types_are_mutual_inverses():
    """eps -> x0 -> v -> eps through three differently configured processes, in float64."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 32, generator=g, dtype=torch.float64), torch.randn(16, 32, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64)
    s[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    by = {t: GaussianDiffusion("cosine", target=t) for t in TARGETS}
    xt = by["eps"].q_sample(x0, s, eps)
    x0_hat = by["eps"].predict_x0(xt, s, eps)
    v_hat = by["x0"].predict_v(xt, s, x0_hat)
    eps_hat = by["v"].predict_eps(xt, s, v_hat)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_loss_is_float32_mse():
    d = GaussianDiffusion(target="v")
    g = torch.Generator().manual_seed(2)
    x0, eps, out = (torch.randn(4, 32, generator=g) for _ in range(3))
    s = torch.rand(4, generator=g)
    loss = d.loss(out.bfloat16(), x0, eps, s)
    assert loss.dtype == torch.float32
    expected = ((out.bfloat16().float() - d.target(x0, eps, s)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    keep = torch.tensor([True, False, True, False])
    per_row = ((out - d.target(x0, eps, s)) ** 2).mean(1)
    assert d.loss(out, x0, eps, s, row_mask=keep).item() == pytest.approx(per_row[keep].mean().item(), rel=1e-6)


def _oracle(d, x0):
    """A model that knows the clean latent and returns the exact target for (xt, s)."""
    def model_fn(xt, s):
        alpha, sigma = d.alpha_sigma(s)
        eps = (xt - alpha[:, None] * x0) / sigma[:, None]
        return d.target(x0, eps, s)
    return model_fn


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_oracle_sampling_recovers_x0(target, schedule):
    d = GaussianDiffusion(schedule, target=target)
    x0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    out = d.ddim_sample(_oracle(d, x0), x0.shape, steps=5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    out = d.ddpm_sample(_oracle(d, x0), x0.shape, steps=20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_matches_gaussian_data_with_exact_denoiser(sampler):
    """For data N(mu, tau^2) the exact E[x0 | xt] is known; samples must follow the data law."""
    mu, tau = 1.5, 0.5
    d = GaussianDiffusion("cosine", target="x0")

    def model_fn(xt, s):
        alpha, sigma = (c[:, None] for c in d.alpha_sigma(s))
        return mu + alpha * tau**2 / (alpha**2 * tau**2 + sigma**2) * (xt - alpha * mu)

    g = torch.Generator().manual_seed(5)
    if sampler == "ddim":
        x = d.ddim_sample(model_fn, (4000, 2), steps=50, generator=g)
    else:
        x = d.ddpm_sample(model_fn, (4000, 2), steps=100, generator=g)
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(tau, abs=0.03)


def test_ddim_eta0_is_deterministic_and_ddpm_equals_ddim_eta1():
    d = GaussianDiffusion("cosine", target="eps")
    model_fn = lambda x, s: 0.5 * x + 0.1 * s[:, None]
    a = d.ddim_sample(model_fn, (4, 32), steps=10, generator=torch.Generator().manual_seed(6))
    b = d.ddim_sample(model_fn, (4, 32), steps=10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    z = torch.randn(4, 32)
    c = d.ddim_sample(model_fn, (4, 32), steps=10, init_noise=z, generator=torch.Generator().manual_seed(7))
    e = d.ddim_sample(model_fn, (4, 32), steps=10, init_noise=z, generator=torch.Generator().manual_seed(8))
    assert torch.equal(c, e)
    p = d.ddpm_sample(model_fn, (4, 32), steps=10, generator=torch.Generator().manual_seed(9))
    q = d.ddim_sample(model_fn, (4, 32), steps=10, eta=1.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_samplers_run_without_grad():
    d = GaussianDiffusion(num_train_steps=3)
    w = torch.nn.Parameter(torch.ones(()))
    out = d.ddim_sample(lambda x, s: w * x, (2, 32))   # steps default to num_train_steps
    assert not out.requires_grad


# ---- classifier-free guidance -----------------------------------------------------------


def test_cfg_combine():
    cond, uncond = torch.randn(3, 32), torch.randn(3, 32)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), 2 * cond - uncond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 2.5), cond + 2.5 * (cond - uncond))
