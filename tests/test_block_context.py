"""block_causal with clean context (BD3-LM's training): each block is read forward from the state
the clean blocks before it leave. Checked against running the model without context on the
clean blocks followed by the noised one (the same thing, written out), forward and backward; at
block size 1 with shifted logits and no right-to-left reading yet it is the AR model exactly."""
import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config

V = 40


def model(block, prefix=1, fusion="gated", share=True, shift=False, anneal=0, dtype=torch.float64, seed=0,
          perturb=True):
    torch.manual_seed(seed)
    backbone = RWKV7(RWKV7Config(vocab_size=V, n_layer=2, n_embd=32, head_size=16))
    cfg = DenoiserConfig(vocab_size=V, mask_id=V - 1, latent_dim=4, latent_prefix_len=prefix, mixer="block_causal",
                         block_size=block, block_context="clean", bi_fusion=fusion, bi_share_weights=share,
                         shift_logits=shift, bos_id=0, bi_anneal_steps=anneal, use_pretrained_head=shift,
                         time_conditioning="film")
    m = MultimodalRWKVDenoiser(backbone, cfg).to(dtype)
    if perturb:                            # a non-trivial fusion and conditioning, not their zero init
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    m.set_training_step(anneal)
    return m


def noised(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (2, T), generator=g)
    xt = torch.where(torch.rand(2, T, generator=g) < 0.5, torch.full_like(x0, V - 1), x0)
    return x0, xt, torch.rand(2, generator=g), torch.randn(2, 4, generator=g, dtype=torch.float64)


def written_out(m, x0, xt, t, z, block):
    """Each block's logits from the model without context on [clean blocks before | this block noised]."""
    T = x0.shape[1]
    parts = []
    for a in range(0, T, block):
        b = min(a + block, T)
        seq = torch.cat([x0[:, :a], xt[:, a:b], x0[:, b:]], 1)     # what follows block b is not read by it
        parts.append(m(seq, t, z).logits[:, a:b])
    return torch.cat(parts, 1)


@pytest.mark.parametrize("block, prefix, fusion, share, shift", [
    (4, 1, "gated", True, False), (3, 0, "sum", True, False), (4, 2, "concat", False, True), (1, 1, "gated", True, True)])
def test_clean_context_equals_the_model_run_on_clean_blocks_then_the_noised_one(block, prefix, fusion, share, shift):
    m = model(block, prefix, fusion, share, shift)
    x0, xt, t, z = noised(10)
    got = m(xt, t, z if prefix else None, context_ids=x0).logits
    want = written_out(m, x0, xt, t, z if prefix else None, block)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    # the latent head reads the prefix, which is the same in both streams
    if prefix:
        assert torch.allclose(m(xt, t, z, context_ids=x0).latent, m(xt, t, z).latent, atol=1e-10)


def test_the_gradients_of_clean_context_are_those_of_the_written_out_model():
    m = model(4, prefix=1, share=False, shift=True)
    x0, xt, t, z = noised(12, seed=3)
    w = torch.randn(2, 12, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (m(xt, t, z, context_ids=x0).logits * w).sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    (written_out(m, x0, xt, t, z, 4) * w).sum().backward()
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 20
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-9, rtol=1e-7), n


def test_with_its_own_input_as_context_the_model_reads_as_without_one():
    m = model(4)
    _, xt, t, z = noised(12)
    assert torch.allclose(m(xt, t, z, context_ids=xt).logits, m(xt, t, z).logits, atol=1e-10)


def test_block_1_shifted_before_annealing_is_an_ar_model_of_the_clean_text():
    """Token i is predicted from the clean tokens before it, whatever is masked: the logits equal
    those of the causal model on the clean text, and masking other tokens changes nothing."""
    m = model(1, prefix=0, shift=True, anneal=5, perturb=False)
    m.set_training_step(0)
    x0, xt, t, _ = noised(10)
    got = m(xt, t, context_ids=x0).logits
    other = torch.where(torch.rand(2, 10, generator=torch.Generator().manual_seed(9)) < 0.7,
                        torch.full_like(x0, V - 1), x0)
    assert torch.allclose(m(other, t, context_ids=x0).logits, got, atol=1e-10)
    ar = m.backbone(torch.cat([torch.zeros(2, 1, dtype=torch.long), x0], 1))[:, :10]
    assert torch.allclose(got, ar, atol=1e-8)


def test_clean_context_is_refused_where_no_mixer_reads_it():
    with pytest.raises(ValueError, match="model.block_context=clean is read by model.mixer=block_causal"):
        MultimodalRWKVDenoiser(RWKV7(RWKV7Config(vocab_size=V, n_layer=1, n_embd=32, head_size=16)),
                               DenoiserConfig(vocab_size=V, mask_id=V - 1, mixer="bi", block_context="clean"))
    with pytest.raises(ValueError, match="model.block_context='dirty'"):
        DenoiserConfig(vocab_size=V, mask_id=V - 1, mixer="block_causal", block_context="dirty")


def test_training_and_scoring_give_the_clean_text_as_context(tmp_path):
    """The objective's loss and the bound are those of the written-out model on their draws."""
    from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
    from rwkv_diffusion_rnn.diffusion.elbo import masked_nelbo
    from rwkv_diffusion_rnn.diffusion.objective import DiffusionObjective
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserOutput
    from rwkv_diffusion_rnn.training import likelihood
    m = model(4, prefix=0, shift=True).float()
    x0, _, _, _ = noised(12, seed=4)
    batch = {"input_ids": x0, "attention_mask": torch.ones_like(x0)}
    obj = DiffusionObjective(MaskedDiffusion(mask_id=V - 1, vocab_size=V, truncate_prob=0.0), None)
    loss, _ = obj(m, batch, torch.Generator().manual_seed(0))
    nb = obj.noise(batch, torch.Generator().manual_seed(0))
    want, _ = obj.loss(DenoiserOutput(written_out(m, nb.x0, nb.xt, nb.t, None, 4), None, None), nb)
    assert nb.is_masked.any() and torch.allclose(loss, want, atol=1e-6)
    schedule = obj.text.schedule
    got = likelihood.score(m, [batch], objective="diffusion", schedule=schedule, mask_id=V - 1,
                           vocab_size=V, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bound = masked_nelbo(lambda xt, t: written_out(m, x0, xt, t, None, 4), x0, schedule, V - 1,
                             torch.Generator().manual_seed(1))
    prior = likelihood.prior_nats(schedule, V - 1) * x0.numel()
    assert got.nats_per_token == pytest.approx((float(bound.sum()) + prior) / x0.numel(), rel=1e-5)
