"""Decoding with the state cache that uses block_causal's parallelism: fold-and-step (a finished
block folded into the state by the call that takes the next block's first step) and confidence
threshold decoding inside cached blocks."""
import pytest
import torch

from rwkv_diffusion_rnn.diffusion.sampling import generate_text
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

V, MASK, D = 20, 19, 8


def model_for(mixer="block_causal", tc="none", prefix=1, shift=False, context="noisy", block_size=4, seed=0):
    torch.manual_seed(seed)
    cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_prefix_len=prefix, mixer=mixer,
                         time_conditioning=tc, block_size=block_size, shift_logits=shift, bos_id=0 if shift else None,
                         block_context=context)
    model = build_denoiser(cfg, n_layer=2, n_embd=64, head_size=32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():          # every weight perturbed: no path switched off by a zero init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def prompt(B=2, T=16, seed=0, keep=0.2, given_prefix=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, T), generator=g)
    out = torch.where(torch.rand(B, T, generator=g) < keep, ids, torch.full_like(ids, MASK))
    out[:, :given_prefix] = ids[:, :given_prefix]
    return out


class Calls:
    """Counts the model's forward calls (and those that fold: return_state or state_at)."""

    def __init__(self, model):
        self.n = self.folds = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.n += 1
        self.folds += bool(kwargs.get("return_state")) or kwargs.get("state_at") is not None


def decode(model, folds: bool, **kw):
    """generate_text with the cache, folding in the next step's call (the mixer's trait) or not."""
    model.mixer.folds_state = folds
    counter = Calls(model)
    try:
        out, history = generate_text(model, use_cache=True, return_history=True, **kw)
    finally:
        counter.handle.remove()
        model.mixer.folds_state = True
    return out, len(history) - 1, counter


@pytest.mark.parametrize("mixer,shift,context,block_length,cfg_scale,given", [
    ("block_causal", False, "noisy", 4, 0.0, 0),
    ("block_causal", False, "noisy", 4, 1.5, 5),       # guidance: 2B rows in the state; a prompt over a block
    ("block_causal", False, "noisy", 2, 0.0, 0),       # decoding blocks inside model blocks
    ("block_causal", True, "clean", 4, 0.0, 6),        # the position before a block reads its last token
    ("causal", False, "noisy", 4, 0.0, 0),
    ("causal", False, "noisy", 3, 0.0, 2),
])
def test_fold_and_step_gives_the_same_tokens_as_folding_apart_with_one_call_per_step(
        mixer, shift, context, block_length, cfg_scale, given):
    model = model_for(mixer, shift=shift, context=context)
    kw = dict(latent=torch.randn(2, D, generator=torch.Generator().manual_seed(3)),
              prompt_ids=prompt(given_prefix=given), steps=8, block_length=block_length, cfg_scale=cfg_scale)
    fused, steps_f, calls_f = decode(model, True, **kw)
    apart, steps_a, calls_a = decode(model, False, **kw)
    plain = generate_text(model, use_cache=False, **kw)
    assert torch.equal(fused, apart) and torch.equal(fused, plain)     # the cache is exact without t
    assert steps_f == steps_a
    assert calls_f.n == steps_f                       # one model call per step, none for folding alone
    assert calls_a.n == steps_a + calls_a.folds and calls_a.folds >= 2
    assert calls_f.n < calls_a.n
    assert calls_f.folds >= 2                         # and the state did move forward


def test_a_long_prompt_is_still_read_in_chunks_before_fold_and_step():
    model = model_for()
    kw = dict(prompt_ids=prompt(T=24, given_prefix=13, keep=0.0), steps=6, block_length=4, prefill_chunk=4)
    fused, steps, calls = decode(model, True, **kw)
    assert torch.equal(fused, generate_text(model, use_cache=False, **kw))
    # 13 given tokens: the first block to decode starts at 12; chunks of 4 fold 0..4, 4..8, then the
    # first step folds 8..12 and decodes 12..16
    assert calls.n == steps + 2


def test_state_at_returns_the_state_of_a_shorter_call_and_the_logits_of_a_full_one():
    model = model_for(shift=True, context="clean")
    ids, t, z = prompt(keep=1.0), torch.rand(2), torch.randn(2, D)
    with torch.no_grad():
        full = model(ids, t, z)
        both = model(ids, t, z, state_at=8)
        head = model(ids[:, :8], t, z, return_state=True)
        tail = model(ids[:, 8:], t, z, state=both.state, pos_offset=8, prev_ids=ids[:, 7])
    torch.testing.assert_close(both.logits, full.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(both.state, head.state):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail.logits, full.logits[:, 8:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="state_at"):
        model(ids, t, z, state_at=4, return_state=True)
    with pytest.raises(ValueError, match="state_at"):
        model_for("bi")(ids, t, z, state_at=4)


def test_a_threshold_above_one_commits_one_token_per_step_inside_cached_blocks():
    model = model_for()
    kw = dict(length=12, block_length=4)
    out, steps, calls = decode(model, True, threshold=1.01, **kw)
    assert steps == 12 and calls.n == 12
    one_per_step, _, _ = decode(model, True, steps=12, **kw)      # LLaDA's schedule, 4 steps a block
    assert torch.equal(out, one_per_step)


def test_a_low_threshold_finishes_each_cached_block_in_one_step():
    model = model_for()
    out, steps, calls = decode(model, True, threshold=0.0, length=12, block_length=4)
    assert (out != MASK).all()
    assert steps == 3 and calls.n == 3                # one call per block, folding included
    some, steps_mid, _ = decode(model, True, threshold=0.3, length=12, block_length=4)
    assert 3 <= steps_mid <= 12 and (some != MASK).all()
