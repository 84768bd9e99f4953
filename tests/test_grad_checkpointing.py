"""training.grad_checkpointing: every mixer and architecture gives the same loss and gradients
with each block recomputed in the backward as without, and the recomputation really happens
(each block runs twice per step); the trainer's key turns it on."""
import pytest
import torch

from rwkv_diffusion_rnn.models.hybrid import Hybrid, HybridConfig
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.transformer import Transformer, TransformerConfig

V = 20
CASES = [("rwkv7", "causal"), ("rwkv7", "bi"), ("rwkv7", "dw_jrt"), ("rwkv7", "block_causal"), ("rwkv7", "bi_wkv"), ("hybrid", "bi_wkv"),
         ("rwkv7", "block_causal/clean"), ("transformer", "bi"), ("hybrid", "bi"), ("qwen3", "bi")]


def build(arch, mixer, tmp_path, seed=0):
    torch.manual_seed(seed)
    if arch == "qwen3":
        from rwkv_diffusion_rnn.models.qwen3 import load_qwen3
        from test_qwen3 import save_tiny_qwen3
        backbone = load_qwen3(str(save_tiny_qwen3(tmp_path / "qwen3", vocab_size=V)))
    elif arch == "rwkv7":
        backbone = RWKV7(RWKV7Config(vocab_size=V, n_layer=2, n_embd=32, head_size=8, wkv_backend="torch"))
    elif arch == "transformer":
        backbone = Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_embd=32, n_head=4))
    else:
        backbone = Hybrid(HybridConfig(vocab_size=V, n_layer=3, n_embd=32, head_size=8, attn_layers=(1,),
                                       wkv_backend="torch"))
    mixer, _, context = mixer.partition("/")       # block_causal/clean: with the clean text as context
    cfg = DenoiserConfig(arch=arch, vocab_size=V, mask_id=V - 1, latent_dim=4, latent_prefix_len=1, mixer=mixer,
                         block_size=4, time_conditioning="adaln_zero", block_context=context or "noisy")
    model = MultimodalRWKVDenoiser(backbone, cfg).double()
    with torch.no_grad():  # AdaLN-Zero starts with identity gates: make every part matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def loss_and_grads(model, ids, t, z):
    model.zero_grad(set_to_none=True)
    out = model(ids, t, latent=z, context_ids=(ids + 1) % (V - 1))
    loss = out.logits.logsumexp(-1).mean() + out.latent.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,mixer", CASES)
def test_checkpointed_blocks_give_the_same_loss_and_gradients(arch, mixer, tmp_path):
    model = build(arch, mixer, tmp_path)
    ids = torch.randint(0, V - 1, (2, 8))
    t, z = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    loss, grads = loss_and_grads(model, ids, t, z)
    calls = []
    block = model.backbone.blocks[0]
    part = next(getattr(block, a) for a in ("att", "attn", "self_attn") if hasattr(block, a))
    part = getattr(part, "receptance", part)    # bi_wkv runs the time mix's pieces, not its forward
    part.register_forward_hook(lambda *a: calls.append(1))
    model.set_grad_checkpointing(True)
    loss_ck, grads_ck = loss_and_grads(model, ids, t, z)
    runs = len(calls)
    assert runs >= 2 and runs % 2 == 0          # forward, then again in the backward
    torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=0)
    assert grads_ck.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], rtol=1e-6, atol=1e-12, msg=n)
    calls.clear()
    with torch.no_grad():                        # no recomputation without a backward
        model(ids, t, latent=z, context_ids=(ids + 1) % (V - 1))
    assert len(calls) == runs // 2


def test_the_training_key_turns_it_on(tmp_path):
    from rwkv_diffusion_rnn.train_rwkv import compose_config
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training.improved_trainer import Trainer
    base = ["experiment=struct", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "data.eval_size=8", f"logging.save_dir={tmp_path}"]
    trainer = Trainer(compose_config([*base, "training.grad_checkpointing=true"]))
    assert trainer.model.mixer.grad_checkpointing
    with pytest.raises(ConfigError, match="training.grad_checkpointing='yes' must be true or false"):
        Trainer(compose_config([*base, "training.grad_checkpointing=yes"]))
