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


CHATS = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "ok"}]}
         for i in range(20)]


@pytest.fixture(scope="module")
def pretrained_text(tmp_path_factory):
    """A text-only run from scratch with sizes other than model=scratch's, on a corpus holding every
    character of the conversations (an SFT file refuses characters its chars vocabulary lacks)."""
    tmp = tmp_path_factory.mktemp("pre_text")
    corpus = tmp / "corpus.txt"
    corpus.write_text("System: be brief\nUser: question 0123456789\nAssistant: ok\n" * 30)
    run(compose_config(["data=text", f"data.path={corpus}", f"data.cache_dir={tmp / 'cache'}", "tokenizer.name=chars",
                        "model=scratch", "model.latent_prefix_len=0", "model.n_layer=1", "model.n_embd=32",
                        "model.head_size=16", "data.seq_len=32", "training.train_batch_size=4",
                        "training.max_steps=2", "logging.eval_freq=0", "logging.progress_bar=false",
                        f"logging.save_dir={tmp / 'run'}"]))
    return tmp / "run"


def test_the_documented_fine_tune_line_takes_the_checkpoints_model_and_tokenizer(tmp_path, pretrained_text):
    import json
    import os
    import subprocess
    import sys
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    # the line of docs/sft.md, as typed, plus a step limit
    line = ["data=sft", f"data.path={chats}", f"training.init_from={pretrained_text}",
            f"logging.save_dir={tmp_path / 'sft_ft'}", "training.max_steps=2"]
    done = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", *line], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialised from" in done.stdout
    assert read_train_log(tmp_path / "sft_ft")[-1]["step"] == 2
    saved = ckpt.read_saved_config(ckpt.latest_checkpoint(tmp_path / "sft_ft"))
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"], saved["model"]["rwkv_name"]) == (1, 32, None)
    assert saved["tokenizer"]["name"] == "chars" and saved["data"]["kind"] == "sft"
    # from Python the same: keys the overrides give still win over the checkpoint's
    cfg = compose_config([*line[:4], "model.n_embd=64", "model.local_files_only=true"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.latent_prefix_len, cfg.tokenizer.name) == (1, 64, 0, "chars")
    assert cfg.model.local_files_only is True          # machine settings never come from a saved file
    with pytest.raises(ckpt.CheckpointError, match="model.n_embd=32 there, 64 here"):
        Trainer(cfg)
