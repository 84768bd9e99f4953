"""The chunked torch WKV-7 against the plain recurrence, forward and backward."""
import math

import pytest
import torch

from rwkv_diffusion_rnn.ops.wkv7 import wkv7, wkv7_torch


def make_inputs(B, T, H, K, V=None, dtype=torch.float64, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    V = V or K

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    r, k, v = rn(B, T, H, K), rn(B, T, H, K) * 0.5, rn(B, T, H, V)
    # RWKV-7's range: log decay in (-exp(-0.5), 0)
    w = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, K) * 2)
    kk = torch.nn.functional.normalize(rn(B, T, H, K), dim=-1)
    gate = torch.sigmoid(rn(B, T, H, K))
    a, b = -kk, kk * gate
    s0 = rn(B, H, K, V) * 0.5 if with_state else None
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)]
    return xs, (s0.to(torch.float32 if dtype != torch.float64 else dtype) if with_state else None)


@pytest.mark.parametrize("T", [1, 7, 32, 45, 100])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_forward_and_state_match_recurrent(T, dtype, tol):
    xs, s0 = make_inputs(2, T, 3, 16, V=8, dtype=dtype, seed=T)
    o1, S1 = wkv7(*xs, scale=0.7, initial_state=s0, output_final_state=True, backend="recurrent")
    o2, S2 = wkv7(*xs, scale=0.7, initial_state=s0, output_final_state=True, backend="torch")
    assert o2.dtype == dtype and o2.shape == (2, T, 3, 8) and S2.shape == (2, 3, 16, 8)
    assert (o1 - o2).abs().max() <= tol * o1.abs().max()
    assert (S1 - S2).abs().max() <= tol * S1.abs().max()


def _grads(xs, s0, backend, use_state=True, w_mult=1.0, **kw):
    inp = [x.clone().requires_grad_(True) for x in xs]
    st = s0.clone().requires_grad_(True)
    w = inp[1] * w_mult
    o, S = wkv7(inp[0], w, *inp[2:], initial_state=st, output_final_state=True, backend=backend,
                **kw)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    gS = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = (o * go).sum() + ((S * gS).sum() if use_state else 0)
    loss.backward()
    return [x.grad for x in inp] + [st.grad]


def _assert_grads_close(g_ref, g_test, tol):
    for name, g1, g2 in zip("r w k v a b initial_state".split(), g_ref, g_test):
        assert g1 is not None and g2 is not None, name
        assert torch.isfinite(g2).all(), name
        err = (g1 - g2).abs().max() / g1.abs().max().clamp_min(1e-30)
        assert err <= tol, f"grad of {name}: relative error {err:.2e}"


# T = 45 and 100: several chunks of the default size, the last one padded
@pytest.mark.parametrize("T", [1, 45, 100])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_gradients_of_every_input_match_recurrent(T, dtype, tol):
    xs, s0 = make_inputs(2, T, 2, 16, dtype=dtype, seed=3 + T)
    _assert_grads_close(_grads(xs, s0, "recurrent"), _grads(xs, s0, "torch"), tol)


def test_gradients_without_the_final_state_in_the_loss():
    xs, s0 = make_inputs(1, 70, 2, 8, seed=9)
    _assert_grads_close(_grads(xs, s0, "recurrent", use_state=False),
                        _grads(xs, s0, "torch", use_state=False), 1e-9)


def test_gradients_with_strong_decays_and_a_scale():
    # log decays down to -18 per token shrink the chunk; the scale multiplies r
    xs, s0 = make_inputs(1, 70, 2, 8, seed=4)
    _assert_grads_close(_grads(xs, s0, "recurrent", w_mult=30.0, scale=0.6),
                        _grads(xs, s0, "torch", w_mult=30.0, scale=0.6), 1e-8)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunk_size_does_not_change_result(chunk):
    xs, s0 = make_inputs(1, 50, 2, 8, seed=11)
    o_ref, S_ref = wkv7(*xs, initial_state=s0, output_final_state=True, backend="recurrent")
    o, S = wkv7_torch(*xs, initial_state=s0, output_final_state=True, chunk_size=chunk)
    assert torch.allclose(o, o_ref, atol=1e-10) and torch.allclose(S, S_ref, atol=1e-10)


def test_state_carry_equals_one_pass():
    xs, _ = make_inputs(2, 90, 2, 16, seed=5, with_state=False)
    o_full, S_full = wkv7(*xs, output_final_state=True, backend="torch")
    S, outs = None, []
    for lo, hi in ((0, 30), (30, 31), (31, 90)):
        o, S = wkv7(*(x[:, lo:hi] for x in xs), initial_state=S, output_final_state=True,
                    backend="torch")
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), o_full, atol=1e-10)
    assert torch.allclose(S, S_full, atol=1e-10)


def test_no_state_means_zero_state_and_final_state_optional():
    xs, _ = make_inputs(1, 10, 1, 8, seed=2, with_state=False)
    zero = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    o1, S1 = wkv7(*xs, backend="torch")
    o2, _ = wkv7(*xs, initial_state=zero, backend="torch")
    assert S1 is None and torch.allclose(o1, o2)


def test_auto_picks_torch_on_cpu_and_bad_arguments_are_named():
    xs, _ = make_inputs(1, 4, 1, 8, seed=1, with_state=False)
    o_auto, _ = wkv7(*xs, backend="auto")
    o_torch, _ = wkv7(*xs, backend="torch")
    assert torch.equal(o_auto, o_torch)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        wkv7(*xs, backend="cuda")
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(xs[0], xs[1], xs[2][:, :3], *xs[3:])
    with pytest.raises(ValueError, match="initial_state must be"):
        wkv7(*xs, initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        wkv7(*xs, backend="fla")


def test_strong_decays_stay_finite_and_exact():
    xs, s0 = make_inputs(1, 70, 2, 8, dtype=torch.float32, seed=4)
    xs[1] = xs[1] * 30  # log decays down to -18 per token
    o1, S1 = wkv7(*xs, initial_state=s0, output_final_state=True, backend="recurrent")
    o2, S2 = wkv7(*xs, initial_state=s0, output_final_state=True, backend="torch")
    assert torch.isfinite(o2).all()
    assert (o1 - o2).abs().max() <= 1e-4 * o1.abs().max()


@pytest.mark.parametrize("T, offset, every", [(20, 0, 4), (21, 3, 4), (17, 1, 1), (30, 2, 7), (9, 0, 16)])
@pytest.mark.parametrize("with_state", [True, False])
def test_the_states_at_block_starts_match_the_recurrence_run_piece_by_piece(T, offset, every, with_state):
    """``state_starts``: the torch backend reads them off its chunk boundaries; the reference runs
    the plain recurrence one piece at a time. Outputs, states and every gradient agree."""
    xs, s0 = make_inputs(2, T, 3, 8, V=6, seed=T + every, with_state=with_state)
    results = {}
    for backend in ("recurrent", "torch"):
        inp = [x.clone().requires_grad_(True) for x in xs]
        st = s0.clone().requires_grad_(True) if with_state else None
        o, starts = wkv7(*inp, scale=0.8, initial_state=st, backend=backend, state_starts=(offset, every))
        gen = torch.Generator().manual_seed(1)
        ((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
         + (starts * torch.randn(starts.shape, generator=gen, dtype=starts.dtype)).sum()).backward()
        results[backend] = (o, starts, [x.grad for x in inp] + ([st.grad] if with_state else []))
    (o1, s1, g1), (o2, s2, g2) = results["recurrent"], results["torch"]
    assert s2.shape == (len(range(offset, T, every)), 2, 3, 8, 6)
    assert torch.allclose(o1, o2, atol=1e-10) and torch.allclose(s1, s2, atol=1e-10)
    if not with_state and offset == 0:
        assert s2[0].abs().max() == 0                      # before the first token: the zero state
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-9)
    plain, _ = wkv7(*xs, scale=0.8, initial_state=s0, backend="torch")
    assert torch.allclose(plain, o2, atol=1e-10)
