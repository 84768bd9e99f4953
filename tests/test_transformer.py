"""The transformer denoiser (model.arch=transformer): attention against a plain softmax reference,
rotary positions, both sides seen, AdaLN-Zero starting as the identity, and a run that trains,
evaluates with the bound, resumes exactly and generates."""
import math

import pytest
import torch

from rwkv_diffusion_rnn.models.mixers.base import Modulation
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.transformer import (SelfAttention, Transformer, TransformerConfig,
                                                   apply_rotary, rotary, run_attention_block)
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.improved_trainer import Trainer, read_train_log
from rwkv_diffusion_rnn.train_rwkv import compose_config, run

V = 20


def tiny(time_conditioning="film", identity_init=False, latent_prefix_len=0, seed=0):
    torch.manual_seed(seed)
    backbone = Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_embd=32, n_head=4))
    cfg = DenoiserConfig(arch="transformer", vocab_size=V, mask_id=V - 1, latent_dim=4,
                         latent_prefix_len=latent_prefix_len, time_conditioning=time_conditioning,
                         adaln_identity_init=identity_init, mixer="bi")
    return MultimodalRWKVDenoiser(backbone, cfg).double()


def reference_attention(att: SelfAttention, x, cos, sin):
    """softmax(q k^T / sqrt(d)) v written out, with the rotary angles applied by hand."""
    B, T, C = x.shape
    H = att.n_head
    D = C // H
    q, k, v = (att.qkv(x).view(B, T, 3, H, D)[:, :, i].transpose(1, 2) for i in range(3))

    def rot(z):  # pair channel i with channel i + D/2, angle pos * base^(-2i/D)
        out = torch.empty_like(z)
        for i in range(D // 2):
            a, b = z[..., i], z[..., i + D // 2]
            out[..., i] = a * cos[:, i] - b * sin[:, i]
            out[..., i + D // 2] = a * sin[:, i] + b * cos[:, i]
        return out
    q, k = rot(q), rot(k)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
    return att.proj((w @ v).transpose(1, 2).reshape(B, T, C))


def test_attention_matches_a_written_out_softmax_forward_and_backward():
    torch.manual_seed(0)
    att = SelfAttention(TransformerConfig(vocab_size=V, n_embd=32, n_head=4)).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary(7, 8, 10000.0, x.device, x.dtype)
    y = att(x, cos, sin)
    ref = reference_attention(att, x, cos, sin)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, att.qkv.weight))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, att.qkv.weight))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = rotary(12, 16, 10000.0, "cpu", torch.float64)

    def score(i, j):
        return float(apply_rotary(q.view(1, 1, 1, 16), cos[i], sin[i]).flatten()
                     @ apply_rotary(k.view(1, 1, 1, 16), cos[j], sin[j]).flatten())
    assert score(5, 2) == pytest.approx(score(9, 6)) == pytest.approx(score(3, 0))
    assert score(5, 2) != pytest.approx(score(5, 3))


def test_the_transformer_denoiser_sees_both_sides():
    model = tiny()
    ids = torch.randint(0, V - 1, (1, 12))
    t = torch.full((1,), 0.5, dtype=torch.float64)
    base = model(ids, t).logits
    later = ids.clone()
    later[0, 8] = (ids[0, 8] + 1) % (V - 1)
    earlier = ids.clone()
    earlier[0, 3] = (ids[0, 3] + 1) % (V - 1)
    assert (model(later, t).logits[0, 3] - base[0, 3]).abs().max() > 1e-6     # reads ahead
    assert (model(earlier, t).logits[0, 8] - base[0, 8]).abs().max() > 1e-6   # and behind


def test_adaln_zero_starts_every_block_as_the_identity_and_its_gates_learn():
    model = tiny(time_conditioning="adaln_zero", identity_init=False, latent_prefix_len=1)
    ids = torch.randint(0, V - 1, (2, 9))
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    z = torch.randn(2, 4, dtype=torch.float64)
    out = model(ids, t, latent=z)
    x = torch.cat([model.embed_prefix(z, 2), model.backbone.embed(ids) + model.type_emb.weight[1]], dim=1)
    want = model.text_head(model.backbone.ln_out(x[:, 1:]))    # no block changed its input
    torch.testing.assert_close(out.logits, want)
    out.logits.square().sum().backward()
    gate_grads = [p.grad for n, p in model.cond.named_parameters() if p.grad is not None]
    assert gate_grads and any(g.abs().max() > 0 for g in gate_grads)


def test_a_modulated_block_applies_shift_scale_and_gate_as_the_rwkv_blocks_do():
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=V, n_layer=1, n_embd=16, n_head=2)
    block = Transformer(cfg).double().blocks[0]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    cos, sin = rotary(5, 8, 10000.0, "cpu", torch.float64)
    m = [torch.randn(2, 1, 16, dtype=torch.float64) for _ in range(6)]
    got = run_attention_block(block, x, cos, sin, Modulation(*m))
    h = block.attn(block.ln1(x) * (1 + m[1]) + m[0], cos, sin)
    y = x + m[2] * h
    want = y + m[5] * block.mlp(block.ln2(y) * (1 + m[4]) + m[3])
    torch.testing.assert_close(got, want)
    plain = run_attention_block(block, x, cos, sin)
    y = x + block.attn(block.ln1(x), cos, sin)
    torch.testing.assert_close(plain, y + block.mlp(block.ln2(y)))


def test_combinations_only_rwkv_supports_are_refused_by_key(tmp_path):
    base = ["experiment=struct", "model.arch=transformer", f"logging.save_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.mixer='dw_jrt'.*model.mixer=bi"):
        Trainer(compose_config([*base, "model.mixer=dw_jrt"]))
    with pytest.raises(ConfigError, match="model.arch='attention'.*rwkv7, transformer"):
        Trainer(compose_config([*base, "model.arch=attention"]))
    with pytest.raises(ConfigError, match="model.rwkv_name"):
        Trainer(compose_config(["model.arch=transformer", "model.rwkv_name=BlinkDL/rwkv7-g1",
                                f"logging.save_dir={tmp_path}"]))


TINY = ["experiment=struct", "model.arch=transformer", "model.n_layer=2", "model.n_embd=32",
        "model.head_size=8", "training.train_batch_size=8", "data.eval_size=8", "eval.sample_steps=4",
        "logging.progress_bar=false", "logging.log_freq=1", "logging.eval_freq=0", "optimizer.warmup_steps=2"]


def test_a_transformer_run_trains_resumes_exactly_and_generates(tmp_path):
    from rwkv_diffusion_rnn.generate import generate
    common = [*TINY, "training.max_steps=8"]
    metrics = run(compose_config([*common, f"logging.save_dir={tmp_path / 'full'}"]))
    assert "struct_acc" in metrics
    run(compose_config([*common, "training.stop_at_step=4", f"logging.save_dir={tmp_path / 'part'}"]))
    run(compose_config([*common, "training.resume=latest", f"logging.save_dir={tmp_path / 'part'}"]))
    full, part = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "part")
    assert [r["loss"] for r in part] == [r["loss"] for r in full] and len(full) == 8
    records = generate(tmp_path / "full", num_samples=2, steps=4)
    assert len(records) == 2 and all(len(r["token_ids"]) > 0 for r in records)
