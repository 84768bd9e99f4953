"""fla's Triton kernel against the torch backend on a CUDA GPU (skipped, with the reason, elsewhere).

Output, final state and the gradients of r, w, k, v, a, b and the initial state, with the final
state in the loss; for fla's default settings and for the fast ones of its RWKV-7 layer
(``fast=True``: safe_gate, lower_bound=-exp(-0.5), chunk_size=64; ``wkv7`` picks them for
16-bit inputs). tests/test_fla_interpret.py checks the same on CPU under Triton's interpreter.
"""
import importlib.util

import pytest
import torch

from rwkv_diffusion_rnn.ops.wkv7 import wkv7, wkv7_fla
from test_wkv7 import make_inputs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: fla kernels need a GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed: fla kernels need it"),
]

# fp32: the kernel accumulates in fp32 like the torch backend; bf16 inputs round every operand.
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}
NAMES = "o final_state r w k v a b initial_state".split()


def _run(backend, xs, s0, dtype, fast):
    inp = [x.to(dtype).clone().requires_grad_(True) for x in xs]
    st = s0.clone().requires_grad_(True)
    if backend == "fla":
        o, S = wkv7_fla(*inp, initial_state=st, output_final_state=True, fast=fast)
    else:
        o, S = wkv7(*inp, initial_state=st, output_final_state=True, backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(5)
    go = torch.randn(o.shape, generator=gen, device="cuda")
    gS = torch.randn(S.shape, generator=gen, device="cuda")
    ((o.float() * go).sum() + (S.float() * gS).sum()).backward()
    return [o.float(), S.float()] + [x.grad.float() for x in inp] + [st.grad.float()]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 100, 1024])
def test_fla_matches_torch_forward_and_backward(dtype, T, fast):
    xs, s0 = make_inputs(2, T, 4, 64, dtype=torch.float32, seed=T)
    xs = [x.cuda() for x in xs]
    s0 = s0.cuda()
    ref = _run("torch", xs, s0, dtype, fast)
    got = _run("fla", xs, s0, dtype, fast)
    tol = TOL[dtype]
    for i, (name, a, b) in enumerate(zip(NAMES, ref, got)):
        assert torch.isfinite(b).all(), name
        err = (a - b).abs().max() / a.abs().max()
        assert err <= (tol if i < 2 else 4 * tol), f"{name}: relative error {err:.2e}"
