"""The likelihood module: the masked-diffusion NELBO estimator against an exact enumeration of
the bound, the autoregressive NLL against a token-by-token recurrent evaluation, and the corpus
summary (nats, bits, perplexity and a calibrated Monte-Carlo standard error).

The reference values are computed here, independently of rwkv_diffusion_rnn.diffusion.elbo:
for a sequence of L tokens the bound is a sum over all 2^L mask patterns M of a one-dimensional
integral over t, which Gauss-Legendre quadrature evaluates to ~1e-7 on a tiny model."""
import itertools
import math

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.diffusion.diffusion_process import LinearSchedule, make_schedule
from rwkv_diffusion_rnn.diffusion.elbo import (LikelihoodAccumulator, LikelihoodSummary, ar_nll,
                                               masked_nelbo)
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

V, MASK = 4, 3   # three real tokens and the mask

# Three sequences; the last has 4 real tokens and one padding position (valid=False), which the
# model sees as it is but which is never masked nor scored.
SEQS = torch.tensor([[0, 1, 2, 0, 1],
                     [2, 2, 1, 0, 0],
                     [1, 0, 0, 2, 2]])
VALID = torch.tensor([[True] * 5, [True] * 5, [True, True, True, True, False]])


def tiny(tc="film", mixer="bi", seed=1, n_layer=1, dtype=torch.float64):
    """A small denoiser whose predictions depend strongly on the context and on t.

    From its initialisation every prediction would be close to uniform and t would not matter
    (FiLM starts at zero), so every estimator would agree with every other: the weights are
    perturbed, the text head scaled x4 and FiLM given random weights. The time embedding's
    scale is lowered from 1000 to 3: at 1000 its sinusoids make the loss oscillate ~160 times
    over [0, 1] and quadrature would need ~10^4 nodes; the estimator does not care how t is
    embedded, and the loss still moves by more than a nat with t (asserted below)."""
    torch.manual_seed(seed)
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_prefix_len=0,
                                          mixer=mixer, time_conditioning=tc),
                           n_layer=n_layer, n_embd=32, head_size=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.text_head.weight.mul_(4.0)
        if tc != "none":
            for film in model.cond:
                for f in film:
                    f.proj.weight.normal_(0.0, 0.5, generator=g)
            model.time_cond.text_embedder.time_scale = 3.0
    return model.to(dtype).eval()


def denoiser(model):
    return lambda xt, t: model(xt, t).logits


def gauss_legendre(panels, n):
    """Composite Gauss-Legendre nodes and weights on [0, 1] (float64); no node at 0 or 1."""
    x, w = np.polynomial.legendre.leggauss(n)
    edges = np.linspace(0.0, 1.0, panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    return (torch.tensor((a + (b - a) * (x + 1) / 2).ravel()),
            torch.tensor(((b - a) / 2 * w).ravel()))


def pattern_losses(model, x, valid, t):
    """Every non-empty mask pattern M of the valid positions of ``x`` [T] and L(M, t) [|M|, Q]:
    the masked tokens' summed -log p (mask token excluded) at each time of ``t`` [Q]."""
    pos = valid.nonzero().squeeze(1)
    choice = torch.tensor(list(itertools.product([False, True], repeat=len(pos))))[1:]
    pats = torch.zeros(len(choice), x.numel(), dtype=torch.bool)
    pats[:, pos] = choice
    P, Q = len(pats), len(t)
    xt = torch.where(pats, MASK, x).repeat_interleave(Q, 0)
    with torch.no_grad():
        logits = model(xt, t.float().repeat(P)).logits.double()
    logits[..., MASK] = float("-inf")
    logp = torch.log_softmax(logits, -1).gather(-1, x.expand(P * Q, -1)[..., None]).squeeze(-1)
    return pats, (-logp * pats.repeat_interleave(Q, 0)).sum(1).view(P, Q)


def exact_nelbo(pats, losses, t, w, schedule):
    """sum_M integral_0^1 w(t) m(t)^|M| (1 - m(t))^(L - |M|) L(M, t) dt by the quadrature (t, w)."""
    k = pats.sum(1, keepdim=True).double()
    L = float(pats.any(0).sum())  # the valid positions (every one is masked in some pattern)
    m, wt = schedule.mask_rate(t), schedule.elbo_weight(t)
    return float((w * wt * m ** k * (1 - m) ** (L - k) * losses).sum())


def mc_per_sequence(model, schedule, copies=100, draws=48, seed=0):
    """masked_nelbo on ``copies`` rows of each sequence of SEQS; per sequence the mean and its
    standard error. The rows of one draw share the stratified times, so the error is taken
    over the ``draws`` independent draws (per draw: the mean over the sequence's copies)."""
    x0 = SEQS.repeat_interleave(copies, 0)
    valid = VALID.repeat_interleave(copies, 0)
    with torch.no_grad():
        est = masked_nelbo(denoiser(model), x0, schedule, MASK, torch.Generator().manual_seed(seed),
                           valid=valid, mc_samples=draws)
    per_draw = est.view(draws, len(SEQS), copies).mean(2)           # [draws, sequences]
    return per_draw.mean(0), per_draw.std(0) / math.sqrt(draws)


class UnitWeight(LinearSchedule):
    """Wrong on purpose: the masked tokens' loss with weight 1 instead of 1/t."""
    def elbo_weight(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


class CosineWeight(LinearSchedule):
    """Wrong on purpose: masks by the linear schedule but weighs by the cosine schedule's w(t)."""
    def elbo_weight(self, t):
        return make_schedule("cosine").elbo_weight(t)


@pytest.fixture(scope="module")
def film_model():
    return tiny()


@pytest.fixture(scope="module")
def exact_film(film_model):
    """Per sequence of SEQS: the exact bound for the linear and loglinear schedules, with two
    quadratures (2x32 and 4x32 nodes) to show it converged."""
    out = {"linear": [], "loglinear": [], "losses": []}
    for x, valid in zip(SEQS, VALID):
        both = [pattern_losses(film_model, x, valid, t) + (t, w)
                for t, w in (gauss_legendre(2, 32), gauss_legendre(4, 32))]
        for name in ("linear", "loglinear"):
            out[name].append([exact_nelbo(p, l, t, w, make_schedule(name)) for p, l, t, w in both])
        out["losses"].append(both[1][1])
    return out


def test_the_exact_bound_is_converged_and_depends_on_t(exact_film):
    for name in ("linear", "loglinear"):
        for coarse, fine in exact_film[name]:
            assert abs(coarse - fine) < 1e-6 * max(1.0, abs(fine))
    # The model's loss moves with t by more than a nat for some pattern of every sequence, so
    # the bound really is an integral over t (which t the estimator passes is checked row by
    # row in test_each_row_is_the_weighted_loss_at_the_time_the_model_was_told).
    for losses in exact_film["losses"]:
        assert float((losses.max(1).values - losses.min(1).values).max()) > 1.0


@pytest.mark.parametrize("name", ["linear", "loglinear"])
def test_monte_carlo_nelbo_agrees_with_the_exact_enumeration(film_model, exact_film, name):
    mean, se = mc_per_sequence(film_model, make_schedule(name))
    exact = torch.tensor([fine for _, fine in exact_film[name]], dtype=torch.float64)
    assert (se > 0).all() and (se < 0.05 * exact).all()   # precise enough to mean something
    assert ((mean - exact).abs() < 3 * se).all(), (mean, exact, se)


@pytest.mark.parametrize("wrong", [UnitWeight(), CosineWeight()], ids=["weight_1", "cosine_weight"])
def test_a_wrong_estimator_is_far_from_the_exact_bound(film_model, exact_film, wrong):
    """Shows that the agreement above can fail. (A forced mask in rows that drew none, or a
    floor on the masking rate, would be wrong too, but under the 1/t weight their expectation
    is infinite, so a finite sample shows them only now and then.)"""
    mean, se = mc_per_sequence(film_model, wrong)
    exact = torch.tensor([fine for _, fine in exact_film["linear"]], dtype=torch.float64)
    assert ((mean - exact).abs() > 8 * se).all(), (mean, exact, se)


def test_each_row_is_the_weighted_loss_at_the_time_the_model_was_told(film_model):
    """Recomputes every row of every draw from what the denoiser was given, and checks the
    times are stratified: each draw puts one row in each [k/B, (k+1)/B)."""
    calls = []

    def denoise(xt, t):
        logits = film_model(xt, t).logits
        calls.append((xt.clone(), t.clone(), logits))
        return logits

    B = 8
    x0 = torch.randint(0, MASK, (B, 5), generator=torch.Generator().manual_seed(7))
    schedule = make_schedule("cosine")
    with torch.no_grad():
        est = masked_nelbo(denoise, x0, schedule, MASK, torch.Generator().manual_seed(8), mc_samples=6)
    assert len(calls) == 6
    for row, (xt, t, logits) in zip(est, calls):
        assert t.dtype == torch.float32 and ((t > 0) & (t <= 1)).all()
        assert sorted(torch.floor(B * (1 - t.double())).long().clamp_max(B - 1).tolist()) == list(range(B))
        masked = xt == MASK
        assert (xt[~masked] == x0[~masked]).all()
        lg = logits.double()
        lg[..., MASK] = float("-inf")
        nll = -(torch.log_softmax(lg, -1).gather(-1, x0[..., None]).squeeze(-1) * masked).sum(1)
        expect = torch.where(masked.any(1), schedule.elbo_weight(t.double()) * nll, 0.0)
        assert torch.allclose(row, expect, rtol=1e-5, atol=0)


def test_a_time_blind_model_has_the_closed_form_bound_for_every_schedule():
    """With p independent of t, sum_M L(M) integral_0^1 m' m^(|M|-1) (1-m)^(L-|M|) dt
    = sum_M L(M) (|M|-1)! (L-|M|)! / L! whenever m goes from 0 to 1."""
    model = tiny(tc="none")
    t, w = gauss_legendre(2, 32)
    for x, valid in zip(SEQS, VALID):
        pats, losses = pattern_losses(model, x, valid, t)
        L = int(valid.sum())
        k = pats.sum(1)
        beta = torch.tensor([math.factorial(j - 1) * math.factorial(L - j) / math.factorial(L)
                             for j in k.tolist()], dtype=torch.float64)
        closed = float((losses[:, 0] * beta).sum())
        for name in ("linear", "cosine"):
            assert exact_nelbo(pats, losses, t, w, make_schedule(name)) == pytest.approx(closed, rel=1e-9)
        # loglinear stops at m(1) = 1 - eps: its diffusion term falls short of the bound by a
        # little (the left-out prior term of the module docstring).
        short = closed - exact_nelbo(pats, losses, t, w, make_schedule("loglinear"))
        assert 0 < short < 0.01 * closed
    # And the estimator finds the closed form with the cosine schedule.
    mean, se = mc_per_sequence(model, make_schedule("cosine"), copies=100, draws=16)
    closed = []
    for x, valid in zip(SEQS, VALID):
        pats, losses = pattern_losses(model, x, valid, t[:1])
        L = int(valid.sum())
        closed.append(sum(float(l) * math.factorial(j - 1) * math.factorial(L - j) / math.factorial(L)
                          for l, j in zip(losses[:, 0], pats.sum(1).tolist())))
    assert ((mean - torch.tensor(closed, dtype=torch.float64)).abs() < 3 * se).all()


def test_ar_nll_equals_the_token_by_token_sum_through_the_recurrent_state():
    model = tiny(tc="film", mixer="causal", n_layer=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MASK, (2, 9), generator=g)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False                       # row 1 ends early: its last targets are padding
    t = torch.zeros(2)
    with torch.no_grad():
        full = model(ids, t).logits
        targets = ids[:, 1:].masked_fill(~valid, -100)   # padding targets need not be ids
        got = ar_nll(full[:, :-1], targets, valid=valid)
        ref = torch.zeros(2, dtype=torch.float64)
        state = None
        for i in range(ids.shape[1] - 1):
            out = model(ids[:, i:i + 1], t, state=state, return_state=True, pos_offset=i)
            state = out.state
            logp = torch.log_softmax(out.logits[:, 0].double(), -1)
            ref += torch.where(valid[:, i], -logp.gather(1, ids[:, i + 1:i + 2]).squeeze(1), 0.0)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-8)
    # valid matters: the padded row's sum over every position is larger (each term is > 0).
    assert got[1] < ar_nll(full[:, :-1], ids[:, 1:])[1] - 1e-3
    # bf16 logits are scored in float32, not in bf16.
    low = ar_nll(full[:, :-1].bfloat16(), targets, valid=valid)
    high = ar_nll(full[:, :-1].bfloat16().float(), targets, valid=valid)
    assert torch.allclose(low, high, rtol=1e-6)


def test_the_accumulator_reproduces_hand_computed_values():
    acc = LikelihoodAccumulator()
    # Two sequences with two draws each: per-sequence means 2 and 4 nats over 2 and 4 tokens.
    acc.add(torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.tensor([2, 4]), chars=10)
    # One more sequence, 6 nats over 3 tokens; and an empty padding row that is not counted.
    acc.add(torch.tensor([[6.0, 0.0], [6.0, 0.0]]), torch.tensor([3, 0]), chars=5)
    s = acc.summary()
    R = 12 / 9
    assert s.nats_per_token == pytest.approx(R)
    assert s.bits_per_token == pytest.approx(R / math.log(2))
    assert s.bits_per_char == pytest.approx(12 / 15 / math.log(2))
    assert s.perplexity == pytest.approx(math.exp(R))
    assert (s.tokens, s.chars, s.mc_samples) == (9, 15, 2)
    # residuals r - R n: -2/3, -4/3, 2 -> sum of squares 56/9; S = 3; mean(n) = 3
    assert s.stderr == pytest.approx(math.sqrt(56 / 9 / 6) / 3)
    d = s.as_dict("eval/")
    assert d["eval/nats_per_token"] == s.nats_per_token and set(d) == {
        "eval/" + k for k in LikelihoodSummary.__dataclass_fields__}

    exact = LikelihoodAccumulator(exact=True)
    exact.add(torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([2, 4]), chars=None)
    exact.add(torch.tensor([6.0]), torch.tensor([3]), chars=7)
    e = exact.summary()
    assert e.nats_per_token == pytest.approx(R) and e.stderr == 0.0 and e.mc_samples == 1
    assert e.bits_per_char is None and e.chars is None       # unknown once, unknown for good

    one = LikelihoodAccumulator()
    one.add(torch.tensor([[5.0]]), torch.tensor([5]))
    assert one.summary().stderr == 0.0                        # S < 2: no spread to measure
    with pytest.raises(ValueError):
        LikelihoodAccumulator().summary()


def test_the_reported_standard_error_matches_the_spread_of_repeated_estimates():
    """30 repetitions on the same data: their spread is the Monte-Carlo error alone. The
    reported error also counts the spread between the 16 sequences (small next to the
    Monte-Carlo noise of 6-token sequences) and ignores the stratification (which lowers the
    spread); one row's heavy tail near t = 0 makes both vary. Hence a factor of 2."""
    model = tiny(dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    x0 = torch.randint(0, MASK, (16, 6), generator=g)
    values, errors = [], []
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for _ in range(30):
            acc = LikelihoodAccumulator()
            acc.add(masked_nelbo(denoiser(model), x0, LinearSchedule(), MASK, gen, mc_samples=2),
                    torch.full((16,), 6))
            s = acc.summary()
            values.append(s.nats_per_token)
            errors.append(s.stderr)
    spread = float(np.std(values, ddof=1))
    reported = float(np.mean(errors))
    assert 0.5 < spread / reported < 2.0, (spread, reported)


def test_the_same_generator_state_gives_the_same_value(film_model):
    run = lambda seed: masked_nelbo(denoiser(film_model), SEQS, make_schedule("cosine"), MASK,
                                    torch.Generator().manual_seed(seed), valid=VALID, mc_samples=3)
    with torch.no_grad():
        a, b, c = run(5), run(5), run(6)
    assert a.dtype == torch.float64 and a.shape == (3, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_invalid_positions_are_never_masked_nor_scored(film_model):
    seen = []

    def denoise(xt, t):
        seen.append(xt.clone())
        # A model that ignores padding (as attention masks do), so that only masking and
        # scoring could let the padding's ids matter.
        return film_model(torch.where(valid, xt, 0), t).logits

    valid = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.6
    valid[0] = False                                         # a row with nothing to score
    x0 = torch.randint(0, MASK, (6, 5), generator=torch.Generator().manual_seed(1))
    other = torch.where(valid, x0, (x0 + 1) % MASK)
    with torch.no_grad():
        a = masked_nelbo(denoise, x0, LinearSchedule(), MASK, torch.Generator().manual_seed(2),
                         valid=valid, mc_samples=20)
        b = masked_nelbo(denoise, other, LinearSchedule(), MASK, torch.Generator().manual_seed(2),
                         valid=valid, mc_samples=20)
    assert torch.equal(a, b)
    assert (a[:, 0] == 0).all() and (a[:, 1:] > 0).any()
    xts = torch.stack(seen[:20])
    assert (xts[:, ~valid] == x0[~valid]).all()             # never masked
    assert (xts[:, valid] == MASK).any()                    # while valid ones are

    # A clean token equal to the mask id cannot be scored: refused rather than an infinite value.
    bad = x0.clone()
    bad[1, valid[1].nonzero()[0]] = MASK
    with pytest.raises(ValueError, match="mask id"):
        masked_nelbo(denoise, bad, LinearSchedule(), MASK, torch.Generator(), valid=valid)


def test_the_mask_token_is_excluded_from_the_predicted_distribution(film_model):
    def boosted(xt, t):
        logits = film_model(xt, t).logits.clone()
        logits[..., MASK] += 50.0          # all the mass on the mask: must change nothing
        return logits

    with torch.no_grad():
        a = masked_nelbo(denoiser(film_model), SEQS, LinearSchedule(), MASK,
                         torch.Generator().manual_seed(4), mc_samples=4)
        b = masked_nelbo(boosted, SEQS, LinearSchedule(), MASK,
                         torch.Generator().manual_seed(4), mc_samples=4)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_prior_term_is_zero_for_schedules_ending_at_all_masks_and_eps_log_v_for_loglinear():
    from rwkv_diffusion_rnn.diffusion.diffusion_process import make_schedule
    from rwkv_diffusion_rnn.diffusion.elbo import prior_nats
    assert prior_nats(make_schedule("linear"), 66) == 0.0
    assert prior_nats(make_schedule("cosine"), 66) == 0.0
    assert prior_nats(make_schedule("loglinear", eps=1e-3), 66) == pytest.approx(1e-3 * math.log(66), rel=1e-9)


def test_rows_score_a_share_of_the_batch_with_the_whole_batch_draws(film_model):
    """Each process scores its rows of a batch (masked_nelbo rows=...); put together, the shares
    are the whole batch's estimate, and their accumulators combine into its summary."""
    run = lambda rows: masked_nelbo(denoiser(film_model), SEQS, make_schedule("cosine"), MASK,
                                    torch.Generator().manual_seed(5), valid=VALID, mc_samples=2, rows=rows)
    with torch.no_grad():
        whole, first, rest = run(slice(None)), run(slice(0, 1)), run(slice(1, None))
    assert first.shape == (2, 1) and rest.shape == (2, 2)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-12, atol=0)
    tokens = VALID.sum(1)
    one = LikelihoodAccumulator()
    one.add(whole, tokens, chars=30)
    a, b = LikelihoodAccumulator(), LikelihoodAccumulator()
    a.add(first, tokens[:1], chars=10)
    b.add(rest, tokens[1:], chars=20)
    assert LikelihoodAccumulator.combine([a, b]).summary().as_dict() == pytest.approx(one.summary().as_dict())
