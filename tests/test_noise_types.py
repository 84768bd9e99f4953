"""Uniform-state noise (text_noise.noise_type=random_replace) trains, but the bound and the
samplers are masked diffusion's: training reports its loss without a bound, and evaluate, generate
and task scoring refuse it naming the key instead of scoring another process."""
import pytest

from rwkv_diffusion_rnn.common.errors import ConfigError, ProjectError
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.config_validation import validate_config


def test_a_random_replace_run_trains_without_a_bound_and_is_refused_where_one_is_needed(tmp_path):
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 100)
    metrics = run(compose_config(["experiment=shakespeare_char", f"data.path={corpus}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "model.n_layer=1",
                                  "model.n_embd=32", "model.head_size=16", "text_noise.noise_type=random_replace",
                                  "training.train_batch_size=4", "training.max_steps=2", "eval.max_batches=1",
                                  "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}"]))
    assert "val_text_loss" in metrics and "val_nelbo" not in metrics
    with pytest.raises(ConfigError, match="text_noise.noise_type=random_replace .* no bound or sampler"):
        evaluate(tmp_path / "run", ["eval.max_batches=1"])
    with pytest.raises(ProjectError, match="cannot be decoded: it was trained with text_noise.noise_type=random_replace"):
        generate(tmp_path / "run", length=8, num_samples=1, steps=4, progress_bar=False, print_texts=False)


def test_tasks_scored_by_decoding_refuse_uniform_noise(tmp_path):
    with pytest.raises(ConfigError, match="data.kind=synthetic is scored by decoding its tasks"):
        validate_config(compose_config(["experiment=struct", "text_noise.noise_type=random_replace",
                                        f"logging.save_dir={tmp_path}"]))
