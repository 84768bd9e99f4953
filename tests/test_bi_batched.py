"""The ``bi`` mixer's one-call form (both directions as a batch of 2B rows) and the RWKV-7
block's fused element-wise ops, each against the plain computation in float64, forward and
backward."""
import pytest
import torch

from rwkv_diffusion_rnn.models.mixers.base import Modulation, run_block
from rwkv_diffusion_rnn.models.mixers.bi import BiMixer
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config, relu_square, shift_mix

C = 64


def blocks(seed=0, n_layer=3):
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=16, n_layer=n_layer, n_embd=C, head_size=32,
                              wkv_backend="torch")).double()
    with torch.no_grad():  # random weights everywhere, so no path is off by its zero init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.blocks


def modulations(n, B, gates, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return (torch.randn(B, 1, C, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    return [Modulation(rnd(), rnd(), rnd() if gates else None, rnd(), rnd(), rnd() if gates else None)
            for _ in range(n)]


def two_scans(mixer, blks, x, mods):
    """The plain computation: a forward scan, a scan of the flipped sequence, fused."""
    vf_f = vf_b = None
    for i, block in enumerate(blks):
        y_f, vf_f, _ = run_block(block, x, vf_f, mods[i])
        y_b, vf_b, _ = run_block(block, x.flip(1), vf_b, mods[i])
        x = mixer.fusion[i](x, y_f, y_b.flip(1))
    return x


@pytest.mark.parametrize("fusion,gates", [("sum", False), ("concat", True), ("gated", False)])
def test_the_batched_bi_mixer_equals_two_separate_scans_forward_and_backward(fusion, gates):
    blks = blocks()
    mixer = BiMixer(blks, C, bi_fusion=fusion).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B, T = 2, 37                     # two chunks of the WKV, the second one padded
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    mods = modulations(len(blks), B, gates)
    w = torch.randn(B, T, C, dtype=torch.float64)
    leaves = [x] + [t for m in mods for t in vars(m).values() if t is not None] + list(blks.parameters()) \
        + list(mixer.parameters())

    out, state = mixer(blks, x, mods)
    got = torch.autograd.grad((out * w).sum(), leaves, materialize_grads=True)
    ref = two_scans(mixer, blks, x, mods)
    want = torch.autograd.grad((ref * w).sum(), leaves, materialize_grads=True)
    assert state is None
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)


def test_the_batched_bi_layer_chains_its_v_first_and_takes_no_modulation():
    blks = blocks(seed=2, n_layer=2)
    mixer = BiMixer(blks, C).double()
    x = torch.randn(1, 9, C, dtype=torch.float64)
    y, v_first = x, None
    for i, block in enumerate(blks):
        y, v_first = mixer.layer(i, block, y, v_first)
    torch.testing.assert_close(y, two_scans(mixer, blks, x, [None, None]), rtol=1e-10, atol=1e-12)


def test_the_separate_weights_bi_mixer_reads_backwards_with_its_own_blocks():
    blks = blocks(seed=3, n_layer=2)
    mixer = BiMixer(blks, C, bi_share_weights=False).double()
    with torch.no_grad():
        for p in mixer.backward_blocks.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 11, C, dtype=torch.float64)
    vf_f = vf_b = None
    ref = x
    for i, block in enumerate(blks):
        y_f, vf_f, _ = run_block(block, ref, vf_f)
        y_b, vf_b, _ = run_block(mixer.backward_blocks[i], ref.flip(1), vf_b)
        ref = (y_f + y_b.flip(1)) / 2
    torch.testing.assert_close(mixer(blks, x)[0], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_prev", [False, True])
def test_the_fused_token_shift_mixes_match_autograd_of_the_plain_lerps(with_prev):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True) if with_prev else None
    mus = [torch.rand(1, 1, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def plain(x, prev, *mus):
        p = torch.zeros_like(x[:, 0]) if prev is None else prev
        xx = torch.cat([p.unsqueeze(1), x[:, :-1]], dim=1) - x
        return tuple(x + xx * mu for mu in mus)

    inputs = [x] + ([prev] if with_prev else []) + mus
    fused = (lambda x, *r: shift_mix(x, *r)) if with_prev else (lambda x, *mus: shift_mix(x, None, *mus))
    ref = (lambda x, *r: plain(x, *r)) if with_prev else (lambda x, *mus: plain(x, None, *mus))
    for a, b in zip(fused(*inputs), ref(*inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(fused, inputs)
    # only some outputs used: the others' gradients are None inside the backward
    outs = fused(*inputs)
    got = torch.autograd.grad(outs[1].sum(), inputs, materialize_grads=True)
    want = torch.autograd.grad(ref(*inputs)[1].sum(), inputs, materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_relu_square_matches_autograd_of_the_plain_formula():
    k = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(relu_square(k), torch.relu(k) ** 2, rtol=0, atol=0)
    assert torch.autograd.gradcheck(relu_square, (k,))
    with torch.no_grad():
        torch.testing.assert_close(relu_square(k), torch.relu(k) ** 2, rtol=0, atol=0)


def test_long_inputs_keep_two_calls_with_the_same_result_and_v_first_converts_between_forms(monkeypatch):
    import rwkv_diffusion_rnn.models.mixers.bi as bi
    blks = blocks(seed=5)
    mixer = BiMixer(blks, C).double()
    x = torch.randn(2, 13, C, dtype=torch.float64)
    mods = modulations(len(blks), 2, gates=True)
    batched = mixer(blks, x, mods)[0]
    monkeypatch.setattr(bi, "BATCH_BOTH_MAX_TOKENS", 0)
    two_calls = mixer(blks, x, mods)[0]
    torch.testing.assert_close(two_calls, batched, rtol=1e-10, atol=1e-12)
    # a caller whose inputs cross the limit between layers: v_first changes form
    y, v_first = x, None
    for i, block in enumerate(blks):
        monkeypatch.setattr(bi, "BATCH_BOTH_MAX_TOKENS", 0 if i % 2 else 10**9)
        y, v_first = mixer.layer(i, block, y, v_first, mods[i])
    torch.testing.assert_close(y, batched, rtol=1e-10, atol=1e-12)
