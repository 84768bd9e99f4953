"""Checks a composed training config before anything is built, naming the key at fault.

Hydra already refuses keys that do not exist (``Key 'x' is not in struct``); this module refuses
values that cannot work together, e.g. an unknown mixer, a ``block_size`` that does not divide
``data.seq_len``, or a ``model.latent_dim`` that differs from the latents on disk.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from ..common.errors import ConfigError


# The Hydra configs: the primary rwkv_mmdit.yaml and one folder per config group.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def _choice(cfg, key, allowed):
    val = cfg
    for part in key.split("."):
        val = val[part]
    if val not in allowed:
        raise ConfigError(f"{key}={val!r} is not valid; choose one of {', '.join(map(str, allowed))}")


def _positive(cfg, key, allow_none=False):
    val = cfg
    for part in key.split("."):
        val = val[part]
    if val is None and allow_none:
        return
    if not isinstance(val, (int, float)) or val <= 0:
        raise ConfigError(f"{key}={val!r} must be a positive number")


def _first_latent_dim(cfg: DictConfig):
    """The dimension of the first latent the data would load, or None if it cannot be told."""
    d = cfg.data
    candidates = []
    if d.get("latent_dir") and Path(d.latent_dir).is_dir():
        candidates = sorted(Path(d.latent_dir).glob("*.npy"))[:1]
    for path in candidates:
        try:
            return int(np.load(path, mmap_mode="r").reshape(-1).shape[0]), path
        except Exception:
            return None
    return None


def _leaf_keys(node, prefix: str = "") -> set:
    out = set()
    for k, v in node.items():
        key = f"{prefix}{k}"
        out |= _leaf_keys(v, key + ".") if isinstance(v, dict) and v else {key}
    return out


@lru_cache(maxsize=None)
def known_keys(config_dir: str = CONFIG_DIR) -> frozenset:
    """Every key some file of the config tree sets: the keys the project reads. A group file
    (``model/scratch.yaml``) sets keys under its group unless it is ``@package _global_``."""
    root = Path(config_dir)
    keys = set()
    for file in root.rglob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(file), resolve=False) or {}
        node = {k: v for k, v in node.items() if k not in ("defaults", "hydra")}
        group = file.parent.relative_to(root).as_posix()
        is_global = file.parent == root or "@package _global_" in file.read_text(encoding="utf-8")[:500]
        keys |= _leaf_keys(node, "" if is_global else group.replace("/", ".") + ".")
    return frozenset(keys)


def check_known_keys(cfg: DictConfig, config_dir: str = CONFIG_DIR) -> None:
    """Refuses a key no config file defines, e.g. ``+training.max_step=3`` (the ``+`` form Hydra
    suggests for a typo), which nothing would read."""
    if not Path(config_dir).is_dir():
        return
    known = known_keys(config_dir)
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    cfg_keys = _leaf_keys({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"})
    for key in sorted(cfg_keys):
        if key in known or any(key.startswith(k + ".") for k in known):
            continue  # a known key whose value is itself a mapping
        if key in prefixes:
            continue  # an empty mapping under a known group
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{key} is not a setting of this trainer (no file under {config_dir} defines it, "
                          f"so nothing would read it){hint} Remove the override, or fix its name")


def validate_config(cfg: DictConfig) -> None:
    from ..diffusion.continuous_diffusion import LATENT_SCHEDULES, TARGETS
    from ..diffusion.diffusion_process import LOSS_TYPES, NOISE_TYPES, SCHEDULES
    from ..diffusion.objective import OBJECTIVES
    from ..models.mixers import MIXERS
    from ..models.mixers.base import Fusion
    from ..models.rwkv_denoiser import ARCHS, TIME_CONDITIONINGS
    from ..ops.wkv7 import BACKENDS
    from .builders import AUTOCAST_DTYPES, DATA_KINDS, DEVICES, denoiser_config, objective_config
    from .optimizer import OPTIMIZERS, SCHEDULES as LR_SCHEDULES

    check_known_keys(cfg)
    m, tr, d = cfg.model, cfg.training, cfg.data
    _choice(cfg, "model.arch", tuple(ARCHS))
    _choice(cfg, "model.mixer", sorted(MIXERS))
    _choice(cfg, "model.time_conditioning", TIME_CONDITIONINGS)
    _choice(cfg, "model.latent_target", TARGETS)
    _choice(cfg, "model.bi_fusion", Fusion.KINDS)
    _choice(cfg, "model.wkv_backend", BACKENDS)
    _choice(cfg, "training.dtype", tuple(AUTOCAST_DTYPES))
    _choice(cfg, "training.objective", OBJECTIVES)
    if tr.objective == "ar":
        if m.mixer != "causal":
            raise ConfigError(f"training.objective=ar predicts the next token from the tokens before it: "
                              f"set model.mixer=causal (got model.mixer={m.mixer!r}, which reads ahead)")
        if m.latent_prefix_len:
            raise ConfigError("training.objective=ar is a text-only baseline: set model.latent_prefix_len=0")
        if d.kind == "synthetic":
            raise ConfigError("training.objective=ar: the synthetic tasks are scored by diffusion decoding; "
                              "train the baseline on text (data=text)")
    if cfg.tokenizer.name == "chars" and d.kind not in ("text", "sft"):
        raise ConfigError("tokenizer.name=chars builds its vocabulary from a corpus: use it with data=text "
                          "or data=sft")
    if not (tr.device in DEVICES or str(tr.device).startswith("cuda:")):
        raise ConfigError(f"training.device={tr.device!r} is not valid; choose one of {', '.join(DEVICES)} "
                          "(or cuda:N)")
    _choice(cfg, "text_noise.schedule", sorted(SCHEDULES))
    _choice(cfg, "text_noise.loss_type", LOSS_TYPES)
    _choice(cfg, "text_noise.noise_type", NOISE_TYPES)
    if cfg.text_noise.sft and d.kind != "sft":
        raise ConfigError(f"text_noise.sft=true trains answers to prompts: it needs conversation data (data=sft "
                          f"data.path=<file>), not data.kind={d.kind}")
    _choice(cfg, "latent_noise.schedule", LATENT_SCHEDULES)
    _choice(cfg, "optimizer.name", OPTIMIZERS)
    _choice(cfg, "optimizer.schedule", LR_SCHEDULES)
    if cfg.optimizer.schedule == "wsd":
        ds = cfg.optimizer.decay_steps
        if not isinstance(ds, int) or isinstance(ds, bool) or ds < 1:
            raise ConfigError(f"optimizer.decay_steps={ds!r}: optimizer.schedule=wsd needs the number of "
                              "steps of its final linear decay, e.g. optimizer.decay_steps=50")
    _choice(cfg, "data.kind", DATA_KINDS)
    for key in ("training.train_batch_size", "training.eval_batch_size", "training.grad_accum_steps",
                "optimizer.lr", "optimizer.decay_lr_mult", "logging.log_freq", "data.seq_len"):
        _positive(cfg, key)
    _positive(cfg, "training.max_steps", allow_none=True)
    _positive(cfg, "eval.max_batches", allow_none=True)
    if cfg.eval.get("mc_samples") is not None:
        _positive(cfg, "eval.mc_samples")
    _positive(cfg, "training.num_epochs", allow_none=True)
    if not tr.max_steps and not tr.num_epochs:
        raise ConfigError("set training.max_steps or training.num_epochs (both are null)")
    if d.kind == "synthetic" and not tr.max_steps:
        raise ConfigError("data.kind=synthetic is an endless stream: set training.max_steps")
    if m.mask_id is not None and m.vocab_size is not None and not 0 <= m.mask_id < m.vocab_size:
        raise ConfigError(f"model.mask_id={m.mask_id} must be below model.vocab_size={m.vocab_size}")
    if m.arch in ("transformer", "hybrid"):
        if m.rwkv_name:
            raise ConfigError(f"model.arch={m.arch} is built from scratch, but model.rwkv_name={m.rwkv_name!r} "
                              "names pretrained RWKV-7 weights: set model.rwkv_name=null (model=scratch)")
        if m.freeze_backbone:
            raise ConfigError(f"model.arch={m.arch} is trained from scratch: set model.freeze_backbone=false")
    if m.arch != "rwkv7" and tr.objective == "ar":
        raise ConfigError("training.objective=ar decodes through RWKV-7's recurrent state; the AR "
                          "baseline is model.arch=rwkv7 model.mixer=causal")
    if m.arch == "qwen3":
        if not m.qwen3_name:
            raise ConfigError("model.arch=qwen3 loads a pretrained Qwen3: set model.qwen3_name to a directory "
                              "written by save_pretrained or a Hub name (model=qwen3 sets Qwen/Qwen3-0.6B-Base)")
        if m.rwkv_name:
            raise ConfigError(f"model.arch=qwen3 takes its weights from model.qwen3_name, but model.rwkv_name="
                              f"{m.rwkv_name!r} names RWKV-7 weights: set model.rwkv_name=null (or use model=qwen3)")
    elif m.qwen3_name:
        raise ConfigError(f"model.qwen3_name={m.qwen3_name!r} is read by model.arch=qwen3 only (model.arch="
                          f"{m.arch}): set model.arch=qwen3, or model.qwen3_name=null")
    if m.block_attention:
        _positive(cfg, "model.block_size")
        if d.seq_len % m.block_size:
            raise ConfigError(f"model.block_attention=true cuts the text into blocks of model.block_size="
                              f"{m.block_size}, which does not divide data.seq_len={d.seq_len}")
    if m.arch == "hybrid":
        from ..models.hybrid import attention_layers
        try:
            attention_layers(m.n_layer, m.attn_layers, m.attn_every)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    elif m.attn_layers is not None or m.attn_every is not None:
        raise ConfigError(f"model.attn_layers / model.attn_every place attention blocks in model.arch=hybrid; "
                          f"model.arch={m.arch} does not read them: set model.arch=hybrid or leave both null")
    if m.rwkv_name is None and m.arch != "qwen3":
        for key in ("n_layer", "n_embd", "head_size"):
            _positive(cfg, f"model.{key}")
        if m.n_embd % m.head_size:
            raise ConfigError(f"model.n_embd={m.n_embd} must be a multiple of model.head_size={m.head_size}")
    if m.mixer == "block_causal":
        _positive(cfg, "model.block_size")
        if d.seq_len % m.block_size:
            raise ConfigError(f"model.block_size={m.block_size} does not divide data.seq_len={d.seq_len}; "
                              "choose a block size that divides the sequence length")
    pel = m.pos_emb_len
    if not isinstance(pel, int) or isinstance(pel, bool) or pel < 0:
        raise ConfigError(f"model.pos_emb_len={pel!r} must be an integer >= 0 (0: no position embedding)")
    if pel and pel < d.seq_len:
        raise ConfigError(f"model.pos_emb_len={pel} is shorter than data.seq_len={d.seq_len}: the "
                          f"position embedding must cover every text position; set "
                          f"model.pos_emb_len={d.seq_len} (or 0 for none)")
    std = m.pos_emb_init_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
        raise ConfigError(f"model.pos_emb_init_std={std!r} must be a number >= 0 (0: zeros)")
    for key in ("grad_checkpointing", "resume_any_world_size"):
        if not isinstance(tr[key], bool):
            raise ConfigError(f"training.{key}={tr[key]!r} must be true or false")
    mbs = tr.max_bad_steps
    if not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 0:
        raise ConfigError(f"training.max_bad_steps={mbs!r} must be an integer >= 0 (0: stop at the first "
                          "non-finite loss or gradient)")
    if tr.ema_decay is not None and not 0 < tr.ema_decay < 1:
        raise ConfigError(f"training.ema_decay={tr.ema_decay} must be in (0, 1) or null")
    # the dataclasses' own checks (their messages name the config keys), before any data is read;
    # a vocabulary left to the tokenizer gets a stand-in here and its own check in resolve_vocab
    stand_in = {}
    if m.vocab_size is None or m.mask_id is None:
        stand_in = {"vocab_size": m.vocab_size or (m.mask_id or 0) + 2,
                    "mask_id": m.mask_id if m.mask_id is not None else 0}
    try:
        objective_config(tr)
        denoiser_config(m, **stand_in)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    if d.kind == "synthetic":
        from ..data.tasks import TASK_NAMES
        _choice(cfg, "data.task", TASK_NAMES)
        if m.latent_prefix_len:
            raise ConfigError("data.kind=synthetic is text only: set model.latent_prefix_len=0")
        if m.rwkv_name:
            raise ConfigError("data.kind=synthetic trains from scratch on a character vocabulary: "
                              "set model.rwkv_name=null (model=scratch)")
    elif d.kind == "sft":
        if not d.path and not d.hf_dataset:
            raise ConfigError("data=sft needs conversations: set data.path (a .json or .jsonl file) or data.hf_dataset")
        if not cfg.tokenizer.name:
            raise ConfigError("data=sft tokenizes the conversations: set tokenizer.name (chars, bytes, "
                              "BlinkDL/rwkv7-g1 or a Hugging Face tokenizer)")
        if m.latent_prefix_len:
            raise ConfigError("data=sft has no sentence latents: set model.latent_prefix_len=0")
        if cfg.text_noise.truncate_prob:
            raise ConfigError(f"text_noise.truncate_prob={cfg.text_noise.truncate_prob} with data=sft could cut "
                              "answers away: set text_noise.truncate_prob=0")
        if tr.objective == "ar":
            raise ConfigError("data=sft trains the diffusion objective on answers; training.objective=ar is not "
                              "supported with it")
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    elif d.kind == "text":
        if not d.path and not d.hf_dataset:
            raise ConfigError("data.kind=text needs a corpus: set data.path (a .txt, .jsonl, .json, folder or "
                              "glob) or data.hf_dataset")
        if not cfg.tokenizer.name:
            raise ConfigError("data.kind=text tokenizes the corpus: set tokenizer.name (chars, bytes, "
                              "BlinkDL/rwkv7-g1 or a Hugging Face tokenizer)")
        if m.latent_prefix_len:
            raise ConfigError("data.kind=text has no sentence latents: set model.latent_prefix_len=0")
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    else:
        if d.token_dir is None or not Path(d.token_dir).is_dir():
            raise ConfigError(f"data.token_dir={d.token_dir!r} is not a directory; run "
                              "python -m rwkv_diffusion_rnn.preprocess_tokenize_text first or point "
                              "data.token_dir at its output")
        if m.latent_prefix_len:
            if d.latent_dir is None or not Path(d.latent_dir).is_dir():
                raise ConfigError(f"data.latent_dir={d.latent_dir!r} is not a directory; run "
                                  "python -m rwkv_diffusion_rnn.prepare_latents first, point "
                                  "data.latent_dir at its latents, or set model.latent_prefix_len=0")
            found = _first_latent_dim(cfg)
            if found is not None and found[0] != m.latent_dim:
                raise ConfigError(f"model.latent_dim={m.latent_dim} but {found[1]} holds a "
                                  f"{found[0]}-dim latent; set model.latent_dim={found[0]} or re-run "
                                  f"prepare_latents with --latent_dim {m.latent_dim}")
