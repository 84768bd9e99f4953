"""The hybrid denoiser (model.arch=hybrid): RWKV-7 blocks with attention blocks at chosen layers.
Layer placement from either key, the RWKV layers computing exactly what an RWKV-7 of those blocks
computes, the attention blocks run once on the fused stream, refusals by key, and a run on text
that trains, evaluates with the bound, resumes exactly and generates."""
import pytest
import torch

from rwkv_diffusion_rnn.models.hybrid import Hybrid, HybridConfig, attention_layers, is_attention
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.transformer import rotary, run_attention_block
from rwkv_diffusion_rnn.train_rwkv import compose_config
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.improved_trainer import Trainer

from test_lm import check_trains_bound_resumes_and_generates, corpus_file, overrides

V = 20


def denoiser(backbone, arch, **kw):
    cfg = DenoiserConfig(arch=arch, vocab_size=V, mask_id=V - 1, latent_dim=4, mixer="bi", **kw)
    return MultimodalRWKVDenoiser(backbone, cfg).double()


def hybrid(n_layer=4, attn_layers=(1, 3), seed=0, **kw):
    torch.manual_seed(seed)
    return Hybrid(HybridConfig(vocab_size=V, n_layer=n_layer, n_embd=32, head_size=8, attn_layers=attn_layers,
                               wkv_backend="torch", **kw))


def test_attention_layers_come_from_a_list_or_a_period_and_bad_values_are_refused():
    assert attention_layers(6, attn_every=2) == (1, 3, 5)
    assert attention_layers(6, attn_every=3) == (2, 5)
    assert attention_layers(4, attn_layers=[3, 1, 1]) == (1, 3)
    assert attention_layers(4) == (1, 3)             # neither key: every second layer
    with pytest.raises(ValueError, match="exactly one of model.attn_layers"):
        attention_layers(4, [1], 2)
    with pytest.raises(ValueError, match=r"names layers \[4\] outside 0..3"):
        attention_layers(4, attn_layers=[1, 4])
    with pytest.raises(ValueError, match="model.arch=transformer"):
        attention_layers(2, attn_every=1)


def test_blocks_sit_where_asked_and_the_rwkv_blocks_are_numbered_among_themselves():
    net = hybrid(n_layer=5, attn_layers=(0, 3))
    kinds = ["attn" if is_attention(b) else b.layer_id for b in net.blocks]
    assert kinds == ["attn", 0, 1, "attn", 2]
    assert hasattr(net.blocks[1], "ln0") and not hasattr(net.blocks[1].att, "v0")
    assert hasattr(net.blocks[2].att, "v0")  # the later RWKV blocks mix towards v_first
    # the embedding norm is the first RWKV block's, wherever the first attention block sits
    ids = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(net.embed(ids), net.blocks[1].ln0(net.emb(ids)))


def test_a_hybrid_has_about_the_parameters_of_an_rwkv7_of_the_same_depth():
    # at the shakespeare preset's width; at tiny widths RWKV-7's LoRAs (at least 32 wide) dominate
    h = sum(p.numel() for p in Hybrid(HybridConfig(vocab_size=V, n_layer=4, n_embd=128, head_size=32,
                                                   attn_layers=(1, 3))).parameters())
    r = sum(p.numel() for p in RWKV7(RWKV7Config(vocab_size=V, n_layer=4, n_embd=128, head_size=32)).parameters())
    assert 0.9 < h / r < 1.0


def _silence_attention(net):
    """Zero the residual projections of every attention block: each becomes the identity."""
    with torch.no_grad():
        for b in net.blocks:
            if is_attention(b):
                b.attn.proj.weight.zero_()
                b.mlp.proj.weight.zero_()
                b.mlp.proj.bias.zero_()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("fusion", ["sum", "gated"])
def test_with_identity_attention_blocks_a_hybrid_equals_an_rwkv7_of_its_rwkv_blocks(share, fusion):
    net = hybrid(n_layer=5, attn_layers=(0, 2))
    _silence_attention(net)
    torch.manual_seed(1)
    plain = RWKV7(RWKV7Config(vocab_size=V, n_layer=3, n_embd=32, head_size=8, wkv_backend="torch"))
    plain.blocks.load_state_dict(torch.nn.ModuleList(b for b in net.blocks if not is_attention(b)).state_dict())
    plain.emb.load_state_dict(net.emb.state_dict())
    plain.ln_out.load_state_dict(net.ln_out.state_dict())
    kw = dict(bi_fusion=fusion, bi_share_weights=share, time_conditioning="adaln_zero", latent_prefix_len=1,
              adaln_identity_init=True)
    a, b = denoiser(net, "hybrid", **kw), denoiser(plain, "rwkv7", **kw)
    with torch.no_grad():  # make every layer's parts differ, so that a mix-up of indices would show
        for p in a.mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in a.cond.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # the same heads, conditioning and prefix; the RWKV layers' conditioning is that of their layer
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith(("backbone.", "cond.", "mixer."))},
                      strict=False)
    for j, i in enumerate([1, 3, 4]):
        b.cond[j].load_state_dict(a.cond[i].state_dict())
        b.mixer.fusion[j].load_state_dict(a.mixer.bi.fusion[j].state_dict())
        if not share:
            b.mixer.backward_blocks[j].load_state_dict(a.mixer.bi.backward_blocks[j].state_dict())
    ids = torch.randint(0, V - 1, (2, 9))
    t, z = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    out_a, out_b = a(ids, t, latent=z), b(ids, t, latent=z)
    torch.testing.assert_close(out_a.logits, out_b.logits)
    torch.testing.assert_close(out_a.latent, out_b.latent)
    ga = torch.autograd.grad(out_a.logits.square().sum(), a.backbone.blocks[1].att.receptance.weight)[0]
    gb = torch.autograd.grad(out_b.logits.square().sum(), b.backbone.blocks[0].att.receptance.weight)[0]
    torch.testing.assert_close(ga, gb)


def test_each_attention_block_runs_once_on_the_fused_stream_of_the_layers_before_it():
    net = hybrid(n_layer=3, attn_layers=(1,))
    model = denoiser(net, "hybrid", time_conditioning="none", latent_prefix_len=0)
    ids = torch.randint(0, V - 1, (2, 7))
    t = torch.full((2,), 0.5, dtype=torch.float64)
    got = model(ids, t).logits
    x = net.embed(ids).double() + model.type_emb.weight[1]
    x, vf = model.mixer.bi.layer(0, net.blocks[0], x)
    cos, sin = rotary(7, 8, 10000.0, "cpu", torch.float64)
    x = run_attention_block(net.blocks[1], x, cos, sin)
    x, _ = model.mixer.bi.layer(1, net.blocks[2], x, vf)
    torch.testing.assert_close(got, model.text_head(net.ln_out(x)))
    calls = []
    net.blocks[1].attn.register_forward_hook(lambda *a: calls.append(1))
    model(ids, t)
    assert calls == [1]


def test_separate_backward_weights_copy_only_the_rwkv_blocks():
    shared = denoiser(hybrid(), "hybrid", bi_share_weights=True)
    sep = denoiser(hybrid(), "hybrid", bi_share_weights=False)
    rwkv = sum(p.numel() for b in shared.backbone.blocks if not is_attention(b) for p in b.parameters())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(sep) - n(shared) == rwkv


def test_hybrid_combinations_that_cannot_work_are_refused_by_key(tmp_path):
    corpus = corpus_file(tmp_path)
    base = overrides(tmp_path, corpus, "model.arch=hybrid", "model.n_layer=2")
    with pytest.raises(ConfigError, match="exactly one of model.attn_layers"):
        Trainer(compose_config([*base, "model.attn_layers=[1]", "model.attn_every=2"]))
    with pytest.raises(ConfigError, match="model.mixer='block_causal'.*model.mixer=bi"):
        Trainer(compose_config([*base, "model.attn_every=2", "model.mixer=block_causal"]))
    with pytest.raises(ConfigError, match=r"model.attn_layers=\[0, 5\] names layers \[5\]"):
        Trainer(compose_config([*base, "model.attn_layers=[0,5]"]))
    with pytest.raises(ConfigError, match="model.attn_layers / model.attn_every.*model.arch=rwkv7"):
        Trainer(compose_config(overrides(tmp_path, corpus, "model.attn_every=2")))
    with pytest.raises(ConfigError, match="model.rwkv_name"):
        Trainer(compose_config(["model.arch=hybrid", "model.attn_every=2", f"logging.save_dir={tmp_path}"]))


def test_a_hybrid_run_on_text_trains_evaluates_the_bound_resumes_exactly_and_generates(tmp_path):
    check_trains_bound_resumes_and_generates(tmp_path, "model.arch=hybrid", "model.n_layer=2",
                                             "model.attn_layers=[1]")
