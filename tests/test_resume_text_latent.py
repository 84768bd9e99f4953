"""Exact resume on the text + latent data path (.npz tokens + .npy latents), and a clear refusal
to resume from a damaged checkpoint."""

import numpy as np
import pytest

from rwkv_diffusion_rnn.common.errors import CheckpointError
from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_save_npz
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log as read_log
from rwkv_diffusion_rnn.train_rwkv import compose_config as compose_cfg, run

N_EXAMPLES, BATCH = 38, 8          # 5 batches per epoch, the last one short
VOCAB, MASK, LATENT_DIM, SEQ = 64, 63, 8, 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Random token files (lengths 4..SEQ, padded) and latents, paired by file stem."""
    root = tmp_path_factory.mktemp("text_latent")
    rng = np.random.default_rng(0)
    for i in range(N_EXAMPLES):
        n = int(rng.integers(4, SEQ + 1))
        ids = np.zeros(SEQ, dtype=np.int32)
        ids[:n] = rng.integers(1, MASK, size=n)
        mask = np.zeros(SEQ, dtype=np.uint8)
        mask[:n] = 1
        atomic_save_npz(root / "tokens" / f"{i:08d}.npz", input_ids=ids, attention_mask=mask)
        atomic_save_npy(root / "latents" / f"{i:08d}.npy", rng.standard_normal(LATENT_DIM).astype(np.float32))
    return root


def common(data_dir, max_steps):
    return ["model=scratch", f"model.vocab_size={VOCAB}", f"model.mask_id={MASK}",
            f"model.latent_dim={LATENT_DIM}", "model.n_layer=1", "model.n_embd=32",
            "data.json_path=null", f"data.token_dir={data_dir / 'tokens'}",
            f"data.latent_dir={data_dir / 'latents'}", "data.val_fraction=0.0", f"data.seq_len={SEQ}",
            f"training.train_batch_size={BATCH}", "training.num_epochs=null", f"training.max_steps={max_steps}",
            "optimizer.warmup_steps=3", "optimizer.backbone_lr_mult=1.0", "logging.log_freq=2",
            "logging.eval_freq=0", "logging.save_epochs=false", "logging.progress_bar=false"]


def test_stop_and_resume_gives_the_same_losses_as_one_run(data_dir, tmp_path):
    steps = 14
    run(compose_cfg([*common(data_dir, steps), f"logging.save_dir={tmp_path / 'full'}"]))
    full = read_log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(2, steps + 1, 2))
    assert {r["epoch"] for r in full} == {0, 1, 2}       # the runs cross epoch boundaries
    # 5: exactly one epoch of 5 batches; 7: mid-epoch and mid-log-window (log_freq 2)
    for stop in (5, 7):
        part = tmp_path / f"part{stop}"
        run(compose_cfg([*common(data_dir, steps), f"training.stop_at_step={stop}", f"logging.save_dir={part}"]))
        assert (part / f"step_{stop:07d}").is_dir()
        assert max(r["step"] for r in read_log(part)) < stop + 1
        run(compose_cfg([*common(data_dir, steps), "training.resume=latest", f"logging.save_dir={part}"]))
        resumed = read_log(part)
        assert [r["step"] for r in resumed] == [r["step"] for r in full]
        assert [r["epoch"] for r in resumed] == [r["epoch"] for r in full]
        for key in ("loss", "text_loss", "latent_loss"):
            assert [r[key] for r in resumed] == [r[key] for r in full], (stop, key)


def test_corrupted_newest_checkpoint_is_named_with_the_intact_one(data_dir, tmp_path):
    save = tmp_path / "run"
    run(compose_cfg([*common(data_dir, 4), "logging.save_every=2", f"logging.save_dir={save}"]))
    newest, earlier = save / "step_0000004", save / "step_0000002"
    assert newest.is_dir() and earlier.is_dir()
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):    # inside the tensor data: same size, other bytes
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        run(compose_cfg([*common(data_dir, 6), "training.resume=latest", f"logging.save_dir={save}"]))
    msg = str(e.value)
    assert str(newest) in msg and "model.safetensors" in msg
    assert str(earlier.resolve()) in msg and "training.resume=" in msg


def test_an_epoch_run_ends_with_its_epoch_checkpoint_and_resumes_from_it(data_dir, tmp_path):
    """README steps 3 and 4: train one epoch, then resume from epoch_000 for a second one."""
    save = tmp_path / "run"
    one_epoch = [*common(data_dir, 1), "training.max_steps=null", "training.num_epochs=1",
                 "logging.save_epochs=true", f"logging.save_dir={save}"]
    run(compose_cfg(one_epoch))
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == ["epoch_000"]  # nothing else needed
    assert (save / "epoch_000" / "model.safetensors").is_file()
    run(compose_cfg([*one_epoch, "training.num_epochs=2", f"training.resume={save / 'epoch_000'}"]))
    log = read_log(save)
    assert [r["step"] for r in log] == [2, 4, 5, 6, 8, 10]     # 5 steps an epoch; the last of each logged
    assert [r["epoch"] for r in log] == [0, 0, 0, 1, 1, 1]
    assert (save / "epoch_001").is_dir()


def test_a_max_steps_run_ends_with_a_checkpoint_of_its_last_step(data_dir, tmp_path):
    from rwkv_diffusion_rnn.training.checkpoints import load_checkpoint
    from rwkv_diffusion_rnn.training.builders import build_model
    save = tmp_path / "run"
    cfg = compose_cfg([*common(data_dir, 7), f"logging.save_dir={save}"])   # mid-epoch, no save_every
    run(cfg)
    assert sorted(p.name for p in save.iterdir() if p.is_dir()) == ["step_0000007"]
    model = build_model(cfg)
    state, _ = load_checkpoint(save / "step_0000007", model=model)
    assert state["global_step"] == 7
    run(compose_cfg([*common(data_dir, 9), "training.resume=latest", f"logging.save_dir={save}"]))
    assert [r["step"] for r in read_log(save)][-2:] == [8, 9]
    assert (save / "step_0000009").is_dir()


def test_readme_steps_3_and_4_run_as_written_at_toy_size(tmp_path):
    """README step 3 (the DiffRwkv command, one epoch) then step 4 (resume from epoch_000 for a
    second epoch), as command lines, with a tiny random rwkv7 .pth and 32-dim latents."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import save_random_blinkdl_checkpoint
    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(1)
    for i in range(12):
        ids = np.zeros(SEQ, dtype=np.int32)
        ids[:8] = rng.integers(1, 1000, size=8)
        atomic_save_npz(tmp_path / "tokens" / f"{i:08d}.npz", input_ids=ids,
                        attention_mask=(ids > 0).astype(np.uint8))
        atomic_save_npy(tmp_path / "latents" / f"{i:08d}.npy", rng.standard_normal(32).astype(np.float32))
    pth = save_random_blinkdl_checkpoint(tmp_path / "rwkv7-tiny.pth", n_layer=1, n_embd=64, head_size=32,
                                         vocab_size=65536)
    step3 = ["rwkv_diffusion_rnn/train_rwkv.py", "--config-name", "rwkv_mmdit", "training.num_epochs=1",
             "training.train_batch_size=1", "training.eval_batch_size=1", "training.dtype=fp32",
             "data.num_workers=0", "data.max_samples=10", "logging.log_freq=1", "logging.eval_freq=100000",
             "tokenizer.local_files_only=false",
             # the toy stand-ins for the Hub weights and the user's data
             f"model.rwkv_name={pth}", "data.json_path=null", f"data.token_dir={tmp_path / 'tokens'}",
             f"data.latent_dir={tmp_path / 'latents'}", f"data.seq_len={SEQ}", "eval.latent_steps=4",
             f"logging.save_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}",
             "logging.progress_bar=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, *step3], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "epoch_000" / "model.safetensors").is_file()
    steps_one_epoch = [rec["step"] for rec in read_log(run_dir)]
    r = subprocess.run([sys.executable, *step3, "training.num_epochs=2",
                        f"training.resume={run_dir / 'epoch_000'}"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir / 'epoch_000'}" in r.stdout
    steps = [rec["step"] for rec in read_log(run_dir)]
    n = len(steps_one_epoch)
    assert n >= 8 and steps == list(range(1, 2 * n + 1))
    assert (run_dir / "epoch_001").is_dir()


def test_a_text_latent_checkpoint_is_scored_given_its_latent_and_given_the_null_latent(data_dir, tmp_path):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.training.checkpoints import latest_checkpoint
    args = [a for a in common(data_dir, 4) if not a.startswith("data.val_fraction")]
    metrics = run(compose_cfg([*args, "data.val_fraction=0.25", "training.eval_batch_size=16",
                               f"logging.save_dir={tmp_path}"]))
    assert {"val_nelbo", "val_nelbo_null_latent", "val_latent_cos"} <= set(metrics)
    result = evaluate(latest_checkpoint(tmp_path), ["logging.progress_bar=false"])
    assert result["latent"] == "clean" and result["bits_per_char"] is None   # no tokenizer: no characters
    assert result["nats_per_token"] == pytest.approx(metrics["val_nelbo"], rel=1e-9)
    assert result["null_latent"]["nats_per_token"] == pytest.approx(metrics["val_nelbo_null_latent"], rel=1e-9)
    assert result["null_latent"]["tokens"] == result["tokens"] > 0


@pytest.mark.parametrize("roles, measured, absent", [
    (["training.clean_text_prob=1.0", "training.clean_latent_prob=0.0"], "val_latent_loss", "val_text_loss"),
    (["training.clean_text_prob=0.0", "training.clean_latent_prob=1.0"], "val_text_loss", "val_latent_loss")])
def test_a_loss_no_validation_row_carries_is_absent_not_zero(data_dir, tmp_path, roles, measured, absent):
    """Every row text -> latent: no row carries a text loss; every row latent -> text: none a latent loss."""
    args = [a for a in common(data_dir, 2) if not a.startswith("data.val_fraction")]
    metrics = run(compose_cfg([*args, "data.val_fraction=0.25", "training.eval_batch_size=16", *roles,
                               f"logging.save_dir={tmp_path}"]))
    assert metrics[measured] > 0 and absent not in metrics
    assert absent not in read_log(tmp_path)[-1] and measured in read_log(tmp_path)[-1]
