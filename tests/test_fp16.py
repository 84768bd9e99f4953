"""training.dtype=fp16: float16 autocast with a gradient scaler on CUDA, the scaler's state in
the checkpoint so that a resumed run logs the same losses; refused on the CPU with the reason."""
import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.config_validation import validate_config
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

from test_lm import corpus_file, overrides


def test_fp16_on_the_cpu_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="training.dtype=fp16 trains with a gradient scaler on CUDA.*bf16"):
        validate_config(compose_config(["experiment=shakespeare_char", "training.dtype=fp16", "training.device=cpu",
                                        f"logging.save_dir={tmp_path}"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA (its gradient scaler runs there)")
def test_fp16_trains_and_resumes_exactly_with_the_scaler_in_the_checkpoint(tmp_path):
    corpus = corpus_file(tmp_path)
    common = ["training.dtype=fp16", "training.device=cuda", "training.max_steps=6", "logging.eval_freq=3",
              "logging.log_freq=1"]
    run(compose_config(overrides(tmp_path / "a", corpus, *common)))
    part = overrides(tmp_path / "b", corpus, *common)
    run(compose_config([*part, "training.stop_at_step=3"]))
    run(compose_config([*part, "training.resume=latest"]))
    a, b = read_train_log(tmp_path / "a" / "run"), read_train_log(tmp_path / "b" / "run")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
