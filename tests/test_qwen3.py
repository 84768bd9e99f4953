"""Qwen3 as the denoiser's network (model.arch=qwen3), on tiny random Qwen3 checkpoints written with
save_pretrained: without a bias it equals Qwen3Model called with an all-visible mask (forward and
backward), the block-attention bias is the one of its definition and Qwen3Model agrees with it,
both sides are seen, refusals name the keys, and a run on text trains, evaluates with the bound,
resumes exactly and generates."""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

from rwkv_diffusion_rnn.models.qwen3 import Qwen3Mixer, block_attention_bias, load_qwen3
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.train_rwkv import compose_config
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.improved_trainer import Trainer

from test_lm import check_trains_bound_resumes_and_generates, corpus_file, overrides

V = 64


def save_tiny_qwen3(path, vocab_size=V, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True)      # as Qwen3-0.6B: its LM head is the embedding
    model = Qwen3Model(cfg)
    with torch.no_grad():   # post_init's N(0, 0.02) leaves attention nearly uniform: make it matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny")


def reference(path):
    return Qwen3Model.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")


def test_with_no_bias_the_mixer_equals_qwen3model_called_with_an_all_visible_mask(qwen_dir):
    backbone = load_qwen3(str(qwen_dir)).double()
    mixer = Qwen3Mixer(backbone.model.rotary_emb)
    ref = reference(qwen_dir)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    ours = backbone.ln_out(mixer(backbone.blocks, x)[0])
    theirs = ref(inputs_embeds=x, attention_mask=torch.zeros(2, 1, 9, 9, dtype=torch.float64)).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    causal = ref(inputs_embeds=x).last_hidden_state          # Qwen3's own causal default differs
    assert (causal[:, :-1] - theirs[:, :-1]).abs().max() > 1e-3
    g = torch.randn_like(ours)
    gx, gw = torch.autograd.grad((ours * g).sum(), (x, backbone.blocks[0].self_attn.q_proj.weight))
    rx, rw = torch.autograd.grad((theirs * g).sum(), (x, ref.layers[0].self_attn.q_proj.weight))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("tied", [True, False])
def test_with_its_own_head_the_qwen3_denoiser_at_t0_is_qwen3forcausallm_with_an_all_visible_mask(tmp_path, tied):
    """model.use_pretrained_head: the checkpoint's LM head (tied to the embedding or its own) is the
    text head, so at t = 0 with identity conditioning the logits on clean text are Qwen3ForCausalLM's."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=tied)
    lm = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    lm.save_pretrained(tmp_path / "lm")
    ref = Qwen3ForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float64, attn_implementation="sdpa")
    backbone = load_qwen3(str(tmp_path / "lm"), head=True)
    model = MultimodalRWKVDenoiser(backbone, DenoiserConfig(arch="qwen3", vocab_size=V, mask_id=V - 1,
                                                            latent_prefix_len=0, use_pretrained_head=True,
                                                            time_conditioning="film")).double()
    assert not hasattr(model, "text_head")
    assert (len([k for k in model.state_dict() if k.startswith("backbone.head")]) == 0) == tied
    ids = torch.randint(0, V - 1, (2, 10), generator=torch.Generator().manual_seed(2))
    ours = model(ids, torch.zeros(2, dtype=torch.float64)).logits
    theirs = ref(input_ids=ids, attention_mask=torch.zeros(2, 1, 10, 10, dtype=torch.float64)).logits
    torch.testing.assert_close(ours, theirs)
    # a checkpoint with neither an lm_head nor tied embeddings has no head to keep
    Qwen3Model(Qwen3Config(**{**cfg.to_dict(), "tie_word_embeddings": False})).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="holds no LM head .* set model.use_pretrained_head=false"):
        load_qwen3(str(tmp_path / "base"), head=True)


def test_the_former_head_key_still_sets_it_and_a_contradiction_is_refused():
    assert DenoiserConfig(vocab_size=V, mask_id=V - 1, use_rwkv_lm_head=True).use_pretrained_head is True
    with pytest.raises(ValueError, match="contradict"):
        DenoiserConfig(vocab_size=V, mask_id=V - 1, use_pretrained_head=True, use_rwkv_lm_head=False)
    with pytest.raises(ValueError, match="model.arch=transformer has none"):
        DenoiserConfig(arch="transformer", vocab_size=V, mask_id=V - 1, use_pretrained_head=True)


def test_the_block_attention_bias_shows_the_prompt_to_all_and_each_block_only_itself():
    bias = block_attention_bias(torch.tensor([2, 0]), 7, 2)
    assert bias.shape == (2, 1, 7, 7)
    for b, p in enumerate([2, 0]):
        for q in range(7):
            for k in range(7):
                if q < p:
                    visible = k < p
                else:
                    visible = k < p or (k >= p and (q - p) // 2 == (k - p) // 2)
                assert (bias[b, 0, q, k] == 0) == visible and (visible or bias[b, 0, q, k] == float("-inf"))


def test_qwen3model_with_the_same_bias_as_a_4d_mask_agrees(qwen_dir):
    backbone = load_qwen3(str(qwen_dir)).double()
    mixer = Qwen3Mixer(backbone.model.rotary_emb, block_attention=True, block_size=3)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    ours = backbone.ln_out(mixer(backbone.blocks, x, prefix_len=1)[0])
    bias = block_attention_bias(torch.tensor([1, 1]), 10, 3, torch.float64)
    torch.testing.assert_close(ours, reference(qwen_dir)(inputs_embeds=x, attention_mask=bias).last_hidden_state)
    with pytest.raises(ValueError, match=r"attention_bias must be \[B, 1, L, L\]"):
        mixer(backbone.blocks, x, attention_bias=bias[:, :, :5])


def denoiser(path, **kw):
    cfg = DenoiserConfig(**{"arch": "qwen3", "vocab_size": V, "mask_id": V - 1, "mixer": "bi", "latent_prefix_len": 0,
                            **kw})
    return MultimodalRWKVDenoiser(load_qwen3(str(path)), cfg).double()


def test_the_qwen3_denoiser_sees_both_sides_and_block_attention_cuts_it_to_blocks(qwen_dir):
    ids = torch.randint(0, V - 1, (1, 12))
    t = torch.full((1,), 0.5, dtype=torch.float64)
    later = ids.clone()
    later[0, 8] = (ids[0, 8] + 1) % (V - 1)
    earlier = ids.clone()
    earlier[0, 3] = (ids[0, 3] + 1) % (V - 1)
    full = denoiser(qwen_dir)
    base = full(ids, t).logits
    assert (full(later, t).logits[0, 3] - base[0, 3]).abs().max() > 1e-6     # reads ahead
    assert (full(earlier, t).logits[0, 8] - base[0, 8]).abs().max() > 1e-6   # and behind
    blocks = denoiser(qwen_dir, block_attention=True, block_size=4)
    base = blocks(ids, t).logits
    moved = (blocks(later, t).logits - base).abs().amax(-1)[0]              # block 2 is 8..11
    assert moved[:8].max() == 0 and moved[8:].max() > 1e-6


def test_adaln_zero_starts_every_qwen3_layer_as_the_identity(qwen_dir):
    model = denoiser(qwen_dir, time_conditioning="adaln_zero", adaln_identity_init=False)
    ids = torch.randint(0, V - 1, (2, 6))
    out = model(ids, torch.tensor([0.1, 0.7], dtype=torch.float64)).logits
    x = model.backbone.embed(ids) + model.type_emb.weight[1]
    torch.testing.assert_close(out, model.text_head(model.backbone.ln_out(x)))


def test_bad_qwen3_settings_are_refused_naming_the_keys(tmp_path, qwen_dir):
    corpus = corpus_file(tmp_path)
    base = overrides(tmp_path, corpus, "model.arch=qwen3")
    with pytest.raises(ConfigError, match="set model.qwen3_name"):
        Trainer(compose_config(base))
    with pytest.raises(ConfigError, match=r"model.qwen3_name=.*cannot read a model config there"):
        Trainer(compose_config([*base, f"model.qwen3_name={tmp_path / 'nothing'}"]))
    small = save_tiny_qwen3(tmp_path / "small", vocab_size=8)
    with pytest.raises(ConfigError, match=r"model.vocab_size=\d+, tokenizer.name=chars.*\(8 rows\)"):
        Trainer(compose_config([*base, f"model.qwen3_name={small}"]))
    LlamaModel(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="holds a 'llama' model"):
        Trainer(compose_config([*base, f"model.qwen3_name={tmp_path / 'llama'}"]))
    with pytest.raises(ConfigError, match="model.mixer='dw_jrt'.*model.arch=qwen3"):
        Trainer(compose_config([*base, f"model.qwen3_name={qwen_dir}", "model.mixer=dw_jrt"]))
    with pytest.raises(ConfigError, match="model.qwen3_name=.*model.arch=qwen3 only"):
        Trainer(compose_config(overrides(tmp_path, corpus, f"model.qwen3_name={qwen_dir}")))
    with pytest.raises(ConfigError, match="model.block_attention=true is an attention bias of model.arch=qwen3"):
        Trainer(compose_config(overrides(tmp_path, corpus, "model.block_attention=true")))


@pytest.mark.parametrize("block_attention", [False, True])
def test_a_qwen3_run_on_text_trains_evaluates_the_bound_resumes_exactly_and_generates(tmp_path, qwen_dir,
                                                                                      block_attention):
    check_trains_bound_resumes_and_generates(tmp_path, "model.arch=qwen3", f"model.qwen3_name={qwen_dir}",
                                             f"model.block_attention={block_attention}", "model.block_size=8",
                                             steps=6)


def sees(model, ids, t, **kw):
    """[B, T, T] bool: whether the logits at position i move when token k is changed."""
    base = model(ids, t, **kw).logits
    B, T = ids.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for k in range(T):
        changed = ids.clone()
        changed[:, k] = (ids[:, k] + 1) % (V - 1)
        out[:, :, k] = (model(changed, t, **kw).logits - base).abs().amax(-1) > 1e-9
    return out


def test_block_attention_shows_each_rows_prompt_to_every_position_and_counts_blocks_from_its_end(qwen_dir):
    """Who sees whom, enumerated: with prompts of 0, 3 and 6 tokens and blocks of 4, a position in
    the prompt sees the prompt, one after it sees the prompt and its own block, counted from the
    prompt's end (LLaDA's training-time block attention)."""
    model = denoiser(qwen_dir, block_attention=True, block_size=4, latent_prefix_len=1)
    ids = torch.randint(0, V - 1, (3, 11), generator=torch.Generator().manual_seed(3))
    prompts = torch.tensor([0, 3, 6])
    got = sees(model, ids, torch.full((3,), 0.5, dtype=torch.float64), prompt_lengths=prompts)
    for b, p in enumerate(prompts.tolist()):
        for i in range(11):
            for k in range(11):
                want = k < p if i < p else (k < p or (k >= p and (i - p) // 4 == (k - p) // 4))
                assert bool(got[b, i, k]) == want, (b, p, i, k)


def test_block_causal_shows_an_earlier_prompt_to_every_answer_position():
    """RWKV-7's block_causal (blocks of 4 from position 0, the cache's blocks): position i sees k
    exactly when k's block is not after i's, so a prompt, which comes first, is seen by every answer."""
    from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
    torch.manual_seed(0)
    model = MultimodalRWKVDenoiser(RWKV7(RWKV7Config(vocab_size=V, n_layer=2, n_embd=32, head_size=16)),
                                   DenoiserConfig(vocab_size=V, mask_id=V - 1, mixer="block_causal", block_size=4,
                                                  latent_prefix_len=1, bi_fusion="gated")).double()
    with torch.no_grad():           # RWKV-7 starts with zero output projections: make every part matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, V - 1, (2, 10), generator=torch.Generator().manual_seed(4))
    got = sees(model, ids, torch.full((2,), 0.5, dtype=torch.float64), prompt_lengths=torch.tensor([3, 6]))
    want = torch.tensor([[k // 4 <= i // 4 for k in range(10)] for i in range(10)])
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_sft_training_and_scoring_give_block_attention_the_prompts(qwen_dir):
    """The objective and the bound pass each conversation row's prompt length to the model: their
    values are those of the model called with them, and differ from the model without them."""
    from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
    from rwkv_diffusion_rnn.diffusion.elbo import masked_nelbo
    from rwkv_diffusion_rnn.diffusion.objective import DiffusionObjective
    from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserOutput
    from rwkv_diffusion_rnn.training import likelihood
    model = denoiser(qwen_dir, block_attention=True, block_size=4).float()
    ids = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(5))
    prompts = torch.tensor([5, 2])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_lengths": prompts}
    obj = DiffusionObjective(MaskedDiffusion(mask_id=V - 1, vocab_size=V, truncate_prob=0.0), None, sft=True)
    loss, _ = obj(model, batch, torch.Generator().manual_seed(0))
    nb = obj.noise(batch, torch.Generator().manual_seed(0))
    want, _ = obj.loss(DenoiserOutput(model(nb.xt, nb.t, prompt_lengths=prompts).logits, None, None), nb)
    hidden, _ = obj.loss(DenoiserOutput(model(nb.xt, nb.t).logits, None, None), nb)
    assert torch.allclose(loss, want) and not torch.allclose(loss, hidden)
    schedule = obj.text.schedule
    got = likelihood.score(model, [batch], objective="diffusion", schedule=schedule, mask_id=V - 1, vocab_size=V,
                           generator=torch.Generator().manual_seed(1))
    answers = torch.arange(12)[None, :] >= prompts[:, None]
    with torch.no_grad():
        nats = masked_nelbo(lambda xt, t: model(xt, t, prompt_lengths=prompts).logits, ids, schedule, V - 1,
                            torch.Generator().manual_seed(1), valid=answers)
    prior = likelihood.prior_nats(schedule, V - 1) * int(answers.sum())
    assert got.nats_per_token == pytest.approx((float(nats.sum()) + prior) / int(answers.sum()), rel=1e-5)
