"""training.init_from: a new run that starts from a checkpoint's weights (and EMA) with a fresh
optimizer, schedule and data position; a checkpoint that does not fit is refused by key."""
import pytest
import torch
from safetensors.torch import load_file

from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.improved_trainer import Trainer, read_train_log

from test_lm import corpus_file, overrides


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    corpus = corpus_file(tmp)
    run(compose_config(overrides(tmp, corpus, "training.max_steps=4", "logging.eval_freq=0", "training.ema_decay=0.5")))
    return tmp / "run", corpus


def test_a_new_run_starts_from_the_weights_and_ema_with_fresh_optimizer_state(tmp_path, pretrained):
    source, corpus = pretrained
    args = overrides(tmp_path, corpus, f"training.init_from={source}", "training.max_steps=3", "optimizer.lr=1e-4",
                     "logging.eval_freq=0", "logging.log_freq=1", "training.ema_decay=0.9")
    trainer = Trainer(compose_config(args))
    saved = load_file(str(ckpt.latest_checkpoint(source) / ckpt.MODEL_FILE))
    saved_ema = load_file(str(ckpt.latest_checkpoint(source) / ckpt.EMA_FILE))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert all(torch.equal(trainer.ema.module.state_dict()[k], v) for k, v in saved_ema.items())
    assert any(not torch.equal(saved[k], saved_ema[k]) for k in saved)       # two different sets of weights
    assert trainer.global_step == 0 and not trainer.optimizer.state          # nothing of the old optimizer
    assert trainer.optimizer.param_groups[0]["lr"] < 1e-4                    # the new schedule, in its warmup
    trainer.train()
    assert [r["step"] for r in read_train_log(tmp_path / "run")] == [1, 2, 3]


def test_a_checkpoint_that_does_not_fit_is_refused_by_key(tmp_path, pretrained):
    source, corpus = pretrained
    with pytest.raises(ckpt.CheckpointError, match="model.n_embd=32 there, 64 here"):
        Trainer(compose_config(overrides(tmp_path, corpus, f"training.init_from={source}", "model.n_embd=64")))
    with pytest.raises(ConfigError, match="tokenizer.name='chars'.*Set tokenizer.name=chars"):
        Trainer(compose_config(overrides(tmp_path, corpus, f"training.init_from={source}", "tokenizer.name=bytes")))
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint nor a run folder"):
        Trainer(compose_config(overrides(tmp_path, corpus, f"training.init_from={tmp_path}")))
