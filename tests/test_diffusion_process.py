"""Masked text diffusion: schedules, noising and the losses (checked against hand computations)."""

import math

import pytest
import torch

from rwkv_diffusion_rnn.diffusion.diffusion_process import (
    SCHEDULES,
    MaskedDiffusion,
    make_schedule,
)

SCHEDULE_CASES = [
    ("linear", {}),
    ("cosine", {}),
    ("loglinear", {"eps": 1e-3}),
    ("power", {"exponent": 3.0}),
    ("power", {"exponent": 0.5}),
    ("sigmoid", {"scale": 8.0, "shift": 0.4}),
]


# ---- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", SCHEDULE_CASES)
def test_schedule_ends_and_monotone(name, kwargs):
    sch = make_schedule(name, **kwargs)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    rate = sch.mask_rate(t)
    assert rate.dtype == torch.float64
    assert (rate.diff() > 0).all(), "mask rate must increase strictly"
    assert rate[0].item() == pytest.approx(0.0, abs=1e-12)
    expected_end = 1.0 - kwargs["eps"] if name == "loglinear" else 1.0
    assert rate[-1].item() == pytest.approx(expected_end, abs=1e-12)
    assert torch.allclose(sch.alpha(t), 1 - rate)


@pytest.mark.parametrize("name,kwargs", SCHEDULE_CASES)
def test_alpha_prime_matches_finite_difference(name, kwargs):
    sch = make_schedule(name, **kwargs)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    fd = (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(sch.alpha_prime(t), fd, rtol=1e-6, atol=1e-8)
    assert (sch.alpha_prime(t) < 0).all()


def test_schedule_values():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(make_schedule("cosine").mask_rate(t),
                               torch.tensor([1 - math.cos(math.pi / 8), 1 - math.cos(math.pi / 4)], dtype=torch.float64))
    torch.testing.assert_close(make_schedule("power", exponent=2).mask_rate(t),
                               torch.tensor([0.0625, 0.25], dtype=torch.float64))
    torch.testing.assert_close(make_schedule("linear").elbo_weight(t), 1 / t)
    sig = make_schedule("sigmoid", scale=10.0, shift=0.5)
    assert sig.mask_rate(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(0.5, abs=1e-12)


def test_make_schedule_refuses_unknown_names():
    with pytest.raises(ValueError, match="schedule must be one of") as e:
        make_schedule("quadratic")
    for name in SCHEDULES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="exponent"):
        make_schedule("power", exponent=-1)
    with pytest.raises(ValueError, match="unexpected arguments"):
        make_schedule("linear", exponent=2)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="noise_type must be one of"):
        MaskedDiffusion(noise_type="gaussian")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        MaskedDiffusion(loss_type="mse")
    with pytest.raises(ValueError, match="label_smoothing"):
        MaskedDiffusion(loss_type="mdlm", label_smoothing=0.1)
    with pytest.raises(ValueError, match="span_prob"):
        MaskedDiffusion(span_prob=1.5)


# ---- sampling t -----------------------------------------------------------------------------


def test_sample_t_range_and_low_discrepancy():
    g = torch.Generator().manual_seed(0)
    d = MaskedDiffusion(eps=0.01)
    t = d.sample_t(1000, generator=g)
    assert t.shape == (1000,) and t.dtype == torch.float32
    assert t.min() >= 0.01 and t.max() <= 1.0
    d = MaskedDiffusion(eps=1e-3, low_discrepancy=True)
    t = d.sample_t(8, generator=g)
    # one time in each eighth of [eps, 1]
    strata = ((t - d.t_min) / (1 - d.t_min) * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8))


def test_min_masking_rate_respected():
    g = torch.Generator().manual_seed(1)
    for schedule in ("linear", "cosine"):
        d = MaskedDiffusion(schedule, min_masking_rate=0.3)
        t = d.sample_t(2000, generator=g)
        assert (d.schedule.mask_rate(t) >= 0.3 - 1e-5).all()
        assert d.mask_rate(torch.tensor([0.0, 0.01])).tolist() == pytest.approx([0.3, 0.3])
    # explicit small times are floored when noising too
    d = MaskedDiffusion("linear", mask_id=9, vocab_size=10, min_masking_rate=0.3, truncate_prob=0.0)
    x0 = torch.zeros(2, 20000, dtype=torch.long)
    _, m = d.noise(x0, torch.tensor([0.01, 0.05]), generator=g)
    assert m.float().mean(1).tolist() == pytest.approx([0.3, 0.3], abs=0.015)


# ---- noising --------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_empirical_masking_rate(schedule):
    g = torch.Generator().manual_seed(2)
    d = MaskedDiffusion(schedule, mask_id=99, vocab_size=100)
    x0 = torch.randint(0, 99, (4, 20000), generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    xt, m = d.noise(x0, t, generator=g)
    expected = d.schedule.mask_rate(t)
    assert torch.allclose(m.float().mean(1), expected, atol=0.015)
    assert (xt[m] == 99).all() and (xt[~m] == x0[~m]).all()


@pytest.mark.parametrize("span_prob", [0.0, 1.0])
def test_unmaskable_positions_never_change(span_prob):
    g = torch.Generator().manual_seed(3)
    d = MaskedDiffusion(mask_id=7, vocab_size=8, span_prob=span_prob, mean_span_length=3)
    x0 = torch.randint(0, 7, (16, 40), generator=g)
    maskable = torch.rand(16, 40, generator=g) < 0.5
    maskable[0] = False                     # a row with nothing maskable stays clean
    maskable[1] = False
    maskable[1, 5] = True                   # a single maskable position
    t = torch.full((16,), 0.7)
    t[2] = 0.0                              # rate 0, yet the row still gets one mask
    xt, m = d.noise(x0, t, maskable=maskable, generator=g)
    assert not (m & ~maskable).any()
    assert (xt[~maskable] == x0[~maskable]).all()
    assert (xt[m] == 7).all()
    assert not m[0].any()
    assert m[1].tolist() == maskable[1].tolist()
    assert (m.sum(1)[1:] >= 1).all()


def test_noise_is_deterministic_under_a_generator():
    d = MaskedDiffusion(mask_id=7, vocab_size=8, span_prob=0.5, noise_type="random_replace")
    x0 = torch.randint(0, 7, (4, 30))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    a = d.noise(x0, t, generator=torch.Generator().manual_seed(5))
    b = d.noise(x0, t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("mask_id", [2, 4])
def test_random_replace_never_emits_mask_id(mask_id):
    g = torch.Generator().manual_seed(4)
    d = MaskedDiffusion(mask_id=mask_id, vocab_size=5, noise_type="random_replace")
    x0 = torch.zeros(8, 1000, dtype=torch.long)
    xt, m = d.noise(x0, torch.full((8,), 0.9), generator=g)
    replaced = xt[m]
    assert not (replaced == mask_id).any()
    assert set(replaced.unique().tolist()) == {0, 1, 2, 3, 4} - {mask_id}
    assert (xt[~m] == 0).all()


def _runs(row):
    """(number of runs of True, total True) in a 1-D bool list."""
    runs, prev = 0, False
    for v in row:
        runs += v and not prev
        prev = v
    return runs, sum(row)


def test_span_masking_produces_contiguous_runs():
    g = torch.Generator().manual_seed(6)
    d = MaskedDiffusion(mask_id=9, vocab_size=10, span_prob=1.0, mean_span_length=5)
    x0 = torch.zeros(6, 100, dtype=torch.long)
    _, m = d.noise(x0, torch.full((6,), 0.5), generator=g)
    for row in m.tolist():
        assert _runs(row) == (10, 50)        # 50 masks in 50/5 = 10 separate runs
    maskable = torch.zeros(6, 100, dtype=torch.bool)
    maskable[:, 20:80] = True
    _, m = d.noise(x0, torch.full((6,), 0.5), maskable=maskable, generator=g)
    for row in m.tolist():
        assert _runs(row) == (6, 30)
    assert not m[:, :20].any() and not m[:, 80:].any()
    # i.i.d. masking at the same rate has many more runs
    _, m_iid = MaskedDiffusion(mask_id=9, vocab_size=10).noise(x0, torch.full((6,), 0.5), generator=g)
    assert min(_runs(r)[0] for r in m_iid.tolist()) > 15


# ---- truncation ---------------------------------------------------------------------------


def test_maybe_truncate():
    x = torch.arange(40).reshape(2, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    never = MaskedDiffusion(truncate_prob=0.0)
    assert never.maybe_truncate(x, mask)[0] is x
    always = MaskedDiffusion(truncate_prob=1.0)
    a, am, none = always.maybe_truncate(x, mask, None, generator=torch.Generator().manual_seed(0))
    b, _, _ = always.maybe_truncate(x, mask, None, generator=torch.Generator().manual_seed(0))
    assert none is None and torch.equal(a, b) and a.shape == am.shape
    assert 1 <= a.shape[1] <= 20 and torch.equal(a, x[:, : a.shape[1]])
    g = torch.Generator().manual_seed(1)
    half = MaskedDiffusion(truncate_prob=0.5)
    lengths = [half.truncation_length(20, generator=g) for _ in range(2000)]
    assert sum(L < 20 for L in lengths) / 2000 == pytest.approx(0.5 * 19 / 20, abs=0.04)
    assert min(lengths) == 1
    with pytest.raises(ValueError, match="maybe_truncate"):
        always.maybe_truncate(x, torch.zeros(2, 32))


# ---- losses, by hand ----------------------------------------------------------------------

# B=2, T=3, V=4
LOGITS = [
    [[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 0.1, -0.4], [2.0, -1.0, 0.0, 0.0]],
    [[0.0, 0.0, 0.0, 0.0], [-0.5, 1.5, 0.25, 0.0], [0.3, -0.2, 0.8, 1.1]],
]
X0 = [[3, 1, 0], [2, 1, 3]]
MASKED = [[True, False, True], [False, True, True]]
T_ = [0.5, 0.25]


def _ce(row, target):
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def _smooth_ce(row, target, s):
    lse = math.log(sum(math.exp(v) for v in row))
    uniform = sum(lse - v for v in row) / len(row)
    return (1 - s) * (lse - row[target]) + s * uniform


def _batch():
    return (torch.tensor(LOGITS), torch.tensor(X0), torch.tensor(MASKED), torch.tensor(T_))


def _hand(weight_fn, ce_fn=_ce, per_row_norm=None, n_tokens=6):
    total = 0.0
    for b in range(2):
        row_sum = sum(ce_fn(LOGITS[b][i], X0[b][i]) for i in range(3) if MASKED[b][i]) * weight_fn(T_[b])
        total += row_sum / per_row_norm[b] if per_row_norm else row_sum
    return total / 2 if per_row_norm else total / n_tokens


def test_mdlm_loss_linear_by_hand():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="mdlm")
    loss, stats = d.loss(*_batch())
    expected = _hand(lambda t: 1 / t)                    # -alpha'/(1-alpha) = 1/t
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["num_masked"].item() == 4
    assert stats["masked_frac"].item() == pytest.approx(4 / 6)
    mean_ce = sum(_ce(LOGITS[b][i], X0[b][i]) for b in range(2) for i in range(3) if MASKED[b][i]) / 4
    assert stats["ce"].item() == pytest.approx(mean_ce, rel=1e-6)
    # argmax: row0 pos0 -> 0 (target 3, wrong), pos2 -> 0 (right); row1 pos1 -> 1 (right), pos2 -> 3 (right)
    assert stats["acc"].item() == pytest.approx(3 / 4)
    # for the linear schedule LLaDA's 1/p_mask is the same weight
    llada, _ = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="llada").loss(*_batch())
    assert llada.item() == pytest.approx(expected, rel=1e-6)


def test_mdlm_loss_cosine_by_hand():
    d = MaskedDiffusion("cosine", mask_id=3, vocab_size=4, loss_type="mdlm")
    w = lambda t: (math.pi / 2) * math.sin(math.pi * t / 2) / (1 - math.cos(math.pi * t / 2))
    assert d.loss(*_batch())[0].item() == pytest.approx(_hand(w), rel=1e-5)


def test_llada_loss_cosine_by_hand():
    d = MaskedDiffusion("cosine", mask_id=3, vocab_size=4, loss_type="llada")
    w = lambda t: 1 / (1 - math.cos(math.pi * t / 2))
    assert d.loss(*_batch())[0].item() == pytest.approx(_hand(w), rel=1e-5)


def test_soft_ce_loss_by_hand():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="soft_ce", label_smoothing=0.2)
    expected = _hand(lambda t: 1 / t, ce_fn=lambda r, y: _smooth_ce(r, y, 0.2))
    assert d.loss(*_batch())[0].item() == pytest.approx(expected, rel=1e-6)
    default = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="soft_ce")
    assert default.label_smoothing == 0.1


def test_valid_mask_normalisation_by_hand():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="llada")
    valid = torch.tensor([[True, True, True], [True, True, False]])   # row 1 pos 2 is padding
    loss, stats = d.loss(*_batch(), valid=valid)
    ce = {(b, i): _ce(LOGITS[b][i], X0[b][i]) for b in range(2) for i in range(3)}
    expected = (ce[0, 0] + ce[0, 2]) / 0.5 + ce[1, 1] / 0.25
    assert loss.item() == pytest.approx(expected / 5, rel=1e-6)
    assert stats["num_masked"].item() == 3


def test_sft_answer_length_normalisation_by_hand():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="llada")
    loss, _ = d.loss(*_batch(), answer_lengths=torch.tensor([2, 3]))
    ce = {(b, i): _ce(LOGITS[b][i], X0[b][i]) for b in range(2) for i in range(3)}
    expected = ((ce[0, 0] + ce[0, 2]) / 0.5 / 2 + (ce[1, 1] + ce[1, 2]) / 0.25 / 3) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(_hand(lambda t: 1 / t, per_row_norm=[2, 3]), rel=1e-6)


def test_reweight_cap_clips():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="mdlm", reweight_cap=3.0)
    assert d.loss_weight(torch.tensor([0.5, 0.25, 0.1])).tolist() == pytest.approx([2.0, 3.0, 3.0])
    loss, _ = d.loss(*_batch())
    assert loss.item() == pytest.approx(_hand(lambda t: min(1 / t, 3.0)), rel=1e-6)
    uncapped = MaskedDiffusion("linear", mask_id=3, vocab_size=4, loss_type="mdlm").loss(*_batch())[0]
    assert loss.item() < uncapped.item()


def test_bf16_logits_give_float32_loss():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 11, generator=g).to(torch.bfloat16).requires_grad_()
    x0 = torch.randint(0, 11, (2, 5), generator=g)
    masked = torch.rand(2, 5, generator=g) < 0.6
    masked[:, 0] = True
    t = torch.tensor([0.3, 0.8])
    for loss_type in ("mdlm", "llada", "soft_ce"):
        d = MaskedDiffusion("cosine", mask_id=10, vocab_size=11, loss_type=loss_type)
        lb, _ = d.loss(logits, x0, masked, t)
        lf, _ = d.loss(logits.detach().float(), x0, masked, t)
        assert lb.dtype == torch.float32
        assert lb.item() == lf.item()
    lb.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_loss_with_nothing_masked_is_zero_and_differentiable():
    d = MaskedDiffusion("linear", mask_id=3, vocab_size=4)
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss, stats = d.loss(logits, torch.tensor(X0), torch.zeros(2, 3, dtype=torch.bool), torch.tensor(T_))
    assert loss.item() == 0.0 and stats["num_masked"].item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
