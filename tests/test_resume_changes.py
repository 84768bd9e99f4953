"""Resume means the same run: a setting that changes what the run is (objective, noise, data) is
refused naming the key and offering training.init_from; one that may change (the learning rate,
steps) takes effect from the resumed step and is recorded with the step it changed at."""
import json
import math
from pathlib import Path

import pytest

from rwkv_diffusion_rnn.common.errors import CheckpointError
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

LINES = ["the cat sat on the mat.", "a dog ran in the park!", "we like tea and cake."]


def overrides(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(LINES * 40) + "\n")
    return ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=8", "training.max_steps=8",
            "optimizer.warmup_steps=1", "optimizer.schedule=constant", "logging.eval_freq=0", "logging.log_freq=1",
            "eval.max_batches=1", "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}", *extra]


@pytest.fixture
def stopped(tmp_path):
    run(compose_config(overrides(tmp_path, "training.stop_at_step=4")))
    return tmp_path


@pytest.mark.parametrize("change, key", [
    ("training.objective=ar", "training.objective"),
    ("text_noise.loss_type=llada", "text_noise.loss_type"),
    ("data.seq_len=8", "data.seq_len"),
])
def test_a_setting_that_changes_what_the_run_is_is_refused_with_init_from_offered(stopped, change, key):
    extra = ["model.mixer=causal"] if change == "training.objective=ar" else []
    with pytest.raises(CheckpointError) as e:
        run(compose_config(overrides(stopped, "training.resume=latest", change, *extra)))
    assert f"  {key}: checkpoint" in str(e.value) and "training.init_from=" in str(e.value)


def test_another_corpus_of_the_same_size_is_refused(stopped):
    other = stopped / "other.txt"
    text = (stopped / "corpus.txt").read_text()
    other.write_text(text.replace("cat", "hat"))            # same size, other text
    with pytest.raises(CheckpointError, match="data.path: checkpoint .*corpus.txt, config .*other.txt"):
        run(compose_config([*overrides(stopped, "training.resume=latest"), f"data.path={other}"]))


def test_a_learning_rate_changed_on_resume_takes_effect_and_is_recorded(stopped, capsys):
    run(compose_config(overrides(stopped, "training.resume=latest", "optimizer.lr=5e-2")))
    log = read_train_log(stopped / "run")
    lrs = {r["step"]: r["lr"] for r in log}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-2) and lrs[8] == pytest.approx(5e-2)
    assert "optimizer.lr: 0.001 until step 4, 0.05 from here" in capsys.readouterr().out
    state = ckpt.read_trainer_state(ckpt.latest_checkpoint(stopped / "run"))
    assert state["config_changes"] == [{"from_step": 4, "key": "optimizer.lr", "was": 0.001, "now": 0.05}]


def test_unchanged_settings_resume_exactly_with_the_settings_reapplied(stopped, tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    run(compose_config(overrides(full)))
    # the token cache may move: where the data is kept is not what it is
    run(compose_config([*overrides(stopped, "training.resume=latest"), f"data.cache_dir={stopped / 'moved'}"]))
    assert [r["loss"] for r in read_train_log(stopped / "run")] == [r["loss"] for r in read_train_log(full / "run")]
    assert "config_changes" not in ckpt.read_trainer_state(ckpt.latest_checkpoint(stopped / "run"))
