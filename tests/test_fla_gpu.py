"""fla's Triton kernel against the torch backend on a CUDA GPU (skipped, with the reason, elsewhere)."""
import importlib.util

import pytest
import torch

from rwkv_diffusion_rnn.ops.wkv7 import wkv7
from test_wkv7 import make_inputs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: fla kernels need a GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed: fla kernels need it"),
]

# fp32: the kernel accumulates in fp32 like the torch backend; bf16 inputs round every operand.
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 100, 1024])
def test_fla_matches_torch_forward_and_backward(dtype, T):
    xs, s0 = make_inputs(2, T, 4, 64, dtype=torch.float32, seed=T)
    xs = [x.cuda() for x in xs]
    s0 = s0.cuda()
    res = {}
    for backend in ("torch", "fla"):
        inp = [x.to(dtype).clone().requires_grad_(True) for x in xs]
        o, S = wkv7(*inp, initial_state=s0.clone(), output_final_state=True, backend=backend)
        o.float().pow(2).sum().backward()
        res[backend] = (o.float(), S.float(), [x.grad.float() for x in inp])
    tol = TOL[dtype]
    (o1, S1, g1), (o2, S2, g2) = res["torch"], res["fla"]
    assert (o1 - o2).abs().max() <= tol * o1.abs().max()
    assert (S1 - S2).abs().max() <= tol * S1.abs().max()
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 4 * tol * a.abs().max()
