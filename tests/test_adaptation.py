"""Adapting a pretrained left-to-right RWKV-7 into a bidirectional denoiser: with bidirectional
annealing the bi model starts as exactly the pretrained causal LM and reads right to left more as
training goes; with shifted logits its head keeps predicting the next token, through training,
the bound, SFT and the block cache; the backbone unfreezes at the epoch asked."""
import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.diffusion import sampling
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7, save_random_blinkdl_checkpoint

V = 80


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_random_blinkdl_checkpoint(tmp_path_factory.mktemp("pre") / "lm.pth", n_layer=2, n_embd=32,
                                          head_size=16, vocab_size=V, seed=4)


@pytest.mark.parametrize("fusion, share", [("sum", True), ("gated", True), ("sum", False)])
def test_at_step_0_the_annealed_bi_model_is_the_pretrained_causal_lm(pretrained, fusion, share):
    lm = load_rwkv7(pretrained)
    cfg = DenoiserConfig(vocab_size=V, mask_id=V - 1, latent_prefix_len=0, mixer="bi", bi_fusion=fusion,
                         bi_share_weights=share, bi_anneal_steps=10, use_pretrained_head=True,
                         time_conditioning="film")
    model = MultimodalRWKVDenoiser(load_rwkv7(pretrained), cfg).eval()
    ids = torch.randint(0, V - 1, (2, 24), generator=torch.Generator().manual_seed(0))
    t = torch.rand(2)
    with torch.no_grad():
        want = lm(ids)
        model.set_training_step(0)
        assert torch.allclose(model(ids, t).logits, want, atol=1e-5, rtol=1e-5)
        model.set_training_step(5)
        half = model(ids, t).logits
        model.set_training_step(10)
        full = model(ids, t).logits
    assert not torch.allclose(full, want, atol=1e-3)          # the right-to-left reading now counts
    assert not torch.allclose(half, full, atol=1e-4)


@pytest.mark.parametrize("mixer", ["bi", "block_causal"])
def test_at_step_0_a_shifted_annealed_model_on_the_exported_backbone_is_the_pretrained_ar_model(tmp_path, mixer):
    """bi / block_causal + bi_anneal_steps + shift_logits + the backbone's own head, on an AR run's
    BlinkDL export: at its first step the logits of token i are the AR model's after tokens < i (BOS
    first); once annealed, the right-to-left reading changes them."""
    from rwkv_diffusion_rnn.export import export
    from rwkv_diffusion_rnn.training.trained import load_trained
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 100)
    run(compose_config(["experiment=shakespeare_char", "training.objective=ar", "model.mixer=causal",
                        f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
                        "tokenizer.name=bytes", "model.n_layer=2", "model.n_embd=32", "model.head_size=16",
                        "training.train_batch_size=4", "training.max_steps=3", "logging.eval_freq=0",
                        "eval.max_batches=1", "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'ar'}"]))
    ar = load_trained(tmp_path / "ar").model.eval()
    pth = export(tmp_path / "ar", "blinkdl", tmp_path / "lm.pth")
    bos = 256                                                    # bytes: end of text
    cfg = DenoiserConfig(vocab_size=258, mask_id=257, latent_prefix_len=0, mixer=mixer, bi_fusion="gated",
                         bi_anneal_steps=10, shift_logits=True, bos_id=bos, use_pretrained_head=True, block_size=4)
    model = MultimodalRWKVDenoiser(load_rwkv7(pth), cfg).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.rand(2)
    with torch.no_grad():
        want = ar(torch.cat([torch.full((2, 1), bos), ids], 1), torch.zeros(2)).logits[:, :16]
        model.set_training_step(0)
        got = model(ids, t).logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        model.set_training_step(10)
        assert not torch.allclose(model(ids, t).logits, want, atol=1e-3)


@pytest.mark.parametrize("block", [1, 4])
def test_the_state_cache_of_a_shifted_block_model_decodes_as_the_whole_canvas_does(pretrained, block):
    cfg = DenoiserConfig(vocab_size=V, mask_id=V - 1, latent_dim=4, latent_prefix_len=1, mixer="block_causal",
                         block_size=block, bi_fusion="gated", shift_logits=True, bos_id=0, use_pretrained_head=True,
                         time_conditioning="none")
    torch.manual_seed(1)
    model = MultimodalRWKVDenoiser(load_rwkv7(pretrained), cfg).eval()
    latent = torch.randn(2, 4)
    prompt = torch.full((2, 22), V - 1)
    prompt[:, :3] = torch.tensor([5, 6, 7])
    out = {}
    for cache in (True, False):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out[cache] = sampling.generate_text(model, latent=latent, prompt_ids=prompt, steps=22, block_length=4,
                                            temperature=1.0, cfg_scale=1.5, use_cache=cache, generator=gens)
    assert torch.equal(out[True], out[False])
    assert (out[True] != V - 1).all() and torch.equal(out[True][:, :3], prompt[:, :3])


def test_a_shifted_model_reads_the_token_before_and_says_what_a_call_lacks(pretrained):
    cfg = DenoiserConfig(vocab_size=V, mask_id=V - 1, latent_prefix_len=0, mixer="block_causal", block_size=1,
                         bi_anneal_steps=5, shift_logits=True, bos_id=0, use_pretrained_head=True)
    model = MultimodalRWKVDenoiser(load_rwkv7(pretrained), cfg).eval()
    ids = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(2))
    t = torch.zeros(2)
    with torch.no_grad():
        whole = model(ids, t).logits
        # in two calls through the state: the second reads the token before its first
        first = model(ids[:, :8], t, return_state=True)
        rest = model(ids[:, 8:], t, state=first.state, prev_ids=ids[:, 7])
        assert torch.allclose(torch.cat([first.logits, rest.logits], 1), whole, atol=1e-5)
        # at block 1 before annealing, token i's logits depend on no token >= i
        changed = ids.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % (V - 1)
        assert torch.allclose(model(changed, t).logits[:, :7], whole[:, :7], atol=1e-6)
        with pytest.raises(ValueError, match="pass prev_ids"):
            model(ids[:, 8:], t, state=first.state)
    plain = MultimodalRWKVDenoiser(load_rwkv7(pretrained), DenoiserConfig(vocab_size=V, mask_id=V - 1,
                                   latent_prefix_len=0, mixer="block_causal"))
    with pytest.raises(ValueError, match="shift_logits=true model only"):
        plain(ids, t, prev_ids=ids[:, 0])
    with pytest.raises(ValueError, match="model.mixer=causal already predicts the next token"):
        DenoiserConfig(vocab_size=V, mask_id=V - 1, mixer="causal", shift_logits=True, bos_id=0)
    with pytest.raises(ValueError, match="model.bos_id"):
        DenoiserConfig(vocab_size=V, mask_id=V - 1, shift_logits=True, bos_id=V)


def test_a_shifted_run_reads_the_tokenizers_end_of_text_trains_scores_and_generates(tmp_path):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.config_validation import validate_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 100)
    base = ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "tokenizer.name=bytes", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "model.mixer=block_causal", "model.block_size=4", "model.shift_logits=true",
            "training.train_batch_size=4", "training.max_steps=2", "logging.eval_freq=0", "eval.max_batches=1",
            "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"shorter than data.seq_len=16 \+ 1 \(model.shift_logits reads one more"):
        validate_config(compose_config([*base, "model.pos_emb_len=16"]))
    metrics = run(compose_config(base))
    assert metrics["val_nelbo"] > 0
    last = ckpt.latest_checkpoint(tmp_path / "run")
    import yaml
    assert yaml.safe_load((last / ckpt.CONFIG_FILE).read_text())["model"]["bos_id"] == 256
    scores = evaluate(tmp_path / "run", ["eval.max_batches=1", "logging.progress_bar=false"])
    assert scores["nats_per_token"] > 0
    texts = generate(tmp_path / "run", prompt="the ", length=12, num_samples=2, steps=8, block_length=4,
                     progress_bar=False, print_texts=False, eos=False)
    assert all(r["text"].startswith("the ") and len(r["token_ids"]) == 12 for r in texts)


def test_annealing_follows_the_step_through_training_resume_and_checkpoints(tmp_path, pretrained):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 200)
    base = ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "tokenizer.name=bytes", f"model.rwkv_name={pretrained}", "model.use_pretrained_head=true",
            "model.bi_anneal_steps=4", "training.train_batch_size=4", "training.max_steps=6", "optimizer.warmup_steps=1",
            "logging.eval_freq=0", "logging.log_freq=1", "eval.max_batches=1", "logging.progress_bar=false",
            "logging.save_every=2", "logging.keep_last=null"]
    with pytest.raises(ConfigError, match="the vocabulary .* does not fit the embedding of model.rwkv_name"):
        run(compose_config([*base, f"logging.save_dir={tmp_path / 'x'}"]))     # bytes: 258 ids, the file 80
    big = save_random_blinkdl_checkpoint(tmp_path / "lm258.pth", n_layer=1, n_embd=32, head_size=16, vocab_size=258)
    base = [*base, f"model.rwkv_name={big}"]
    run(compose_config([*base, f"logging.save_dir={tmp_path / 'full'}"]))
    from safetensors import safe_open
    for step in (2, 4, 6):
        with safe_open(str(tmp_path / "full" / f"step_{step:07d}" / ckpt.MODEL_FILE), "pt") as f:
            assert float(f.get_tensor("mixer.anneal")) == pytest.approx(min(1.0, step / 4))
    run(compose_config([*base, "training.stop_at_step=2", f"logging.save_dir={tmp_path / 'part'}"]))
    run(compose_config([*base, "training.resume=latest", f"logging.save_dir={tmp_path / 'part'}"]))
    assert [r["loss"] for r in read_train_log(tmp_path / "part")] == [r["loss"] for r in read_train_log(tmp_path / "full")]


def test_the_backbone_unfreezes_at_the_epoch_asked(tmp_path, pretrained):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 30)
    big = save_random_blinkdl_checkpoint(tmp_path / "lm258.pth", n_layer=1, n_embd=32, head_size=16, vocab_size=258)
    cfg = compose_config(["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                          "data.seq_len=16", "tokenizer.name=bytes", f"model.rwkv_name={big}",
                          "model.freeze_backbone=true", "training.unfreeze_backbone_at_epoch=1",
                          "training.train_batch_size=4", "training.max_steps=null", "training.num_epochs=2",
                          "optimizer.warmup_steps=1", "logging.eval_freq=0", "logging.log_freq=1",
                          "eval.max_batches=1", "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}"])
    from rwkv_diffusion_rnn.training.improved_trainer import Trainer
    trainer = Trainer(cfg)
    emb0 = trainer.model.backbone.emb.weight.detach().clone()
    seen = []

    class Watch:
        def on_record(self, tr, record):
            seen.append((record["epoch"], bool(tr.model.backbone.emb.weight.requires_grad),
                         not torch.equal(tr.model.backbone.emb.weight, emb0)))

        def __getattr__(self, name):
            return lambda *a, **k: None
    trainer.callbacks.append(Watch())
    trainer.train()
    epochs = {e for e, _, _ in seen}
    assert epochs == {0, 1}
    assert all(not trainable and not moved for e, trainable, moved in seen if e == 0)
    assert all(trainable and moved for e, trainable, moved in seen if e == 1)


def test_a_checkpoint_saved_before_a_model_key_existed_still_loads(tmp_path):
    """A saved config without a model key added later (here bi_anneal_steps) builds its model with
    that key's default: the model it was trained as."""
    import yaml
    from rwkv_diffusion_rnn.training.trained import load_trained
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 100)
    run(compose_config(["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                        "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
                        "training.train_batch_size=4", "training.max_steps=1", "logging.eval_freq=0",
                        "eval.max_batches=1", "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}"]))
    last = ckpt.latest_checkpoint(tmp_path / "run")
    cfg = yaml.safe_load((last / ckpt.CONFIG_FILE).read_text())
    del cfg["model"]["bi_anneal_steps"]
    import hashlib, json
    (last / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    man = json.loads((last / ckpt.MANIFEST).read_text())
    data = (last / ckpt.CONFIG_FILE).read_bytes()
    man["files"][ckpt.CONFIG_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (last / ckpt.MANIFEST).write_text(json.dumps(man, indent=2))
    assert load_trained(last).model.config.bi_anneal_steps == 0


def test_the_adaptation_preset_starts_as_the_pretrained_ar_model_and_trains(tmp_path):
    """model=rwkv7_adapt: at step 0 its logits on clean text are the pretrained LM's after BOS; a
    short run of it trains and is scored."""
    from rwkv_diffusion_rnn.training.improved_trainer import Trainer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 100)
    pth = save_random_blinkdl_checkpoint(tmp_path / "lm258.pth", n_layer=2, n_embd=32, head_size=16, vocab_size=258,
                                         seed=5)
    cfg = compose_config(["model=rwkv7_adapt", f"model.rwkv_name={pth}", "model.latent_prefix_len=0",
                          "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
                          "tokenizer.name=bytes", "training.train_batch_size=4", "training.max_steps=2",
                          "training.num_epochs=null", "logging.eval_freq=0", "eval.max_batches=1",
                          "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    model = trainer.model.eval()
    assert (model.config.mixer, model.config.block_context, model.config.shift_logits) == ("block_causal", "clean", True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_rwkv7(pth)(torch.cat([torch.full((2, 1), 256), ids], 1))[:, :16]
        assert torch.allclose(model(ids, torch.rand(2)).logits, want, atol=1e-5, rtol=1e-5)
    model.train()
    assert trainer.train()["val_nelbo"] > 0
