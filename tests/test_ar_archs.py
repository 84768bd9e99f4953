"""An AR baseline for every architecture (training.objective=ar, model.mixer=causal): causal
attention for the transformer, RWKV-7 left to right with causal attention for the hybrid, Qwen3's
own causal mask for qwen3. Each reads no later token (enumerated), trains and is scored by its
exact NLL, and generates token by token (attention by recomputing the prefix); a pretrained
Qwen3 read causally with its own head is Qwen3ForCausalLM."""
import pytest
import torch

from rwkv_diffusion_rnn.models.hybrid import Hybrid, HybridConfig
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.models.transformer import Transformer, TransformerConfig
from rwkv_diffusion_rnn.train_rwkv import compose_config, run

from test_lm import corpus_file, overrides

V = 30


def causal_model(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "transformer":
        backbone = Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_embd=32, n_head=4))
    elif arch == "hybrid":
        backbone = Hybrid(HybridConfig(vocab_size=V, n_layer=3, n_embd=32, head_size=16, attn_layers=(1,)))
    else:
        from rwkv_diffusion_rnn.models.qwen3 import load_qwen3
        from test_qwen3 import save_tiny_qwen3
        backbone = load_qwen3(str(save_tiny_qwen3(tmp_path / "q3", vocab_size=V)))
    model = MultimodalRWKVDenoiser(backbone, DenoiserConfig(arch=arch, vocab_size=V, mask_id=V - 1, mixer="causal",
                                                            latent_prefix_len=0)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["transformer", "hybrid", "qwen3"])
def test_the_causal_reading_of_every_arch_sees_no_later_token(arch, tmp_path):
    model = causal_model(arch, tmp_path)
    assert model.mixer.autoregressive and not model.mixer.carries_state
    ids = torch.randint(0, V - 1, (2, 9), generator=torch.Generator().manual_seed(1))
    t = torch.zeros(2, dtype=torch.float64)
    base = model(ids, t).logits
    for k in range(9):
        changed = ids.clone()
        changed[:, k] = (ids[:, k] + 1) % (V - 1)
        moved = (model(changed, t).logits - base).abs().amax(-1) > 1e-9        # [2, 9]
        assert not moved[:, :k].any() and moved[:, k:].any(), k


def test_a_pretrained_qwen3_read_causally_with_its_head_is_qwen3forcausallm(tmp_path):
    from transformers import Qwen3ForCausalLM
    from rwkv_diffusion_rnn.models.qwen3 import load_qwen3
    from test_qwen3 import save_tiny_qwen3
    path = save_tiny_qwen3(tmp_path / "q3", vocab_size=V)
    model = MultimodalRWKVDenoiser(load_qwen3(str(path), head=True),
                                   DenoiserConfig(arch="qwen3", vocab_size=V, mask_id=V - 1, mixer="causal",
                                                  latent_prefix_len=0, use_pretrained_head=True)).double()
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    ids = torch.randint(0, V - 1, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids, torch.zeros(2, dtype=torch.float64)).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("arch", [["model.arch=transformer"], ["model.arch=hybrid", "model.n_layer=2"]])
def test_every_arch_trains_as_an_ar_baseline_scores_its_nll_and_writes_token_by_token(tmp_path, arch):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.training.trained import load_trained
    from rwkv_diffusion_rnn.diffusion.sampling import generate_autoregressive
    corpus = corpus_file(tmp_path)
    metrics = run(compose_config(overrides(tmp_path, corpus, "training.objective=ar", "model.mixer=causal", *arch,
                                           "training.max_steps=6", "logging.eval_freq=3")))
    assert metrics["val_nll"] > 0
    assert evaluate(tmp_path / "run", ["logging.progress_bar=false"])["nats_per_token"] == \
        pytest.approx(metrics["val_nll"], rel=1e-6)
    recs = generate(tmp_path / "run", prompt="the", length=12, num_samples=2, eos=False, progress_bar=False,
                    print_texts=False)
    assert all(r["text"].startswith("the") and len(r["token_ids"]) == 12 for r in recs)
    # greedy decoding by recomputation: every written token is the argmax after the ones before it
    trained = load_trained(tmp_path / "run")
    model, bos = trained.model, trained.tokenizer.eos_id
    x = generate_autoregressive(model, bos_id=bos, length=8, batch_size=1, temperature=0.0)
    with torch.no_grad():
        logits = model(torch.cat([torch.tensor([[bos]]), x[:, :-1]], 1), torch.zeros(1)).logits
    mask = model.config.mask_id
    logits[..., mask] = float("-inf")
    assert torch.equal(logits.argmax(-1), x)
