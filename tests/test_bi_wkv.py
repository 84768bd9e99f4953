"""``model.mixer=bi_wkv``: one RWKV-7 block per layer with its recurrence run both ways, against a
plain double recurrence written here (float64, forward and every gradient), and its equivalence
to the causal block when the backward scan's gate is 0 (pretrained weights)."""
import math

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.train_rwkv import compose_config
from rwkv_diffusion_rnn.training.improved_trainer import Trainer
from rwkv_diffusion_rnn.models.mixers import build_mixer
from rwkv_diffusion_rnn.models.mixers.base import Modulation
from rwkv_diffusion_rnn.models.mixers.bi_wkv import BiWKVMixer
from rwkv_diffusion_rnn.models.mixers.causal import CausalMixer
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser, load_rwkv7, save_random_blinkdl_checkpoint

C, HEAD = 64, 32


def blocks(seed=0, n_layer=2, dtype=torch.float64):
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=16, n_layer=n_layer, n_embd=C, head_size=HEAD,
                              wkv_backend="torch")).to(dtype)
    with torch.no_grad():  # random weights everywhere, so no path is off by its zero init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.blocks


def modulations(n, B, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return (torch.randn(B, 1, C, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    return [Modulation(rnd(), rnd(), rnd(), rnd(), rnd(), rnd()) for _ in range(n)]


# ------------------------------------------------------------------------------- the reference


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _neighbour(h, shift):
    z = torch.zeros_like(h[:, :1])
    left = torch.cat([z, h[:, :-1]], 1)
    return left if shift == "left" else (left + torch.cat([h[:, 1:], z], 1)) / 2


def reference_block(block, x, v_first, mod, gate, shift):
    """One block written out: both recurrences token by token (the backward one reads the state of
    the positions after t), fused as o_f + gate * o_b, then RWKV-7's GroupNorm, bonus, gate,
    output projection and channel mix."""
    att, ffn = block.att, block.ffn
    B, T, _ = x.shape
    H, N = C // HEAD, HEAD
    h = _layer_norm(x, block.ln1) * (1 + mod.scale1) + mod.shift1
    nb = _neighbour(h, shift)
    xr, xw, xk, xv, xa, xg = (h + (nb - h) * mu for mu in (att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g))
    r = xr @ att.receptance.weight.T
    w = -math.exp(-0.5) * torch.sigmoid(att.w0 + torch.tanh(xw @ att.w1) @ att.w2)
    k = xk @ att.key.weight.T
    v = xv @ att.value.weight.T
    a = torch.sigmoid(att.a0 + (xa @ att.a1) @ att.a2)
    g = torch.sigmoid(xg @ att.g1) @ att.g2
    kk = (k * att.k_k).view(B, T, H, N)
    kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k * (1 + (a - 1) * att.k_a)
    if att.layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(att.v0 + (xv @ att.v1) @ att.v2)
    r4, w4, k4, v4, a4 = (z.reshape(B, T, H, N) for z in (r, w, k, v, a))

    def step(S, t):
        sa = torch.einsum("bhk,bhkv->bhv", -kk[:, t], S)
        return (S * w4[:, t].exp()[..., None] + (kk[:, t] * a4[:, t])[..., None] * sa[..., None, :]
                + k4[:, t][..., None] * v4[:, t][..., None, :])

    S, o_f = torch.zeros(B, H, N, N, dtype=x.dtype), [None] * T
    for t in range(T):
        S = step(S, t)
        o_f[t] = torch.einsum("bhk,bhkv->bhv", r4[:, t], S)
    S, o_b = torch.zeros(B, H, N, N, dtype=x.dtype), [None] * T
    for t in reversed(range(T)):
        o_b[t] = torch.einsum("bhk,bhkv->bhv", r4[:, t], S)     # positions > t only
        S = step(S, t)
    o = torch.stack(o_f, 1) + gate.view(H, N) * torch.stack(o_b, 1)
    mu = o.mean(-1, keepdim=True)
    o = (o - mu) / torch.sqrt(((o - mu) ** 2).mean(-1, keepdim=True) + att.ln_x.eps)
    o = o.reshape(B, T, C) * att.ln_x.weight + att.ln_x.bias
    o = o + ((r4 * k4 * att.r_k).sum(-1, keepdim=True) * v4).reshape(B, T, C)
    x = x + mod.gate1 * ((o * g) @ att.output.weight.T)
    h = _layer_norm(x, block.ln2) * (1 + mod.scale2) + mod.shift2
    kx = h + (_neighbour(h, shift) - h) * ffn.x_k
    x = x + mod.gate2 * (torch.relu(kx @ ffn.key.weight.T) ** 2 @ ffn.value.weight.T)
    return x, v_first


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shift", ["left", "mean"])
def test_bi_wkv_equals_a_plain_double_recurrence_forward_and_in_every_gradient(shift):
    blks = blocks()
    mixer = BiWKVMixer(blks, C, bi_wkv_shift=shift).double()
    with torch.no_grad():
        for gate in mixer.gate:
            gate.copy_(torch.rand(C, dtype=torch.float64) * 2 - 0.5)   # not all 1, so its gradient matters
    B, T = 2, 9
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    mods = modulations(len(blks), B)
    out, _ = mixer(blks, x, mods)
    ref, vf = x, None
    for i, block in enumerate(blks):
        ref, vf = reference_block(block, ref, vf, mods[i], mixer.gate[i], shift)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)

    g = torch.randn_like(out)
    params = [p for n, p in blks.named_parameters() if not n.startswith("0.ln0.")]   # ln0: the embedding's norm
    leaves = [x, *params, *mixer.gate, *(t for m in mods for t in vars(m).values())]
    got = torch.autograd.grad((out * g).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert b is not None and b.abs().sum() > 0, f"leaf {i} has no reference gradient"
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"gradient of leaf {i}")


def test_with_the_backward_gate_at_zero_bi_wkv_is_the_causal_stack_exactly():
    blks = blocks(dtype=torch.float32)
    x = torch.randn(2, 11, C)
    mods = [Modulation(*(t.float().detach() for t in vars(m).values())) for m in modulations(len(blks), 2)]
    with torch.no_grad():
        causal, _ = CausalMixer(blks)(blks, x, mods)
        bi, _ = BiWKVMixer(blks, C, bi_wkv_gate_init=0.0)(blks, x, mods)
        summed, _ = BiWKVMixer(blks, C)(blks, x, mods)
    assert torch.equal(bi, causal)
    assert not torch.allclose(summed, causal, atol=1e-4)      # the gate is what switches the right side off


def test_bi_wkv_loads_pretrained_weights_and_at_gate_zero_is_the_pretrained_lm(tmp_path):
    path = save_random_blinkdl_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=40)
    backbone = load_rwkv7(path)
    names = set(backbone.state_dict())
    cfg = DenoiserConfig(vocab_size=40, mask_id=39, latent_prefix_len=0, mixer="bi_wkv", use_pretrained_head=True,
                         mixer_options={"bi_wkv_gate_init": 0.0})
    model = MultimodalRWKVDenoiser(backbone, cfg)
    assert {n[len("backbone."):] for n in model.state_dict() if n.startswith("backbone.")} == names
    assert {n for n in model.state_dict() if n.startswith("mixer.")} == {"mixer.gate.0", "mixer.gate.1"}
    ids = torch.randint(0, 39, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids, torch.rand(2)).logits, backbone(ids))


def test_every_position_sees_every_other_through_bi_wkv():
    torch.manual_seed(0)
    model = build_denoiser(DenoiserConfig(vocab_size=40, mask_id=39, latent_dim=8, mixer="bi_wkv"),
                           n_layer=2, n_embd=64, head_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ids, t, z = torch.randint(0, 39, (1, 12)), torch.rand(1), torch.randn(1, 8)
        for j in (0, 6, 11):
            ids2 = ids.clone()
            ids2[0, j] = (ids2[0, j] + 1) % 39
            diff = (model(ids, t, z).logits - model(ids2, t, z).logits).abs().amax(-1)[0]
            assert bool((diff > 1e-7).all()), f"changing token {j} leaves some position unchanged"
        # the latent prefix is read both ways too: it reaches the text, and the text reaches the latent head
        assert not torch.allclose(model(ids, t, z).logits, model(ids, t, z + 1).logits)
        assert not torch.allclose(model(ids, t, z).latent, model(ids2, t, z).latent)


def test_bi_wkv_with_grad_checkpointing_gives_the_same_values_and_gradients():
    blks = blocks()
    mixer = BiWKVMixer(blks, C).double()
    x = torch.randn(2, 8, C, dtype=torch.float64, requires_grad=True)
    out = []
    for ckpt in (False, True):
        mixer.grad_checkpointing = ckpt
        y, _ = mixer(blks, x)
        out.append((y, torch.autograd.grad(y.square().sum(), [x, *blks[1].parameters(), *mixer.gate])))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_hybrid_reads_its_rwkv_layers_with_bi_wkv():
    torch.manual_seed(0)
    cfg = DenoiserConfig(vocab_size=40, mask_id=39, latent_dim=8, arch="hybrid", mixer="bi_wkv",
                         mixer_options={"bi_wkv_gate_init": 0.5})
    model = build_denoiser(cfg, n_layer=4, n_embd=64, head_size=32)
    assert isinstance(model.mixer.bi, BiWKVMixer) and len(model.mixer.bi.gate) == 2
    assert float(model.mixer.bi.gate[0].detach()[0]) == 0.5
    out = model(torch.randint(0, 39, (2, 8)), torch.rand(2), torch.randn(2, 8))
    out.logits.sum().backward()
    assert model.mixer.bi.gate[1].grad is not None


def test_bi_wkv_refuses_what_it_cannot_do():
    blks = blocks(n_layer=1)
    with pytest.raises(ValueError, match="model.bi_wkv_shift='right'.*left, mean"):
        build_mixer("bi_wkv", blks, n_embd=C, bi_wkv_shift="right")
    with pytest.raises(ValueError, match="model.bi_wkv_gate_init"):
        build_mixer("bi_wkv", blks, n_embd=C, bi_wkv_gate_init="one")
    with pytest.raises(ValueError, match="no recurrent state"):
        BiWKVMixer(blks, C)(blks, torch.randn(1, 4, C, dtype=torch.float64), return_state=True)


def test_bi_wkv_options_are_validated_by_key_before_anything_is_built(tmp_path):
    base = ["experiment=struct", "model.mixer=bi_wkv", f"logging.save_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.bi_wkv_shift='both'.*left, mean"):
        Trainer(compose_config([*base, "model.bi_wkv_shift=both"]))
    with pytest.raises(ConfigError, match="model.mixer='bi_wkv'.*model.arch=transformer"):
        Trainer(compose_config([*base, "model.arch=transformer"]))
