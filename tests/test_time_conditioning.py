"""Time conditioning: embeddings, FiLM and AdaLN-Zero (identity at initialisation, trainable)."""

import math

import pytest
import torch
import torch.nn as nn

from rwkv_diffusion_rnn.models.time_conditioning import (
    AdaLNParams,
    AdaLNZero,
    FiLM,
    TimeConditioner,
    TimestepEmbedder,
    modulate,
    timestep_embedding,
)


def test_timestep_embedding_values_and_shapes():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    # t = 0: cos = 1, sin = 0
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4
    # highest frequency is 1: t = 0.5 -> argument 500
    assert emb[1, 0].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    assert emb[1, 4].item() == pytest.approx(math.sin(500.0), abs=1e-4)
    # lowest frequency 10000^(-3/4) = 1e-3
    assert emb[2, 3].item() == pytest.approx(math.cos(1000.0 * 1e-3), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)
    assert (timestep_embedding(t, 7)[:, -1] == 0).all()


def test_embedding_distinct_for_distinct_t():
    t = torch.linspace(0, 1, 101)
    emb = timestep_embedding(t, 256)
    dist = torch.cdist(emb, emb) + torch.eye(101) * 1e9
    assert dist.min().item() > 1e-2
    out = TimestepEmbedder(64)(t)
    assert out.shape == (101, 64)
    dist = torch.cdist(out, out) + torch.eye(101) * 1e9
    assert dist.min().item() > 0


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_time_conditioner(combine):
    torch.manual_seed(0)
    tc = TimeConditioner(48, freq_dim=32, combine=combine)
    t, s = torch.tensor([0.1, 0.9]), torch.tensor([0.3, 0.3])
    c = tc(t, s)
    assert c.shape == (2, 48)
    assert not torch.allclose(c, tc(t, torch.tensor([0.7, 0.7])))   # depends on s
    assert not torch.allclose(c[0], c[1])                           # depends on t
    if combine == "sum":
        torch.testing.assert_close(c, tc.text_embedder(t) + tc.latent_embedder(s))
    with pytest.raises(ValueError, match="s:"):
        tc(t)


def test_time_conditioner_text_only():
    tc = TimeConditioner(16, freq_dim=16, latent_time=False)
    t = torch.tensor([0.2])
    torch.testing.assert_close(tc(t), tc.text_embedder(t))
    with pytest.raises(ValueError, match="latent_time=False"):
        tc(t, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="combine"):
        TimeConditioner(16, combine="product")


def test_film_identity_at_init_and_trainable():
    torch.manual_seed(1)
    film = FiLM(cond_dim=16, hidden=24)
    x, c = torch.randn(2, 5, 24), torch.randn(2, 16)
    out = film(x, c)
    assert torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    assert film.proj.weight.grad.abs().sum() > 0
    # after a step, gamma/beta are nonzero and per-position conditioning works
    with torch.no_grad():
        film.proj.weight.normal_()
    assert not torch.equal(film(x, c), x)
    c_tok = c[:, None].expand(2, 5, 16)
    torch.testing.assert_close(film(x, c_tok), film(x, c))


@pytest.mark.parametrize("identity_init", [False, True])
def test_adaln_zero_at_init(identity_init):
    torch.manual_seed(2)
    ada = AdaLNZero(cond_dim=16, hidden=24, identity_init=identity_init)
    c = torch.randn(3, 16)
    p = ada(c)
    assert isinstance(p, AdaLNParams) and len(p) == 6
    for v in p:
        assert v.shape == (3, 1, 24)
    gate = 1.0 if identity_init else 0.0
    assert ada.gate_offset == gate
    for v in (p.shift_att, p.scale_att, p.shift_ffn, p.scale_ffn):
        assert torch.equal(v, torch.zeros_like(v))
    for v in (p.gate_att, p.gate_ffn):
        assert torch.equal(v, torch.full_like(v, gate))

    # a toy pre-norm residual block: with identity_init it equals the unconditioned block exactly,
    # with the DiT init it is the identity map
    norm, branch = nn.LayerNorm(24), nn.Linear(24, 24)
    x = torch.randn(3, 7, 24)
    out = x + p.gate_att * branch(modulate(norm(x), p.shift_att, p.scale_att))
    assert torch.equal(out, x + branch(norm(x)) if identity_init else x)


@pytest.mark.parametrize("identity_init", [False, True])
def test_adaln_zero_gradients_reach_the_projection(identity_init):
    torch.manual_seed(3)
    ada = AdaLNZero(cond_dim=16, hidden=24, identity_init=identity_init)
    norm, branch = nn.LayerNorm(24), nn.Linear(24, 24)
    x, c = torch.randn(3, 7, 24), torch.randn(3, 16)
    p = ada(c)
    h = x + p.gate_att * branch(modulate(norm(x), p.shift_att, p.scale_att))
    h = h + p.gate_ffn * branch(modulate(norm(h), p.shift_ffn, p.scale_ffn))
    (h * torch.randn_like(h)).sum().backward()
    grad = ada.proj.weight.grad.reshape(6, 24, 16)   # rows: shift, scale, gate of att, then of ffn
    assert grad.abs().sum() > 0
    assert grad[2].abs().sum() > 0 and grad[5].abs().sum() > 0      # gates always learn
    if identity_init:                                                # gate 1: shift/scale learn too
        assert all(grad[i].abs().sum() > 0 for i in (0, 1, 3, 4))


def test_modulate():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)
