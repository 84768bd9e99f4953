"""Our RWKV-7 against BlinkDL's own code (the `rwkv` package, strategy "cpu fp32")."""
import contextlib
import io

import pytest
import torch

from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, save_random_blinkdl_checkpoint

rwkv_model = pytest.importorskip("rwkv.model", reason="the `rwkv` reference package is not installed")

SHAPES = [  # n_layer, n_embd, head_size, vocab, decay/aaa/mv/gate LoRA ranks, layer-0 v params
    dict(n_layer=1, n_embd=64, head_size=32, vocab_size=100, include_layer0_v=False),
    dict(n_layer=2, n_embd=128, head_size=64, vocab_size=517, decay_lora=64, aaa_lora=32,
         mv_lora=16, gate_lora=48),
    dict(n_layer=3, n_embd=96, head_size=32, vocab_size=1000, decay_lora=16, aaa_lora=24,
         mv_lora=32, gate_lora=32, dim_ffn=200),
    dict(n_layer=4, n_embd=256, head_size=64, vocab_size=2048, decay_lora=32, aaa_lora=64,
         mv_lora=32, gate_lora=96, include_layer0_v=False),
]


def reference(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return rwkv_model.RWKV(model=str(path)[:-len(".pth")], strategy="cpu fp32")


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=range(len(SHAPES)), ids=lambda i: f"shape{i}")
def pair(request, tmp_path_factory):
    shape = SHAPES[request.param]
    path = save_random_blinkdl_checkpoint(tmp_path_factory.mktemp("ck") / "model.pth",
                                          seed=request.param, **shape)
    return shape, reference(path), load_rwkv7(path)


@pytest.mark.parametrize("T", [1, 2, 37, 300])
def test_logits_match_reference_at_every_position(pair, T):
    shape, ref, model = pair
    ids = torch.randint(0, shape["vocab_size"], (T,), generator=torch.Generator().manual_seed(T))
    ref_logits, _ = ref.forward(ids.tolist(), None, full_output=True)
    ref_logits = ref_logits.view(T, -1) if T > 1 else ref_logits.view(1, -1)
    with torch.no_grad():
        ours = model(ids.view(1, T))[0]
    assert ours.shape == (T, shape["vocab_size"])
    assert rel_err(ours, ref_logits) < 1e-4


def test_state_carried_over_three_calls_matches_reference(pair):
    shape, ref, model = pair
    ids = torch.randint(0, shape["vocab_size"], (300,), generator=torch.Generator().manual_seed(0))
    ref_logits, _ = ref.forward(ids.tolist(), None, full_output=True)
    state, outs = None, []
    with torch.no_grad():
        for c in range(3):
            logits, state = model(ids[c * 100:(c + 1) * 100].view(1, -1), state=state, return_state=True)
            outs.append(logits[0])
    assert rel_err(torch.cat(outs), ref_logits) < 1e-4


def test_token_by_token_generation_matches_reference(pair):
    shape, ref, model = pair
    ids = torch.randint(0, shape["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    ref_logits, _ = ref.forward(ids.tolist(), None, full_output=True)
    state, outs = None, []
    with torch.no_grad():
        for t in range(12):
            logits, state = model(ids[t:t + 1].view(1, 1), state=state, return_state=True)
            outs.append(logits[0])
    assert rel_err(torch.cat(outs), ref_logits) < 1e-4


def test_batch_rows_are_independent(pair):
    shape, _, model = pair
    ids = torch.randint(0, shape["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(ids)
        single = torch.cat([model(ids[i:i + 1]) for i in range(3)])
    assert rel_err(batched, single) < 1e-5
