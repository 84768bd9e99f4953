"""The training objective: which rows are trained text -> latent, latent -> text, with the null
latent, and the loss each gets (checked against the two diffusions' own losses on row subsets)."""
import pytest
import torch

from rwkv_diffusion_rnn.diffusion.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
from rwkv_diffusion_rnn.diffusion.objective import DiffusionObjective, ObjectiveConfig
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, DenoiserOutput
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

V, MASK, D, T = 30, 29, 8, 10


def batch(B, seed=0, latent=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    out = {"input_ids": ids * attn, "attention_mask": attn}
    if latent:
        out["latent"] = torch.randn(B, D, generator=g)
    return out


def objective(**kw):
    text = MaskedDiffusion(mask_id=MASK, vocab_size=V, truncate_prob=0.0)
    return DiffusionObjective(text, GaussianDiffusion(target="x0"), ObjectiveConfig(**kw))


def test_row_roles_follow_the_probabilities_and_set_the_times():
    obj = objective(clean_text_prob=0.3, clean_latent_prob=0.5, latent_drop_prob=0.2)
    b = batch(4000)
    nb = obj.noise(b, torch.Generator().manual_seed(1))
    clean_text = ~nb.text_rows
    clean_latent = nb.s == 0
    assert clean_text.float().mean() == pytest.approx(0.3, abs=0.03)
    assert clean_latent.float().mean() == pytest.approx(0.5, abs=0.03)
    assert not (clean_text & clean_latent).any()                     # one role per row
    assert nb.drop.float().mean() == pytest.approx(0.2, abs=0.03)
    # text -> latent rows: clean text at t = 0, noised latent
    assert (nb.t[clean_text] == 0).all() and not nb.is_masked[clean_text].any()
    assert torch.equal(nb.xt[clean_text], nb.x0[clean_text]) and (nb.s[clean_text] > 0).all()
    # latent -> text rows: masked text, the latent itself as conditioning
    assert nb.is_masked[clean_latent].any() and (nb.t[clean_latent] > 0).all()
    torch.testing.assert_close(nb.zs[clean_latent], nb.z0[clean_latent], atol=6e-3, rtol=0)   # sigma(0) = 0.001
    assert not torch.allclose(nb.zs[~clean_latent], nb.z0[~clean_latent], atol=0.1)
    # the latent loss is on noised, kept rows only
    assert torch.equal(nb.latent_rows, (nb.s > 0) & ~nb.drop)
    assert (nb.xt[nb.is_masked] == MASK).all() and not nb.is_masked[nb.valid == 0].any()


def test_loss_is_the_two_diffusion_losses_on_their_rows():
    obj = objective(clean_text_prob=0.25, clean_latent_prob=0.25, latent_drop_prob=0.25,
                    latent_loss_weight=0.7)
    B = 64
    nb = obj.noise(batch(B, seed=2), torch.Generator().manual_seed(3))
    logits = torch.randn(B, T, V, requires_grad=True)
    latent = torch.randn(B, D, requires_grad=True)
    loss, stats = obj.loss(DenoiserOutput(logits, latent, None), nb)
    r, lr = nb.text_rows, nb.latent_rows
    assert 0 < r.sum() < B and 0 < lr.sum() < B
    want_text, _ = obj.text.loss(logits[r], nb.x0[r], nb.is_masked[r], nb.t[r], valid=nb.valid[r])
    err = (latent - nb.z0).pow(2).mean(1)                              # x0 target, by hand
    want_latent = err[lr].mean()
    torch.testing.assert_close(loss, want_text + 0.7 * want_latent)
    assert stats["text_loss"] == pytest.approx(float(want_text.detach()), rel=1e-6)
    assert stats["latent_loss"] == pytest.approx(float(want_latent.detach()), rel=1e-6)
    assert stats["tokens"] == int(nb.valid.sum())
    loss.backward()
    assert (logits.grad[~r] == 0).all() and (logits.grad[r] != 0).any()   # clean text: no text loss
    assert (latent.grad[~lr] == 0).all() and (latent.grad[lr] != 0).all()  # clean / dropped: none


def test_text_only_every_row_is_a_text_row():
    text = MaskedDiffusion(mask_id=MASK, vocab_size=V, truncate_prob=0.0)
    obj = DiffusionObjective(text, None)
    nb = obj.noise(batch(16, latent=False), torch.Generator().manual_seed(0))
    assert nb.text_rows.all() and nb.zs is None and nb.latent_rows is None
    logits = torch.randn(16, T, V, requires_grad=True)
    loss, stats = obj.loss(DenoiserOutput(logits, None, None), nb)
    assert stats["latent_loss"] == 0.0
    torch.testing.assert_close(loss, text.loss(logits, nb.x0, nb.is_masked, nb.t, valid=nb.valid)[0])


def test_a_batch_without_text_rows_keeps_a_graph():
    obj = objective(clean_text_prob=1.0, clean_latent_prob=0.0, latent_drop_prob=0.0)
    nb = obj.noise(batch(8), torch.Generator().manual_seed(0))
    logits = torch.randn(8, T, V, requires_grad=True)
    loss, stats = obj.loss(DenoiserOutput(logits, torch.randn(8, D, requires_grad=True), None), nb)
    assert stats["text_loss"] == 0.0 and stats["latent_loss"] > 0
    loss.backward()
    assert logits.grad is not None


def test_call_runs_the_denoiser_on_the_noised_batch_and_is_reproducible():
    torch.manual_seed(0)
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_target="x0"),
                           n_layer=1, n_embd=32, head_size=16)
    obj = objective()
    b = batch(6, seed=4)
    loss1, st1 = obj(model, b, torch.Generator().manual_seed(5))
    nb = obj.noise(b, torch.Generator().manual_seed(5))
    out = model(nb.xt, nb.t, nb.zs, nb.s, latent_drop=nb.drop)
    loss2, st2 = obj.loss(out, nb)
    assert torch.equal(loss1, loss2) and st1 == st2
    loss3, _ = obj(model, b, torch.Generator().manual_seed(6))
    assert not torch.equal(loss1, loss3)


def test_probabilities_are_refused_by_name():
    with pytest.raises(ValueError, match="training.latent_drop_prob"):
        ObjectiveConfig(latent_drop_prob=1.5)
    with pytest.raises(ValueError, match="clean_text_prob \\+ training.clean_latent_prob"):
        ObjectiveConfig(clean_text_prob=0.6, clean_latent_prob=0.6)


def test_shares_of_a_batch_add_up_to_its_loss_and_gradient():
    """Each process runs some rows with the whole batch's draws and normaliser: the shares' losses
    and gradients sum to those of the whole batch, for text + latent and for next-token prediction."""
    from rwkv_diffusion_rnn.diffusion.objective import AutoregressiveObjective
    torch.manual_seed(0)
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_target="x0"),
                           n_layer=1, n_embd=32, head_size=16).double()
    obj = objective(latent_drop_prob=0.3)
    b = batch(8, seed=7)
    b["latent"] = b["latent"].double()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    for run in (lambda rows: obj(model, b, torch.Generator().manual_seed(9), rows=rows),
                lambda rows: AutoregressiveObjective()(model, b, rows=rows)):
        whole, whole_stats = run(None)
        g_whole = grads(whole)
        shares = [run(rows) for rows in (slice(0, 3), slice(3, 8))]
        g_shares = [grads(loss) for loss, _ in shares]
        # the losses are taken in float32 (cross-entropy, latent error), hence float32 tolerances
        torch.testing.assert_close(sum(loss for loss, _ in shares).detach(), whole.detach(), rtol=1e-6, atol=0)
        for key in ("text_loss", "latent_loss", "tokens"):
            assert sum(st[key] for _, st in shares) == pytest.approx(whole_stats[key], rel=1e-6)
        for gw, ga, gb in zip(g_whole, *g_shares):
            torch.testing.assert_close(ga + gb, gw, rtol=1e-5, atol=1e-8)
    assert whole_stats["latent_loss"] == 0.0 and shares[0][1]["text_loss"] > 0      # the AR pass
