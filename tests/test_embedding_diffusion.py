"""Embedding diffusion (``training.objective=embedding``): the loss against a hand computation,
rounding of clean embeddings, a tiny run that trains, resumes, evaluates and generates, and the
keys it refuses."""
import json
import math

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.diffusion.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.diffusion.embedding_diffusion import (EmbeddingDiffusionObjective, embedding_scores,
                                                              generate_embedding_text, round_to_tokens)
from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

from test_lm import corpus_file, overrides

VOCAB, MASK, C = 20, 19, 32


def result_dir(run_dir):
    from rwkv_diffusion_rnn.training.trained import checkpoint_dir
    return checkpoint_dir(run_dir)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    backbone = RWKV7(RWKV7Config(vocab_size=VOCAB, n_layer=1, n_embd=C, head_size=16))
    cfg = DenoiserConfig(vocab_size=VOCAB, mask_id=MASK, latent_prefix_len=0, mixer="bi", embedding_output=True)
    return MultimodalRWKVDenoiser(backbone, cfg)


def batch(seed=1, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0                                    # a padded row: its last two positions carry no loss
    return {"input_ids": ids, "attention_mask": mask}


def test_the_loss_at_auxiliary_weight_zero_is_the_plain_squared_error_by_hand():
    model, b = tiny_model(), batch()
    diff = GaussianDiffusion(target="x0")
    loss, stats = EmbeddingDiffusionObjective(diff, 0.0, mask_id=MASK)(model, b, torch.Generator().manual_seed(7))
    # the same draws by hand: s for the batch, then eps for every position and dimension
    g = torch.Generator().manual_seed(7)
    s = torch.rand(3, generator=g)
    eps = torch.randn(3, 5, C, generator=g)
    emb = model.backbone.embed(b["input_ids"]).detach()
    x0 = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    phi0, phi1 = math.asin(diff.min_noise_level), math.asin(diff.max_noise_level)
    phi = (phi0 + s * (phi1 - phi0)).view(3, 1, 1)
    xs = torch.cos(phi) * x0 + torch.sin(phi) * eps
    with torch.no_grad():
        x0_hat = model(None, s, input_embeds=xs).embedding
    total, n = 0.0, 0
    for r in range(3):
        for p in range(5):
            if b["attention_mask"][r, p]:
                total += float(((x0_hat[r, p] - x0[r, p]) ** 2).sum()) / C
                n += 1
    assert n == 13
    assert float(loss.detach()) == pytest.approx(total / n, rel=1e-5)
    assert stats["mse"] == pytest.approx(total / n, rel=1e-5) and stats["rounding_ce"] > 0
    loss.backward()                                   # the squared error alone reaches the head
    assert model.embedding_head.weight.grad is not None
    assert model.backbone.emb.weight.grad is None     # ... and never the table it is measured against


def test_the_auxiliary_ce_adds_its_weight_times_the_rounding_cross_entropy():
    model, b = tiny_model(), batch()
    diff = GaussianDiffusion(target="x0")
    plain, st0 = EmbeddingDiffusionObjective(diff, 0.0, MASK)(model, b, torch.Generator().manual_seed(3))
    mixed, st1 = EmbeddingDiffusionObjective(diff, 0.5, MASK)(model, b, torch.Generator().manual_seed(3))
    assert float(mixed.detach()) == pytest.approx(float(plain.detach()) + 0.5 * st1["rounding_ce"], rel=1e-5)
    assert st1["rounding_ce"] == pytest.approx(st0["rounding_ce"])     # the same draws, the same CE
    mixed.backward()
    assert model.backbone.emb.weight.grad is not None   # the CE trains the table (rounding term)


def test_rounding_returns_the_tokens_of_noise_free_embeddings():
    model = tiny_model()
    table = model.token_embeddings()
    ids = torch.arange(MASK).view(1, -1)               # every token but the mask
    assert torch.equal(round_to_tokens(table[ids], table, MASK), ids)
    assert torch.allclose(table.pow(2).mean(-1), torch.ones(VOCAB), atol=1e-4)   # unit rms rows


def test_scores_of_the_clean_embeddings_themselves_show_no_drift():
    model = tiny_model()

    class Oracle(torch.nn.Module):      # predicts the clean embeddings exactly
        config = model.config

        def token_embeddings(self):
            return model.token_embeddings()

        def forward(self, ids, s, input_embeds):
            return type("Out", (), {"embedding": self._x0})()

    oracle, b = Oracle(), batch()
    oracle._x0 = model.token_embeddings()[b["input_ids"]]
    scores = embedding_scores(EmbeddingDiffusionObjective(GaussianDiffusion(target="x0"), 0.0, MASK), oracle, [b],
                              torch.Generator().manual_seed(0))
    assert scores["embedding_mse"] == pytest.approx(0.0, abs=1e-8)
    assert scores["embedding_drift"] == pytest.approx(0.0, abs=1e-3)
    assert scores["rounding_acc"] == 1.0


def test_the_sampler_writes_token_ids_that_never_hold_the_mask():
    ids = generate_embedding_text(tiny_model(), GaussianDiffusion(target="x0"), length=6, batch_size=2, steps=3,
                                  generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 6) and int(ids.max()) < MASK and int(ids.min()) >= 0


def test_a_tiny_embedding_run_trains_resumes_evaluates_and_generates(tmp_path):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    corpus = corpus_file(tmp_path)
    args = ["training.objective=embedding", "training.auxiliary_ce_weight=0.1", "training.max_steps=6",
            "logging.eval_freq=3", "logging.log_freq=1"]
    metrics = run(compose_config(overrides(tmp_path / "full", corpus, *args)))
    for key in ("val_embedding_mse", "val_rounding_ce", "val_rounding_acc", "val_embedding_drift"):
        assert math.isfinite(metrics[key]), key
    part = overrides(tmp_path / "part", corpus, *args)
    run(compose_config([*part, "training.stop_at_step=3"]))
    run(compose_config([*part, "training.resume=latest"]))
    a, b = read_train_log(tmp_path / "full" / "run"), read_train_log(tmp_path / "part" / "run")
    assert len(a) == 6 and [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    result = evaluate(tmp_path / "full" / "run")
    assert "not a likelihood bound" in result["quantity"] and math.isfinite(result["rounding_ce"])
    saved = json.loads((result_dir(tmp_path / "full" / "run") / "eval.json").read_text())
    assert saved["rounding_ce"] == result["rounding_ce"]
    records = generate(tmp_path / "full" / "run", num_samples=2, steps=4, length=16, eos=False)
    assert len(records) == 2 and all(len(r["token_ids"]) == 16 and r["text"] for r in records)
    assert records[0]["settings"]["decoding"] == "embedding_diffusion"
    again = generate(tmp_path / "full" / "run", num_samples=2, steps=4, length=16, eos=False, batch_size=1)
    assert [r["text"] for r in again] == [r["text"] for r in records]   # each sample its own start noise


@pytest.mark.parametrize("extra, words", [
    (["training.objective=ar", "model.mixer=causal", "training.auxiliary_ce_weight=0.1"], "auxiliary_ce_weight"),
    (["training.objective=embedding", "model.mixer=causal"], "model.mixer"),
])
def test_keys_that_do_not_fit_the_objective_are_refused_by_name(tmp_path, extra, words):
    from rwkv_diffusion_rnn.training.config_validation import validate_config
    cfg = compose_config(overrides(tmp_path, corpus_file(tmp_path), *extra))
    with pytest.raises(ConfigError, match=words):
        validate_config(cfg)
