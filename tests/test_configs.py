"""Hydra composition of every config group option and experiment, and refusal of bad configs."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rwkv_diffusion_rnn.training.config_validation import validate_config
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.builders import denoiser_config
from rwkv_diffusion_rnn.train_rwkv import CONFIG_DIR, compose_config as compose_cfg

GROUPS = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml"))
          for g in ("model", "text_noise", "latent_noise", "data", "optimizer", "experiment")}


def test_every_group_has_options():
    assert all(GROUPS.values()), GROUPS
    assert {"struct", "rightcopy", "rightrev", "index", "add"} <= set(GROUPS["experiment"])


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    from types import SimpleNamespace
    from rwkv_diffusion_rnn.data.tokenizer import CharTokenizer
    from rwkv_diffusion_rnn.data.sources import named_tokenizer
    from rwkv_diffusion_rnn.training.builders import resolve_vocab
    cfg = compose_cfg([f"{group}={option}", f"logging.save_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    tok = named_tokenizer(cfg)
    if tok is None and cfg.model.vocab_size is None:   # model=scratch names no tokenizer
        with pytest.raises(ConfigError, match="set tokenizer.name, or both keys"):
            resolve_vocab(cfg, SimpleNamespace(tokenizer=None))
        cfg.model.vocab_size, cfg.model.mask_id = 256, 255
    resolve_vocab(cfg, SimpleNamespace(tokenizer=CharTokenizer("abc") if tok == "chars" else tok))
    denoiser_config(cfg.model)  # maps to the model's dataclass without error


@pytest.mark.parametrize("exp", GROUPS["experiment"])
def test_every_experiment_is_a_valid_training_config(exp, tmp_path):
    cfg = compose_cfg([f"experiment={exp}", f"logging.save_dir={tmp_path}"])
    if cfg.data.kind == "synthetic":
        validate_config(cfg)
        assert cfg.data.task == exp
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.head_size, cfg.data.seq_len,
                cfg.training.train_batch_size) == (2, 128, 32, 64, 32)


def test_primary_config_keeps_the_keys_users_know():
    cfg = compose_cfg(["logging.save_dir=/tmp/x"])
    assert cfg.model.rwkv_name == "BlinkDL/rwkv7-g1"
    assert cfg.model.latent_dim == 32 and cfg.model.latent_prefix_len == 1
    assert cfg.model.time_conditioning == "film" and cfg.model.freeze_backbone is True
    assert cfg.model.use_pretrained_head is False
    assert cfg.model.vocab_size is None and cfg.model.mask_id is None   # follow the tokenizer ...
    from types import SimpleNamespace
    from rwkv_diffusion_rnn.data.sources import named_tokenizer
    from rwkv_diffusion_rnn.training.builders import resolve_vocab
    resolve_vocab(cfg, SimpleNamespace(tokenizer=named_tokenizer(cfg)))
    assert (cfg.model.vocab_size, cfg.model.mask_id) == (65536, 65535)  # ... RWKV World's
    for key in ("data.token_dir", "data.latent_dir", "training.resume", "model.rwkv_revision",
                "tokenizer.local_files_only", "training.dtype", "data.num_workers", "data.max_samples",
                "logging.log_freq", "logging.eval_freq", "training.eval_batch_size"):
        OmegaConf.select(cfg, key, throw_on_missing=True)
    primary = OmegaConf.load(Path(CONFIG_DIR) / "rwkv_mmdit.yaml")
    assert primary.hydra.job.chdir is False


def test_unknown_key_is_refused_by_name():
    with pytest.raises(ConfigCompositionException, match="nonexistent_key"):
        compose_cfg(["model.nonexistent_key=3"])


@pytest.mark.parametrize("overrides,match", [
    (["model.mixer=sideways"], "model.mixer='sideways'"),
    (["model.mixer=block_causal", "model.block_size=7"], "model.block_size=7 does not divide data.seq_len=64"),
    (["training.dtype=fp8"], "training.dtype='fp8'"),
    (["text_noise.schedule=zigzag"], "text_noise.schedule='zigzag'"),
    (["optimizer.name=sgd"], "optimizer.name='sgd'"),
    (["optimizer.schedule=wsd", "optimizer.decay_steps=null"], "optimizer.decay_steps=None"),
    (["optimizer.decay_lr_mult=0"], "optimizer.decay_lr_mult=0 must be a positive number"),
    (["model.n_embd=100"], "model.n_embd=100 must be a multiple of model.head_size=32"),
    (["training.max_steps=null"], "training.max_steps"),
    (["data.task=sudoku"], "data.task='sudoku'"),
    (["model.latent_prefix_len=1"], "model.latent_prefix_len=0"),
    (["training.train_batch_size=0"], "training.train_batch_size=0"),
    (["model.pos_emb_len=32"], "model.pos_emb_len=32 is shorter than data.seq_len=64"),
    (["model.pos_emb_len=-2"], "model.pos_emb_len=-2 must be an integer >= 0"),
    (["model.pos_emb_init_std=-0.1"], "model.pos_emb_init_std=-0.1 must be a number >= 0"),
    (["text_noise.sft=true"], "text_noise.sft=true trains answers to prompts: it needs conversation data"),
    (["model.latent_in_cond=true"], "model.latent_in_cond=true adds the latent"),
    (["model.bi_fusion=max"], "model.bi_fusion='max'"),
    (["text_noise.loss_type=hinge"], "text_noise.loss_type='hinge'"),
    (["latent_noise.schedule=sqrt"], "latent_noise.schedule='sqrt'"),
    (["training.device=tpu"], "training.device='tpu'"),
])
def test_configs_that_cannot_work_are_refused_naming_the_key(overrides, match, tmp_path):
    cfg = compose_cfg(["experiment=struct", f"logging.save_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)


def test_latent_dim_that_does_not_match_the_data_is_refused(tmp_path):
    import numpy as np
    (tmp_path / "tok").mkdir()
    (tmp_path / "lat").mkdir()
    np.save(tmp_path / "lat" / "0.npy", np.zeros(16, dtype=np.float32))
    cfg = compose_cfg([f"data.token_dir={tmp_path / 'tok'}", f"data.latent_dir={tmp_path / 'lat'}",
                       f"logging.save_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model.latent_dim=32 but .*0.npy holds a 16-dim latent"):
        validate_config(cfg)


def test_choice_lists_are_the_implementing_modules_own(tmp_path):
    """A choice a module adds is accepted without touching the validation (one source of truth)."""
    from rwkv_diffusion_rnn.diffusion import diffusion_process
    from rwkv_diffusion_rnn.models.mixers.base import Fusion
    cfg = compose_cfg(["experiment=struct", f"logging.save_dir={tmp_path}", "model.bi_fusion=max",
                       "text_noise.loss_type=hinge"])
    old_kinds, old_losses = Fusion.KINDS, diffusion_process.LOSS_TYPES
    try:
        Fusion.KINDS = (*old_kinds, "max")
        diffusion_process.LOSS_TYPES = (*old_losses, "hinge")
        validate_config(cfg)
    finally:
        Fusion.KINDS, diffusion_process.LOSS_TYPES = old_kinds, old_losses


def test_the_padding_id_is_the_named_tokenizers(tmp_path):
    from rwkv_diffusion_rnn.data.tokenizer import load_tokenizer
    from rwkv_diffusion_rnn.data.sources import named_tokenizer
    cfg = compose_cfg([f"logging.save_dir={tmp_path}", "tokenizer.name=BlinkDL/rwkv7-g1"])
    assert named_tokenizer(cfg).pad_id == load_tokenizer("BlinkDL/rwkv7-g1").pad_id
    cfg = compose_cfg([f"logging.save_dir={tmp_path}", f"model.rwkv_name={tmp_path / 'rwkv7-g1a-0.1b.pth'}"])
    assert cfg.tokenizer.name.endswith(".pth") and named_tokenizer(cfg).pad_id == load_tokenizer("BlinkDL/rwkv7-g1").pad_id
    cfg = compose_cfg([f"logging.save_dir={tmp_path}", "tokenizer.name=/no/such/tokenizer",
                       "tokenizer.local_files_only=true"])
    with pytest.raises(ConfigError, match="tokenizer.name='/no/such/tokenizer'"):
        named_tokenizer(cfg)


def test_help_is_short_names_the_registered_choices_and_points_to_the_full_config():
    import subprocess
    import sys
    from rwkv_diffusion_rnn.models.mixers import MIXERS
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("usage:") and len(lines) < 60
    mixer_line = next(line for line in lines if line.strip().startswith("model.mixer"))
    assert all(name in mixer_line for name in MIXERS)
    assert "experiment " in out.stdout and "shakespeare_char" in out.stdout and "--cfg job" in out.stdout
    full = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv", "--cfg", "job"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 0 and "model:" in full.stdout and "training:" in full.stdout



@pytest.mark.parametrize("override, match", [
    ("optimizer.betas=[2,0.9]", r"optimizer.betas=\[2, 0.9\] must be a list of 2 values, each a number in \[0, 1\)"),
    ("optimizer.betas=abc", r"optimizer.betas='abc' must be a list of 2 values"),
    ("optimizer.lr=nan", r"optimizer.lr=nan must be a positive number"),
    ("optimizer.weight_decay=abc", r"optimizer.weight_decay='abc' must be a number >= 0"),
    ("optimizer.warmup_steps=-1", r"optimizer.warmup_steps=-1 must be an integer >= 0"),
    ("optimizer.min_lr_ratio=2", r"optimizer.min_lr_ratio=2 must be a number in \[0, 1\]"),
    ("data=text data.val_fraction=abc", r"data.val_fraction='abc' must be a number in \[0, 1\)"),
    ("text_noise.min_masking_rate=2", r"text_noise.min_masking_rate=2 must be a number in \[0, 1\]"),
    ("text_noise.truncate_prob=5", r"text_noise.truncate_prob=5 must be a number in \[0, 1\]"),
    ("latent_noise.max_noise_level=1.5", r"latent_noise.max_noise_level=1.5 must be a number in \(0, 1\)"),
    ("logging.keep_last=0", r"logging.keep_last=0 must be an integer >= 1 or null \(keep every checkpoint\)"),
    ("logging.save_every=-5", r"logging.save_every=-5 must be an integer >= 1 or null"),
    ("training.grad_clip=-1", r"training.grad_clip=-1 must be a positive number or null \(no clipping\)"),
    ("training.clean_text_prob=inf", r"training.clean_text_prob=inf must be a number in \[0, 1\]"),
    ("eval.threshold=1.5", r"eval.threshold=1.5 must be a number in \[0, 1\] or null"),
    ("model.latent_dim=0", r"model.latent_dim=0 must be an integer >= 1"),
    ("model.freeze_backbone=maybe", r"model.freeze_backbone='maybe' must be true or false"),
])
def test_every_typed_value_is_checked_naming_the_key_the_value_and_the_range(override, match, tmp_path):
    """Each kind of check (range, open end, list, finite, integer, null allowed, flag) refuses a bad
    value before anything is built, with the key, the value and what is allowed."""
    cfg = compose_cfg(["experiment=struct", f"logging.save_dir={tmp_path}", *override.split()])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_a_constructor_and_the_validation_share_one_rule():
    """MaskedDiffusion (public API) refuses with the same message as the config check."""
    from rwkv_diffusion_rnn.diffusion.diffusion_process import MaskedDiffusion
    with pytest.raises(ConfigError, match=r"text_noise.truncate_prob=5 must be a number in \[0, 1\]"):
        MaskedDiffusion(mask_id=3, vocab_size=4, truncate_prob=5)
