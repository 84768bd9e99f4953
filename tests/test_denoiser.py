"""MultimodalRWKVDenoiser: conditioning at init, what each mixer lets a position see, state
caching, and forward/backward of every mixer x conditioning x latent target."""
import itertools

import pytest
import torch

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser
from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, save_random_blinkdl_checkpoint

V, MASK, D = 40, 39, 8


def perturb(model, seed=0, std=0.05):
    """Random weights everywhere, so that no path is switched off by its zero initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(mixer="bi", tc="film", prefix=1, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_prefix_len=prefix,
                         mixer=mixer, time_conditioning=tc, block_size=4, **kw)
    return perturb(build_denoiser(cfg, n_layer=2, n_embd=64, head_size=32), seed)


def inputs(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, MASK, (B, T), generator=g), torch.rand(B, generator=g),
            torch.randn(B, D, generator=g), torch.rand(B, generator=g))


@pytest.mark.parametrize("tc", ["film", "adaln_zero"])
def test_conditioning_at_init_leaves_the_pretrained_backbone_unchanged(tmp_path, tc):
    backbone = load_rwkv7(save_random_blinkdl_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=64,
                                                         head_size=32, vocab_size=V))
    cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_prefix_len=0, mixer="causal",
                         time_conditioning=tc, adaln_identity_init=True, use_pretrained_head=True)
    model = MultimodalRWKVDenoiser(backbone, cfg)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = backbone(ids)
        out = model(ids, torch.rand(2)).logits
    assert torch.equal(out, ref)


def test_adaln_zero_dit_init_switches_every_block_off():
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_prefix_len=0,
                                          mixer="causal", time_conditioning="adaln_zero",
                                          adaln_identity_init=False), n_layer=2, n_embd=64)
    perturb(model.backbone)
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        h = model.backbone.embed(ids) + model.type_emb.weight[1]
        expect = model.text_head(model.backbone.ln_out(h))
        assert torch.allclose(model(ids, torch.rand(1)).logits, expect, atol=1e-6)


def influence(model, j, T=16):
    """Which positions' logits change when text token j changes."""
    ids, t, z, s = inputs(T=T)
    ids2 = ids.clone()
    ids2[:, j] = (ids2[:, j] + 1) % MASK
    with torch.no_grad():
        a, b = model(ids, t, z, s).logits, model(ids2, t, z, s).logits
    return set(torch.nonzero((a - b).abs().amax(dim=(0, 2)) > 1e-7).flatten().tolist())


@pytest.mark.parametrize("mixer", ["causal", "bi", "bi_wkv", "dw_jrt", "block_causal"])
def test_what_a_position_sees(mixer):
    changed = influence(tiny(mixer), j=10)
    left = {i for i in changed if i < 10}
    if mixer == "causal":
        assert left == set()
    elif mixer == "block_causal":  # block_size 4: token 10 is in block [8, 12)
        assert left == {8, 9}
    else:
        assert left == set(range(10))
    assert 10 in changed


def test_dw_jrt_layer_start_beyond_the_last_layer_is_causal():
    assert {i for i in influence(tiny("dw_jrt", dw_jrt_layer_start=5), j=10) if i < 10} == set()
    learnable = tiny("dw_jrt", dw_jrt_learnable_alpha=True)
    assert {i for i in influence(learnable, j=10) if i < 10} == set(range(10))


@pytest.mark.parametrize("prefix", [0, 2])
def test_block_causal_cached_state_equals_recomputing(prefix):
    model = tiny("block_causal", prefix=prefix)
    ids, t, z, s = inputs(T=16)
    with torch.no_grad():
        full = model(ids, t, z, s).logits
        out1 = model(ids[:, :8], t, z, s, return_state=True)
        out2 = model(ids[:, 8:12], t, z, s, state=out1.state, return_state=True)
        out3 = model(ids[:, 12:], t, z, s, state=out2.state)
    pieces = torch.cat([out1.logits, out2.logits, out3.logits], dim=1)
    assert torch.allclose(pieces, full, atol=1e-5)


@pytest.mark.parametrize("mixer", ["causal", "block_causal"])
def test_position_embedding_follows_a_carried_state(mixer):
    model = tiny(mixer, prefix=1, pos_emb_len=16)
    ids, t, z, s = inputs(T=16)
    with torch.no_grad():
        full = model(ids, t, z, s).logits
        a = model(ids[:, :8], t, z, s, return_state=True)
        b = model(ids[:, 8:], t, z, s, state=a.state, pos_offset=8)
        wrong = model(ids[:, 8:], t, z, s, state=a.state)          # positions 0..7 again
    assert torch.allclose(torch.cat([a.logits, b.logits], 1), full, atol=1e-5)
    assert not torch.allclose(wrong.logits, full[:, 8:], atol=1e-3)


def test_position_embedding_starts_at_zero_and_marks_each_position(tmp_path):
    path = save_random_blinkdl_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32,
                                          vocab_size=V)
    cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_prefix_len=0, mixer="causal",
                         time_conditioning="none", use_pretrained_head=True, pos_emb_len=12)
    backbone = load_rwkv7(path)
    model = MultimodalRWKVDenoiser(backbone, cfg)
    assert model.pos_emb.shape == (12, 64) and not model.pos_emb.any()
    ids = torch.randint(0, V, (2, 12))
    t = torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(ids, t).logits, backbone(ids))    # zero init: the backbone as is
        before = model(ids, t).logits
        model.pos_emb[5].normal_()
        after = model(ids, t).logits
    changed = (after - before).abs().amax(dim=(0, 2)) > 1e-4     # chunked WKV: rounding only
    assert changed.tolist() == [False] * 5 + [True] * 7          # causal: row 5 reaches 5.. only
    with pytest.raises(ValueError, match=r"text positions 4..15 exceed model.pos_emb_len=12"):
        model(ids[:, :12], t, pos_offset=4)
    with pytest.raises(ValueError, match="model.pos_emb_len=-1"):
        DenoiserConfig(pos_emb_len=-1)
    torch.manual_seed(0)
    random_init = MultimodalRWKVDenoiser(load_rwkv7(path), DenoiserConfig(
        vocab_size=V, mask_id=MASK, latent_prefix_len=0, pos_emb_len=12, pos_emb_init_std=0.3))
    assert abs(random_init.pos_emb.std().item() - 0.3) < 0.03


def test_causal_state_equals_recomputing():
    model = tiny("causal", prefix=1)
    ids, t, z, s = inputs(T=12)
    with torch.no_grad():
        full = model(ids, t, z, s).logits
        a = model(ids[:, :5], t, z, s, return_state=True)
        b = model(ids[:, 5:], t, z, s, state=a.state)
    assert torch.allclose(torch.cat([a.logits, b.logits], 1), full, atol=1e-5)


@pytest.mark.parametrize("mixer", ["bi", "bi_wkv", "dw_jrt"])
def test_mixers_without_time_state_refuse_a_cache(mixer):
    model = tiny(mixer)
    ids, t, z, s = inputs()
    with pytest.raises(ValueError, match=f"model.mixer={mixer}"):
        model(ids, t, z, s, return_state=True)


CASES = list(itertools.product(["causal", "bi", "bi_wkv", "dw_jrt", "block_causal"], ["film", "adaln_zero"],
                               ["eps", "x0", "v"]))


@pytest.fixture(scope="module")
def blinkdl_checkpoint(tmp_path_factory):
    return save_random_blinkdl_checkpoint(tmp_path_factory.mktemp("ck") / "m.pth", n_layer=2,
                                          n_embd=64, head_size=32, vocab_size=V)


@pytest.mark.parametrize("backbone", ["scratch", "blinkdl"])
@pytest.mark.parametrize("mixer,tc,target", CASES)
def test_forward_backward_every_combination(mixer, tc, target, backbone, blinkdl_checkpoint):
    if backbone == "scratch":
        model = tiny(mixer, tc, prefix=2, latent_target=target)
    else:  # pretrained weights from a BlinkDL-layout .pth through load_rwkv7
        cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_prefix_len=2,
                             mixer=mixer, time_conditioning=tc, block_size=4, latent_target=target)
        model = perturb(build_denoiser(cfg, rwkv_name=str(blinkdl_checkpoint)))
    ids, t, z, s = inputs()
    out = model(ids, t, z, s)
    assert out.logits.shape == (2, 16, V) and out.latent.shape == (2, D)
    (out.logits.square().mean() + out.latent.square().mean()).backward()
    unused = {"null_latent", "backbone.head.weight"}  # no dropped rows; a fresh text head
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.latent_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mixer,fusion,share", [("bi", "sum", False), ("bi", "concat", True),
                                                ("bi", "gated", False), ("block_causal", "gated", True)])
def test_fusions_and_separate_backward_weights_on_a_pretrained_backbone(tmp_path, mixer, fusion, share):
    path = save_random_blinkdl_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32,
                                          vocab_size=V)
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, mixer=mixer,
                                          bi_fusion=fusion, bi_share_weights=share, block_size=4,
                                          time_conditioning="adaln_zero"), rwkv_name=str(path))
    if not share:  # the backward copy starts from the same pretrained weights
        for a, b in zip(model.backbone.blocks.parameters(), model.mixer.backward_blocks.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    ids, t, z, s = inputs()
    out = model(ids, t, z, s)
    (out.logits.mean() + out.latent.mean()).backward()
    assert model.backbone.blocks[1].att.w1.grad.abs().sum() > 0


def test_freeze_backbone_trains_only_the_new_parts(tmp_path):
    path = save_random_blinkdl_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=64, head_size=32,
                                          vocab_size=V)
    model = build_denoiser(DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D,
                                          freeze_backbone=True), rwkv_name=str(path))
    ids, t, z, s = inputs()
    out = model(ids, t, z, s)
    (out.logits.mean() + out.latent.mean()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.text_head.weight.grad is not None and model.latent_proj[0].weight.grad is not None
    model.set_backbone_trainable(True)
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_null_latent_and_latent_drop():
    model = tiny("bi", prefix=1)
    ids, t, z, s = inputs()
    with torch.no_grad():
        uncond = model(ids, t, None, s).logits
        dropped = model(ids, t, z, s, latent_drop=torch.tensor([True, False])).logits
        cond = model(ids, t, z, s).logits
    assert torch.allclose(dropped[0], uncond[0], atol=1e-6)
    assert torch.allclose(dropped[1], cond[1], atol=1e-6)
    assert not torch.allclose(cond[0], uncond[0], atol=1e-4)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="model.mixer='sideways'"):
        DenoiserConfig(mixer="sideways")
    with pytest.raises(ValueError, match="model.time_conditioning"):
        DenoiserConfig(time_conditioning="cross_attn")
    with pytest.raises(ValueError, match="bi_fusion='max'"):
        tiny("bi", bi_fusion="max")
    model = tiny("bi")
    ids, t, _, s = inputs()
    with pytest.raises(ValueError, match="model.latent_dim"):
        model(ids, t, torch.randn(2, D + 1), s)
    backbone = RWKV7(RWKV7Config(vocab_size=V, n_layer=1, n_embd=64, head_size=32))
    with pytest.raises(ValueError, match="use_pretrained_head"):
        MultimodalRWKVDenoiser(backbone, DenoiserConfig(vocab_size=V - 1, mask_id=3, use_pretrained_head=True))


def test_a_mixer_refuses_options_it_does_not_take():
    from rwkv_diffusion_rnn.models.mixers import build_mixer, mixer_options
    assert mixer_options("causal") == ()
    assert mixer_options("bi") == ("n_embd", "bi_fusion", "bi_share_weights", "bi_anneal_steps")
    backbone = RWKV7(RWKV7Config(vocab_size=V, n_layer=1, n_embd=64, head_size=32))
    with pytest.raises(TypeError, match="model.mixer=causal takes \\[\\], not \\['block_size'\\]"):
        build_mixer("causal", backbone.blocks, block_size=4)


@pytest.mark.parametrize("latent_in_cond", [False, True])
def test_latent_in_cond_conditions_a_continuation_call_on_the_latent(latent_in_cond):
    """A continuation call reads no prefix: its latent argument matters only through the
    conditioning vector, i.e. with latent_in_cond."""
    model = tiny("causal", "film", latent_in_cond=latent_in_cond)
    ids, t, z, s = inputs()
    with torch.no_grad():
        state = model(ids[:, :8], t, z, s, return_state=True).state
        a = model(ids[:, 8:], t, z, s, state=state).logits
        b = model(ids[:, 8:], t, z + 1.0, s, state=state).logits
    assert (not torch.equal(a, b)) == latent_in_cond
    if latent_in_cond:
        assert (a - b).abs().amax(-1).min() > 0        # every position moved


def test_latent_in_cond_needs_a_latent_and_a_conditioning_path():
    with pytest.raises(ValueError, match="latent_in_cond"):
        DenoiserConfig(latent_in_cond=True, time_conditioning="none")
    with pytest.raises(ValueError, match="latent_in_cond"):
        DenoiserConfig(latent_in_cond=True, latent_prefix_len=0)
