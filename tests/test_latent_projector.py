"""A latent learned with the model (model.latent_projector): the projector and its decoder get
gradients through the training loss, the reconstruction term is what it says (and absent at
weight 0), encoded latents are whitened over the data (the EMA copy with the model's
statistics), and a tiny run trains, resumes exactly, evaluates and generates from a vector of
the data's size."""
import math

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.diffusion.continuous_diffusion import GaussianDiffusion
from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
from rwkv_diffusion_rnn.diffusion.objective import DiffusionObjective, ObjectiveConfig
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.run_folder import read_train_log
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

V, MASK, D, DIN, SEQ = 20, 19, 4, 12, 10


def model_and_batch(kind="linear", target="eps"):
    torch.manual_seed(0)
    cfg = DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_target=target, mixer="bi",
                         latent_projector=kind, latent_input_dim=DIN)
    model = build_denoiser(cfg, n_layer=1, n_embd=32, head_size=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():       # no path switched off by zero init (a fresh latent head reads nothing)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    batch = {"input_ids": torch.randint(0, MASK, (6, SEQ), generator=g),
             "attention_mask": torch.ones(6, SEQ, dtype=torch.long),
             "latent": torch.randn(6, DIN, generator=g)}
    return model, batch


def objective(weight, target="eps"):
    return DiffusionObjective(MaskedDiffusion(mask_id=MASK, vocab_size=V), GaussianDiffusion(target=target),
                              ObjectiveConfig(latent_recon_weight=weight), projected_dim=D)


@pytest.mark.parametrize("kind,target", [("linear", "eps"), ("mlp", "x0")])
def test_the_projector_and_its_decoder_get_gradients_from_the_training_loss(kind, target):
    model, batch = model_and_batch(kind, target)
    loss, stats = objective(1.0, target)(model, batch, torch.Generator().manual_seed(2))
    loss.backward()
    for name, p in model.latent_projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert stats["latent_rows"] > 0 and math.isfinite(stats["latent_recon"])


def test_the_reconstruction_term_is_the_share_of_each_vector_lost_and_absent_at_weight_0():
    model, batch = model_and_batch()
    on, st_on = objective(0.5)(model, batch, torch.Generator().manual_seed(3))
    off, st_off = objective(0.0)(model, batch, torch.Generator().manual_seed(3))
    e = batch["latent"]
    with torch.no_grad():
        back = model.latent_projector.decode(model.clean_latent(e))
    by_hand = float(((back - e) ** 2).sum(1).div((e ** 2).sum(1)).mean())
    assert st_on["latent_recon"] == pytest.approx(by_hand, rel=1e-5)
    assert float((on - off).detach()) == pytest.approx(0.5 * by_hand, rel=1e-4)
    off.backward()          # weight 0: the decoder is in no term; the encoder learns from the denoising losses
    assert model.latent_projector.dec.weight.grad is None
    assert model.latent_projector.enc.weight.grad.abs().sum() > 0


def test_encoded_latents_are_whitened_over_the_data_even_when_the_inputs_gather_at_one_point():
    model, batch = model_and_batch("linear")
    g = torch.Generator().manual_seed(5)
    # inputs all within a few degrees of one direction: a latent scaled per row would be too
    x = 100.0 * torch.randn(1, DIN, generator=g) + torch.randn(64, DIN, generator=g)
    model.train()
    z = model.clean_latent(x).detach()
    assert z.shape == (64, D)
    assert torch.allclose(z.mean(0), torch.zeros(D), atol=1e-2)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(D), atol=1e-2)
    unit = torch.nn.functional.normalize(z, dim=1)
    cos = (unit @ unit.T).fill_diagonal_(0).sum() / (64 * 63)
    assert abs(float(cos)) < 0.1          # spread over directions (inputs' mean cosine: above 0.99)
    assert float(torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1).mean()) > 0.99
    one = model.clean_latent(x[:1])                     # a training batch of one row: the running statistics
    assert one.shape == (1, D) and torch.isfinite(one).all()
    model.eval()                                         # evaluation: the running statistics, row by row
    assert torch.allclose(model.clean_latent(x[:3])[1], model.clean_latent(x[1:2])[0], atol=1e-5)


def test_the_ema_copy_whitens_with_the_statistics_the_model_gathered():
    from rwkv_diffusion_rnn.training.ema import EMA
    model, batch = model_and_batch("linear")
    ema = EMA(model, 0.999)
    model.train()
    model.clean_latent(batch["latent"] * 3.0 + 5.0)        # running statistics move
    ema.update(model)
    got, want = ema.module.latent_projector.whiten, model.latent_projector.whiten
    assert not torch.allclose(want.running_mean, torch.zeros(D))
    assert torch.equal(got.running_mean, want.running_mean) and torch.equal(got.running_var, want.running_var)


def test_a_projector_needs_its_input_size():
    with pytest.raises(ValueError, match="latent_input_dim"):
        DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_projector="linear")
    with pytest.raises(ValueError, match="no projector"):
        DenoiserConfig(vocab_size=V, mask_id=MASK, latent_dim=D, latent_input_dim=DIN)


def _data(root):
    from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_save_npz
    rng = np.random.default_rng(0)
    for i in range(24):
        ids = rng.integers(1, 200, size=SEQ).astype(np.int32)
        atomic_save_npz(root / "tokens" / f"{i:08d}.npz", input_ids=ids, attention_mask=np.ones(SEQ, np.uint8))
        atomic_save_npy(root / "latents" / f"{i:08d}.npy", rng.standard_normal(DIN).astype(np.float32))


def _args(root, save, *extra):
    return ["model=scratch", "tokenizer.name=BlinkDL/rwkv7-g1", f"model.latent_dim={D}", "model.n_layer=1",
            "model.n_embd=32", "model.head_size=16", "model.latent_projector=mlp", f"model.latent_input_dim={DIN}",
            "training.latent_recon_weight=1.0", "data.json_path=null", f"data.token_dir={root / 'tokens'}",
            f"data.latent_dir={root / 'latents'}", "data.val_fraction=0.25", f"data.seq_len={SEQ}",
            "training.train_batch_size=6", "training.num_epochs=null", "training.max_steps=4",
            "optimizer.warmup_steps=1", "logging.eval_freq=0", "logging.log_freq=1", "logging.save_epochs=false",
            "logging.progress_bar=false", f"logging.save_dir={save}", *extra]


def test_a_tiny_learned_projection_run_trains_resumes_evaluates_and_generates(tmp_path):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    _data(tmp_path)
    run(compose_config(_args(tmp_path, tmp_path / "full")))
    run(compose_config(_args(tmp_path, tmp_path / "part", "training.stop_at_step=2")))
    run(compose_config(_args(tmp_path, tmp_path / "part", "training.resume=latest")))
    a, b = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "part")
    assert len(a) == 4 and [r["loss"] for r in a] == [r["loss"] for r in b]
    result = evaluate(tmp_path / "full", ["eval.max_batches=1", "eval.latent_steps=3"])
    assert math.isfinite(result["nats_per_token"]) and math.isfinite(result["null_latent"]["nats_per_token"])
    np.save(tmp_path / "e.npy", np.random.default_rng(5).standard_normal((2, DIN)).astype(np.float32))
    recs = generate(tmp_path / "full", latent=str(tmp_path / "e.npy"), length=SEQ, steps=3,
                    progress_bar=False, print_texts=False)
    assert len(recs) == 2 and all(r["token_ids"] for r in recs)
    joint = generate(tmp_path / "full", mode="joint", num_samples=2, length=SEQ, steps=3, progress_bar=False,
                     print_texts=False)
    assert all(len(r["latent"]) == D for r in joint)


def test_latent_files_of_another_size_than_the_projector_reads_are_refused(tmp_path):
    _data(tmp_path)
    with pytest.raises(ConfigError, match=f"model.latent_input_dim={DIN + 1}.*{DIN}-dim"):
        run(compose_config(_args(tmp_path, tmp_path / "bad", f"model.latent_input_dim={DIN + 1}")))
