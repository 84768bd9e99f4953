"""A Qwen3-LLaDA user's keys and values are read as this trainer's where they mean the same, and
refused with the equivalent named where they do not."""
import pytest

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.generate import parse_options
from rwkv_diffusion_rnn.train_rwkv import compose_config


def test_their_training_keys_and_values_become_ours(capsys):
    cfg = compose_config(["experiment=shakespeare_char", "training.loss_impl=guidelines",
                          "training.noise.schedule=uniform", "training.noise.mask_contiguous_region_prob=0.2",
                          "training.noise.random_length_prob=0.01", "training.noise.min_masking_rate=0.05",
                          "training.noise.reweight_cap=50", "optim.name=adamw"])
    n = cfg.text_noise
    assert (n.loss_type, n.schedule, n.span_prob, n.truncate_prob, n.min_masking_rate, n.reweight_cap) == \
        ("llada", "linear", 0.2, 0.01, 0.05, 50)
    assert cfg.optimizer.name == "adamw"
    assert "read training.loss_impl=guidelines as text_noise.loss_type=llada" in capsys.readouterr().err
    cfg = compose_config(["text_noise.loss_type=dllm", "text_noise.schedule=uniform"])
    assert (cfg.text_noise.loss_type, cfg.text_noise.schedule) == ("llada", "linear")
    cfg = compose_config(["model=qwen3", "training.block_attention.enabled=true",
                          "training.block_attention.block_length=32"])
    assert cfg.model.block_attention is True and cfg.model.block_size == 32


def test_their_keys_without_an_equivalent_are_refused_naming_ours():
    with pytest.raises(ConfigError, match="training.mode is Qwen3-LLaDA's setting; here SFT is data=sft"):
        compose_config(["training.mode=sft"])
    with pytest.raises(ConfigError, match="logging.eval_freq"):
        compose_config(["evaluation.do_eval_loss=true"])


def test_their_inference_options_become_generate_options():
    g = parse_options(["model=runs/x", "gen_length=128", "steps=64", "block_length=32", "remasking=random_topk"])
    assert (g.checkpoint, g.length, g.steps, g.block_length, g.remasking) == ("runs/x", 128, 64, 32, "random_topk")
    with pytest.raises(ConfigError, match="block attention is part of the checkpoint's model"):
        parse_options(["block_attention=true"])
