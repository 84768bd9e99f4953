"""Samplers: committed and prompt tokens stay fixed, step schedules, threshold decoding, blocks,
guidance, state caching of block_causal, latent sampling and joint generation."""

import pytest
import torch

from rwkv_diffusion_rnn.diffusion.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser
from rwkv_diffusion_rnn.diffusion.sampling import (fill_masks, generate_joint, generate_latent, generate_text,
                                         guided_logits, propose_tokens)

V, MASK, D = 20, 19, 8
_MODELS = {}


def tiny(mixer="bi", tc="film", prefix=1, target="eps", seed=0, pos_emb_len=0):
    """A from-scratch denoiser with every weight perturbed (no path switched off by zero init)."""
    key = (mixer, tc, prefix, target, seed, pos_emb_len)
    if key not in _MODELS:
        torch.manual_seed(seed)
        cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_prefix_len=prefix,
                             latent_target=target, mixer=mixer, time_conditioning=tc, block_size=4,
                             pos_emb_len=pos_emb_len)
        model = build_denoiser(cfg, n_layer=2, n_embd=64, head_size=32)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def latent(B=2, seed=0):
    return torch.randn(B, D, generator=gen(seed))


def prompt(B=2, T=12, seed=0, keep=0.3):
    """Random tokens with mask ids at about (1 - keep) of the positions."""
    g = gen(seed)
    ids = torch.randint(0, MASK, (B, T), generator=g)
    return torch.where(torch.rand(B, T, generator=g) < keep, ids, torch.full_like(ids, MASK))


def check_history(history, start, every_row=True):
    """Tokens only ever go from mask to non-mask; prompt tokens never change; no mask at the end;
    (``every_row``) a row with masks left gains at least one token per step."""
    assert torch.equal(history[0], start)
    given = start != MASK
    for prev, nxt in zip(history, history[1:]):
        done = prev != MASK
        assert torch.equal(nxt[done], prev[done])           # committed tokens stay
        assert torch.equal(nxt[given], start[given])        # prompt tokens stay
        changed = nxt != prev
        assert (prev[changed] == MASK).all() and (nxt[changed] != MASK).all()
        if every_row:
            assert changed.any(dim=1)[(prev == MASK).any(dim=1)].all()
    assert (history[-1] != MASK).all()


@pytest.mark.parametrize("mixer,remasking,temperature,top_k,top_p", [
    ("bi", "low_confidence", 0.0, None, None),
    ("bi", "random", 1.0, 5, None),
    ("block_causal", "random_topk", 0.8, None, 0.9),
    ("dw_jrt", "low_confidence", 1.0, None, 0.5),
    ("bi_wkv", "low_confidence", 1.0, None, None),
])
def test_committed_and_prompt_tokens_never_change(mixer, remasking, temperature, top_k, top_p):
    model = tiny(mixer)
    start = prompt()
    out, history = generate_text(model, latent=latent(), prompt_ids=start, steps=5, remasking=remasking,
                                 temperature=temperature, top_k=top_k, top_p=top_p, generator=gen(1),
                                 return_history=True)
    assert out.dtype == torch.long and out.shape == start.shape
    assert torch.equal(out, history[-1])
    assert len(history) == 1 + 5
    check_history(history, start)
    # LLaDA's schedule: a row's masks are spread evenly over the steps
    for row in range(start.shape[0]):
        counts = [int((history[i][row] == MASK).sum() - (history[i + 1][row] == MASK).sum())
                  for i in range(5)]
        m = int((start[row] == MASK).sum())
        assert sum(counts) == m and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_unconditional_text_from_scratch_and_text_only_model():
    out = generate_text(tiny("bi"), length=10, batch_size=3, steps=4)
    assert out.shape == (3, 10) and (out != MASK).all()
    text_only = tiny("causal", prefix=0)
    out = generate_text(text_only, length=9, steps=9, block_length=3)
    assert out.shape == (1, 9) and (out != MASK).all()
    with pytest.raises(ValueError, match="no latent input"):
        generate_text(text_only, latent=latent(1), length=9, steps=3)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_text(tiny("bi"), length=9, steps=3, cfg_scale=1.0)
    with pytest.raises(ValueError, match="steps"):
        generate_text(tiny("bi"), length=9)


def test_fill_masks_pads_and_keeps_the_prompt():
    start = prompt(T=8, keep=0.6)
    out = fill_masks(tiny("bi"), start, length=12, steps=6, latent=latent())
    assert out.shape == (2, 12) and (out != MASK).all()
    given = start != MASK
    assert torch.equal(out[:, :8][given], start[given])


def test_mask_id_is_never_proposed():
    logits = torch.zeros(2, 5, V)
    logits[..., MASK] = 100.0
    for temperature in (0.0, 1.0):
        tokens, conf = propose_tokens(logits, MASK, temperature=temperature, generator=gen(0))
        assert (tokens != MASK).all() and torch.allclose(conf, torch.full_like(conf, 1 / (V - 1)))
    tokens, _ = propose_tokens(torch.randn(4, 50, V, generator=gen(1)), MASK, temperature=2.0,
                               top_k=3, generator=gen(2))
    assert (tokens != MASK).all()


def test_top_k_and_top_p_filter_the_proposals():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4))).expand(3000, V)
    for kw, allowed in [(dict(top_k=1), {0}), (dict(top_k=2), {0, 1}), (dict(top_p=0.7), {0, 1}),
                        (dict(top_p=0.9), {0, 1, 2}), (dict(top_p=0.1), {0})]:
        tokens, conf = propose_tokens(logits, MASK, temperature=1.0, generator=gen(0), **kw)
        assert set(tokens.tolist()) == allowed, kw
        kept = torch.tensor([0.5, 0.3, 0.15, 0.05])[sorted(allowed)]
        expect = kept[tokens] / kept.sum()                            # renormalised over the kept
        assert torch.allclose(conf, expect.float(), atol=1e-5), kw
    tokens, _ = propose_tokens(logits, MASK, temperature=1.0, generator=gen(0))
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert torch.allclose(freq[:4], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


def test_threshold_decoding():
    model = tiny("bi")
    start = torch.full((2, 12), MASK)
    out, history = generate_text(model, latent=latent(), length=12, threshold=0.2, return_history=True)
    check_history(history, start)
    assert 2 <= len(history) <= 1 + 12
    out, history = generate_text(model, latent=latent(), length=12, threshold=0.0, return_history=True)
    assert len(history) == 2 and (out != MASK).all()          # everything in one step
    out, history = generate_text(model, latent=latent(), length=12, threshold=0.99, steps=3,
                                 return_history=True)
    assert len(history) == 1 + 3                                # the step budget still holds
    check_history(history, start)
    # a high threshold without steps: exactly the one most confident token per row per step
    _, history = generate_text(model, latent=latent(), length=6, threshold=1.1, return_history=True)
    assert len(history) == 1 + 6
    for prev, nxt in zip(history, history[1:]):
        assert ((prev == MASK).sum(1) - (nxt == MASK).sum(1)).tolist() == [1, 1]


@pytest.mark.parametrize("mixer", ["bi", "block_causal"])
def test_blocks_are_decoded_left_to_right(mixer):
    start = prompt(T=12, keep=0.2, seed=3)
    start[:, 4] = MASK                                    # every block holds a mask in some row
    out, history = generate_text(tiny(mixer), latent=latent(), prompt_ids=start, steps=6,
                                 block_length=4, return_history=True)
    check_history(history, start, every_row=False)
    assert len(history) == 1 + 6                          # 3 blocks x 2 steps
    # blocks count from each row's prompt end (its first mask), or from 0 for a model read in blocks
    cached = mixer == "block_causal"
    for r in range(start.shape[0]):
        s = 0 if cached else int((start[r] == MASK).float().argmax())
        for h in history:
            for k in range(2):
                cur, nxt = slice(s + 4 * k, s + 4 * k + 4), slice(s + 4 * k + 4, s + 4 * k + 8)
                touched = (h[r, nxt] != start[r, nxt]).any()
                assert not touched or (h[r, cur] != MASK).all()


def test_guidance_scale_zero_is_the_conditional_model():
    model = tiny("bi")
    ids, t, z = prompt(seed=4), torch.rand(2, generator=gen(5)), latent()
    with torch.no_grad():
        cond = model(ids, t, latent=z).logits
        uncond = model(ids, t).logits
    assert torch.equal(guided_logits(model, ids, t, z, cfg_scale=0.0)[0], cond)
    assert torch.allclose(guided_logits(model, ids, t, z, cfg_scale=2.0)[0],
                          cond + 2.0 * (cond - uncond), atol=1e-4)
    assert torch.allclose(guided_logits(model, ids, t, None)[0], uncond)
    assert not torch.allclose(cond, uncond, atol=1e-3)     # the latent matters in this model

    kw = dict(latent=z, length=12, steps=6, temperature=1.0, remasking="random_topk")
    a = generate_text(model, cfg_scale=0.0, generator=gen(7), **kw)
    b = generate_text(model, generator=gen(7), **kw)
    assert torch.equal(a, b)
    # the batched cond/uncond pass reduces to the conditional model as the scale goes to 0
    greedy = dict(latent=z, length=12, steps=6)
    assert torch.equal(generate_text(model, cfg_scale=1e-6, **greedy), generate_text(model, **greedy))


class TokenCounter:
    """Counts the text tokens passed to a model's forward."""

    def __init__(self, model):
        self.n = 0
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.n += ids.numel()
        self.calls += 1


@pytest.mark.parametrize("block_length,cfg_scale,mixer,pos_emb_len", [(4, 0.0, "block_causal", 0),
                                                                      (6, 1.5, "block_causal", 0),
                                                                      (8, 0.0, "causal", 0),
                                                                      (4, 0.0, "block_causal", 16)])
def test_state_cache_gives_the_same_tokens_with_fewer_tokens_run(block_length, cfg_scale, mixer,
                                                                 pos_emb_len):
    model = tiny(mixer, tc="none", prefix=1, pos_emb_len=pos_emb_len)
    start = prompt(B=2, T=16, seed=8, keep=0.2)
    kw = dict(latent=latent(), prompt_ids=start, steps=8, block_length=block_length, cfg_scale=cfg_scale)
    counter = TokenCounter(model)
    try:
        slow = generate_text(model, use_cache=False, **kw)
        n_slow, counter.n = counter.n, 0
        fast = generate_text(model, use_cache=True, **kw)
        n_fast = counter.n
    finally:
        counter.handle.remove()
    assert torch.equal(fast, slow)
    assert n_fast < n_slow


def test_state_cache_with_a_time_conditioned_model_finishes_and_starts_identically():
    model = tiny("block_causal", tc="film")
    kw = dict(latent=latent(), length=12, steps=6, block_length=4, return_history=True)
    fast, h_fast = generate_text(model, use_cache=True, **kw)
    slow, h_slow = generate_text(model, use_cache=False, **kw)
    assert (fast != MASK).all() and (slow != MASK).all()
    assert torch.equal(h_fast[2], h_slow[2])       # the first block runs without a cache


def test_text_time_is_the_fraction_of_the_fill_still_masked():
    model = tiny("bi")
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(a[1].clone()), with_kwargs=True)
    try:
        generate_text(model, prompt_ids=prompt(T=10, seed=9, keep=0.5), steps=3)
    finally:
        handle.remove()
    start = prompt(T=10, seed=9, keep=0.5)
    n0 = (start == MASK).sum(1).float()
    assert torch.equal(seen[0], torch.ones(len(n0)))        # everything to fill is masked
    for t in seen:  # always (still masked) / (masked at the start), as the training rate is
        assert torch.allclose(t * n0, torch.round(t * n0))
    assert (seen[0] >= seen[1]).all() and (seen[1] >= seen[2]).all() and (seen[2] > 0).all()


def test_determinism_and_remasking_orders():
    model = tiny("bi")
    kw = dict(latent=latent(), length=12, steps=12, temperature=1.0, return_history=True)
    a, ha = generate_text(model, remasking="random", generator=gen(11), **kw)
    b, hb = generate_text(model, remasking="random", generator=gen(11), **kw)
    c, _ = generate_text(model, remasking="random", generator=gen(12), **kw)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ha, hb))
    assert not torch.equal(a, c)

    greedy = dict(latent=latent(), length=12, steps=12, return_history=True)
    lc, h_lc = generate_text(model, remasking="low_confidence", **greedy)
    rnd, h_rnd = generate_text(model, remasking="random", generator=gen(13), **greedy)
    assert (lc != MASK).all() and (rnd != MASK).all()

    def order(history):
        return [torch.nonzero(n != p).tolist() for p, n in zip(history, history[1:])]
    assert order(h_lc) != order(h_rnd)
    # low confidence commits the most confident proposal first
    with torch.no_grad():
        t = torch.ones(2)
        logits = guided_logits(model, torch.full((2, 12), MASK), t, latent())[0]
    _, conf = propose_tokens(logits, MASK)
    first = (h_lc[1] != MASK).float().argmax(1)
    assert torch.equal(first, conf.argmax(1))


@pytest.mark.parametrize("target", ["eps", "v"])
def test_generate_latent(target):
    model = tiny("bi", target=target)
    diff = GaussianDiffusion(target=target)
    text = prompt(seed=14, keep=1.0)
    z1 = generate_latent(model, diff, text, steps=8, generator=gen(0))
    z2 = generate_latent(model, diff, text, steps=8, generator=gen(0))
    assert z1.shape == (2, D) and torch.isfinite(z1).all()
    assert torch.equal(z1, z2)
    other = generate_latent(model, diff, prompt(seed=15, keep=1.0), steps=8, generator=gen(0))
    assert not torch.allclose(z1, other, atol=1e-4)
    zp = generate_latent(model, diff, text, steps=8, sampler="ddpm", generator=gen(0))
    assert zp.shape == (2, D) and torch.isfinite(zp).all()
    with pytest.raises(ValueError, match="latent_target"):
        generate_latent(model, GaussianDiffusion(target="x0"), text, steps=2)


def test_generate_joint_latent_first():
    model = tiny("block_causal")
    diff = GaussianDiffusion()
    kw = dict(order="latent_first", batch_size=2, length=8, steps=4, latent_steps=4, block_length=4)
    text, z = generate_joint(model, diff, temperature=1.0, generator=gen(16), **kw)
    assert text.shape == (2, 8) and (text != MASK).all() and z.shape == (2, D) and torch.isfinite(z).all()
    text2, z2 = generate_joint(model, diff, temperature=1.0, generator=gen(16), **kw)
    assert torch.equal(text, text2) and torch.equal(z, z2)
    # the latent is generate_latent's from the all-mask canvas, the text what generate_text writes from it
    assert torch.equal(z, generate_latent(model, diff, torch.full((2, 8), MASK), steps=4, generator=gen(16)))
    again = generate_text(model, latent=z, length=8, steps=4, block_length=4)
    greedy, zg = generate_joint(model, diff, generator=gen(16), **kw)
    assert torch.equal(zg, z) and torch.equal(greedy, again)
    start = prompt(T=8, seed=17, keep=0.5)
    filled, _, history = generate_joint(model, diff, order="latent_first", prompt_ids=start, steps=4,
                                        latent_steps=4, return_history=True, generator=gen(3))
    check_history(history, start)


@pytest.mark.parametrize("mixer,block_length,eta", [("bi", None, 0.0), ("block_causal", 4, 0.7)])
def test_joint_together_finishes_the_text_and_a_finite_latent_and_a_batch_equals_each_row_alone(
        mixer, block_length, eta):
    # an x0 head: an eps head's x0 = (z - sigma eps) / alpha divides by alpha(1) ~ 0.014, and this
    # random model's latents then grow until batched float rounding flips sampled tokens
    model = tiny(mixer, target="x0")
    diff = GaussianDiffusion(target="x0")
    x = torch.cat([_prefix_canvases([0, 3], 12, seed=30), prompt(B=1, T=12, seed=31, keep=0.4)])
    kw = dict(steps=6, block_length=block_length, remasking="random", temperature=1.0, eta=eta)
    text, z, history = generate_joint(model, diff, prompt_ids=x, generator=[gen(40 + r) for r in range(3)],
                                      return_history=True, **kw)
    check_history(history, x, every_row=block_length is None)    # in blocks a row waits for the others
    assert z.shape == (3, D) and torch.isfinite(z).all()
    for r in range(3):
        alone, za = generate_joint(model, diff, prompt_ids=x[r:r + 1], generator=[gen(40 + r)], **kw)
        assert torch.equal(text[r], alone[0])
        assert torch.allclose(z[r], za[0], atol=1e-5), (z[r], za[0])
    # the latent was moved by the text: another prompt (same start noise) ends elsewhere
    other, zo = generate_joint(model, diff, prompt_ids=prompt(B=3, T=12, seed=32, keep=0.4),
                               generator=[gen(40 + r) for r in range(3)], **kw)
    assert not torch.allclose(zo, z, atol=1e-3)


def test_joint_together_is_one_call_per_step_for_both_halves_and_a_last_one_on_the_finished_text():
    """A plain loop by hand: greedy, one token per step, DDIM eta 0 on the same grid."""
    model = tiny("bi", target="v")
    diff = GaussianDiffusion(target="v")
    T = 6
    init = torch.randn(1, D, generator=gen(50))
    text, z = generate_joint(model, diff, batch_size=1, length=T, steps=T, temperature=0.0,
                             remasking="low_confidence", init_noise=init)
    x, zz = torch.full((1, T), MASK), init.clone()
    with torch.no_grad():
        for k in range(T, 0, -1):
            s = torch.tensor([k / T])
            out = model(x, (x == MASK).float().mean(1), latent=zz, s=s)
            logits = out.logits[0].float()
            logits[:, MASK] = float("-inf")
            probs = logits.softmax(-1)
            conf, tok = probs.max(-1)
            conf[x[0] != MASK] = -1.0
            i = int(conf.argmax())
            x[0, i] = tok[i]
            if k > 1:
                alpha, sigma = diff.alpha_sigma(s)
                a2, sig2 = diff.alpha_sigma(torch.tensor([(k - 1) / T]))
                x0 = alpha * zz - sigma * out.latent.float()            # v-prediction, by hand
                eps = sigma * zz + alpha * out.latent.float()
                zz = a2 * x0 + sig2 * eps
        last = model(x, torch.zeros(1), latent=zz, s=torch.tensor([1 / T])).latent.float()
        alpha, sigma = diff.alpha_sigma(torch.tensor([1 / T]))
        zz = alpha * zz - sigma * last
    assert torch.equal(text, x)
    assert torch.allclose(z, zz, atol=1e-5)


def test_joint_orders_are_checked():
    model, diff = tiny("bi"), GaussianDiffusion()
    with pytest.raises(ValueError, match="order='sideways'"):
        generate_joint(model, diff, length=4, steps=2, order="sideways")
    with pytest.raises(ValueError, match="latent_first"):
        generate_joint(model, diff, length=4, steps=2, sampler="ddpm")


def _prefix_canvases(lengths, T, seed):
    """Rows with prefix prompts of the given lengths, masks after them."""
    g = gen(seed)
    x = torch.full((len(lengths), T), MASK)
    for r, n in enumerate(lengths):
        x[r, :n] = torch.randint(0, MASK, (n,), generator=g)
    return x


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "random_topk"])
@pytest.mark.parametrize("mixer,block_length", [("bi", None), ("bi", 4), ("block_causal", 4)])
def test_a_batch_of_different_prompts_equals_each_row_decoded_alone(remasking, mixer, block_length):
    model = tiny(mixer)
    # prompt lengths 0..9: one row's prompt covers whole blocks the others still fill
    x = torch.cat([_prefix_canvases([0, 3, 9], 12, seed=20), prompt(B=1, T=12, seed=21)])
    kw = dict(steps=6, block_length=block_length, remasking=remasking, temperature=1.0, top_k=8)
    z = latent(B=4, seed=22)
    batch = generate_text(model, prompt_ids=x, latent=z, generator=[gen(100 + r) for r in range(4)], **kw)
    for r in range(4):
        alone = generate_text(model, prompt_ids=x[r:r + 1], latent=z[r:r + 1], generator=gen(100 + r), **kw)
        assert torch.equal(batch[r], alone[0]), (r, batch[r], alone[0])
    # and the streams matter: other seeds give other samples
    other = generate_text(model, prompt_ids=x, latent=z, generator=[gen(200 + r) for r in range(4)], **kw)
    assert not torch.equal(other, batch)


def test_a_batch_with_threshold_and_guidance_equals_each_row_alone():
    model = tiny("bi")
    x, z = _prefix_canvases([1, 5, 8], 12, seed=23), latent(B=3, seed=24)
    kw = dict(steps=None, threshold=0.2, remasking="random_topk", temperature=1.0, cfg_scale=1.5)
    batch = generate_text(model, prompt_ids=x, latent=z, generator=[gen(r) for r in range(3)], **kw)
    for r in range(3):
        alone = generate_text(model, prompt_ids=x[r:r + 1], latent=z[r:r + 1], generator=gen(r), **kw)
        assert torch.equal(batch[r], alone[0])


def test_a_wrong_number_of_generators_is_refused():
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        generate_text(tiny("bi"), length=5, batch_size=3, steps=2, generator=[gen(0), gen(1)])


def _ar_model():
    return tiny("causal", prefix=0)


def test_autoregressive_sampling_reads_the_prompt_and_draws_each_next_token_from_the_model():
    from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive
    model, bos = _ar_model(), 3
    x = _prefix_canvases([2, 5], 9, seed=25)
    out = generate_autoregressive(model, bos_id=bos, prompt_ids=x, temperature=0.0)
    assert torch.equal(out[x != MASK], x[x != MASK]) and not (out == MASK).any()
    # greedy: every written token is the argmax (mask excluded) of a full causal pass over what precedes it
    full = torch.cat([torch.full((2, 1), bos), out[:, :-1]], 1)
    logits = model(full, torch.zeros(2)).logits.float()
    logits[..., MASK] = float("-inf")
    written = x == MASK
    assert torch.equal(out[written], logits.argmax(-1)[written])


def test_autoregressive_batches_equal_rows_alone_and_eos_ends_a_row():
    from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive
    model = _ar_model()
    x = _prefix_canvases([0, 1, 6], 14, seed=26)
    kw = dict(bos_id=3, temperature=1.5, top_p=0.95)
    batch = generate_autoregressive(model, prompt_ids=x, generator=[gen(r) for r in range(3)], **kw)
    for r in range(3):
        alone = generate_autoregressive(model, prompt_ids=x[r:r + 1], generator=gen(r), **kw)
        assert torch.equal(batch[r], alone[0])
    eos = int(batch[0, 4])                      # a token row 0 writes: make it the end of text
    ended = generate_autoregressive(model, prompt_ids=x[:1], generator=gen(0), eos_id=eos, **kw)[0]
    cut = int((ended == eos).nonzero()[0])
    assert cut <= 4 and torch.equal(ended[:cut], batch[0, :cut]) and (ended[cut:] == eos).all()


def test_autoregressive_sampling_refuses_a_gap_and_a_bidirectional_model():
    from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive
    x = torch.full((1, 6), MASK)
    x[0, 4] = 1
    with pytest.raises(ValueError, match="cannot fill a gap|not fill a gap"):
        generate_autoregressive(_ar_model(), bos_id=3, prompt_ids=x)
    with pytest.raises(ValueError, match="needs a causal model"):
        generate_autoregressive(tiny("bi"), bos_id=3, length=4)


def test_a_shared_weight_sum_bi_model_cannot_tell_a_text_from_its_reversal():
    """Why its samples come out reversed half the time; separate weights break the symmetry."""
    x = prompt(B=2, T=10, seed=30)
    t = torch.tensor([0.3, 0.7])
    for share, symmetric in ((True, True), (False, False)):
        torch.manual_seed(0)
        cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_prefix_len=0, mixer="bi", bi_fusion="sum",
                             bi_share_weights=share)
        model = build_denoiser(cfg, n_layer=2, n_embd=64, head_size=32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
            a, b = model(x, t).logits, model(x.flip(1), t).logits.flip(1)
        assert torch.allclose(a, b, atol=1e-5) == symmetric


def test_prompt_guidance_is_llada_s_formula_zero_is_the_conditional_model_and_rows_stay_exact():
    from rwkv_diffusion_rnn.diffusion.sampling import guided_logits
    model = tiny("bi", prefix=0).eval()
    x = _prefix_canvases([3, 5], 10, seed=30)
    lengths = torch.tensor([3, 5])
    t = torch.ones(2)
    cond, _ = guided_logits(model, x, t, prompt_lengths=lengths)
    hidden = x.clone()
    hidden[0, :3], hidden[1, :5] = MASK, MASK
    uncond, _ = guided_logits(model, hidden, t)
    got, _ = guided_logits(model, x, t, prompt_cfg_scale=2.0, prompt_lengths=lengths)
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond))     # LLaDA: un + (w + 1)(c - un)
    zero, _ = guided_logits(model, x, t, prompt_cfg_scale=0.0, prompt_lengths=lengths)
    torch.testing.assert_close(zero, cond)
    kw = dict(steps=6, block_length=4, remasking="random", temperature=1.0, prompt_cfg_scale=1.5)
    batch = generate_text(model, prompt_ids=x, generator=[gen(40), gen(41)], **kw)
    for r in range(2):
        assert torch.equal(batch[r], generate_text(model, prompt_ids=x[r:r + 1], generator=gen(40 + r), **kw)[0])
    assert not torch.equal(batch, generate_text(model, prompt_ids=x, generator=[gen(40), gen(41)],
                                                **{**kw, "prompt_cfg_scale": 0.0}))


def test_latent_and_prompt_guidance_add_their_terms():
    from rwkv_diffusion_rnn.diffusion.sampling import guided_logits
    model = tiny("bi").eval()
    x = _prefix_canvases([2, 4], 8, seed=31)
    lengths, t, z = torch.tensor([2, 4]), torch.full((2,), 0.7), latent(B=2, seed=32)
    cond, _ = guided_logits(model, x, t, latent=z, prompt_lengths=lengths)
    u_lat, _ = guided_logits(model, x, t, latent=None)
    hidden = x.clone()
    hidden[0, :2], hidden[1, :4] = MASK, MASK
    u_prompt, _ = guided_logits(model, hidden, t, latent=z)
    both, _ = guided_logits(model, x, t, latent=z, cfg_scale=1.0, prompt_cfg_scale=0.5, prompt_lengths=lengths)
    torch.testing.assert_close(both, cond + 1.0 * (cond - u_lat) + 0.5 * (cond - u_prompt))


@pytest.mark.parametrize("mixer,block", [("block_causal", 4), ("causal", 1)])
def test_a_long_prompt_read_in_chunks_through_the_state_decodes_as_read_at_once(mixer, block):
    """prefill_chunk: the committed prompt folded into the state a few blocks per call gives the
    tokens of one call over the whole prompt, with calls no longer than the chunk."""
    model = tiny(mixer, tc="none", prefix=1).double()
    x = _prefix_canvases([27, 30], 40, seed=50)
    kw = dict(latent=latent(B=2, seed=51).double(), prompt_ids=x, steps=10, block_length=block if block > 1 else 2,
              temperature=1.0)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, k: sizes.append((a[0] if a else k["input_ids"]).shape[1]),
                                           with_kwargs=True)
    try:
        whole = generate_text(model, generator=[gen(60), gen(61)], **kw)
        longest, sizes[:] = max(sizes), []
        chunked = generate_text(model, generator=[gen(60), gen(61)], prefill_chunk=8, **kw)
    finally:
        hook.remove()
    assert torch.equal(whole, chunked)
    assert longest >= 28 and max(sizes) <= 8 + 8     # a chunk, or the last one plus the block decoded


def test_without_block_length_a_cached_continuation_feeds_its_prompt_once_and_then_only_what_follows():
    """One decoding span over the whole canvas: the cache reads the prompt into the state (in
    chunks) and each step feeds from the first still-masked model block, not from position 0;
    the tokens are those of uncached decoding (no time conditioning: the cache is exact)."""
    model = tiny("block_causal", tc="none", prefix=1).double()
    x = _prefix_canvases([27, 30], 40, seed=52)
    kw = dict(latent=latent(B=2, seed=53).double(), prompt_ids=x, steps=13, temperature=1.0)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, k: sizes.append((a[0] if a else k["input_ids"]).shape[1]),
                                           with_kwargs=True)
    try:
        cached = generate_text(model, generator=[gen(62), gen(63)], prefill_chunk=8, **kw)
        fed, sizes[:] = list(sizes), []
        plain = generate_text(model, generator=[gen(62), gen(63)], use_cache=False, **kw)
    finally:
        hook.remove()
    assert torch.equal(cached, plain)
    assert min(sizes) == 40 and max(fed) <= 8 + 16 and sum(fed) < sum(sizes) / 2, (sizes, fed)


def test_an_ar_model_reads_the_shared_prompt_in_chunks_and_writes_the_same_tokens():
    from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive
    model = tiny("causal", tc="none", prefix=0).double()
    x = _prefix_canvases([25, 31], 40, seed=52)
    one = generate_autoregressive(model, bos_id=0, prompt_ids=x, temperature=1.0, generator=[gen(70), gen(71)],
                                  prefill_chunk=1)
    chunked = generate_autoregressive(model, bos_id=0, prompt_ids=x, temperature=1.0, generator=[gen(70), gen(71)],
                                      prefill_chunk=7)
    assert torch.equal(one, chunked) and torch.equal(one[:, :25], x[:, :25])
