"""Checks a composed training config before anything is built, naming the key at fault.

Hydra already refuses keys that do not exist (``Key 'x' is not in struct``); this module refuses
values that cannot work together, e.g. an unknown mixer, a ``block_size`` that does not divide
``data.seq_len``, or a ``model.latent_dim`` that differs from the latents on disk.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from ..common.checks import Flag, Num, check_options
from ..common.errors import ConfigError


# The Hydra configs: the primary rwkv_mmdit.yaml and one folder per config group.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def _choice(cfg, key, allowed):
    val = cfg
    for part in key.split("."):
        val = val[part]
    if val not in allowed:
        raise ConfigError(f"{key}={val!r} is not valid; choose one of {', '.join(map(str, allowed))}")


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
    from ..models.mixers import MIXERS, option_defaults
    # the chosen mixer's options are model.* keys where the mixer is defined (one registered by a
    # user's module is configured with +model.<option>=... without editing the YAML)
    mixer = cfg.get("model", {}).get("mixer")
    known = known_keys(config_dir) | {f"model.{o}" for o in (option_defaults(mixer) if mixer in MIXERS else ())}
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
    """Refuses a config that cannot work, naming the key: the choices, then each registry entry's
    own checks (the ``model.arch`` entry, the mixer, the ``data.kind`` source), then the rules that
    join two families, then the numbers of the training loop."""
    from ..data.sources import DATA_SOURCES
    from ..models.rwkv_denoiser import ARCHS
    from ..models.mixers import MIXERS

    check_known_keys(cfg)
    _check_choices(cfg)
    _check_values(cfg)
    arch, mixer, source = ARCHS[cfg.model.arch], MIXERS[cfg.model.mixer], DATA_SOURCES[cfg.data.kind]
    _check_model(cfg, arch)
    source.check(cfg)
    _check_across(cfg, arch, mixer, source)
    _check_training(cfg)
    _check_dataclasses(cfg)


def _check_choices(cfg: DictConfig) -> None:
    from ..data.sources import DATA_SOURCES
    from ..diffusion.chunks import CHUNK_GRADS
    from .likelihood import CONTEXTS
    from ..diffusion.continuous_diffusion import LATENT_SCHEDULES, TARGETS
    from ..diffusion.diffusion_process import LOSS_TYPES, NOISE_TYPES, SCHEDULES
    from ..diffusion.objective import OBJECTIVES
    from ..models.rwkv_denoiser import ARCHS
    from ..models.mixers import MIXERS
    from ..models.rwkv_denoiser import LATENT_PROJECTORS, TIME_CONDITIONINGS
    from ..ops.wkv7 import BACKENDS
    from .builders import AUTOCAST_DTYPES, DEVICES
    from .optimizer import OPTIMIZERS, SCHEDULES as LR_SCHEDULES

    for key, allowed in (("model.arch", tuple(ARCHS)), ("model.mixer", sorted(MIXERS)),
                         ("model.time_conditioning", TIME_CONDITIONINGS), ("model.latent_target", TARGETS),
                         ("model.wkv_backend", BACKENDS), ("model.chunk_grad", CHUNK_GRADS),
                         ("eval.context", CONTEXTS), ("training.dtype", tuple(AUTOCAST_DTYPES)),
                         ("training.objective", OBJECTIVES), ("text_noise.schedule", sorted(SCHEDULES)),
                         ("text_noise.loss_type", LOSS_TYPES), ("text_noise.noise_type", NOISE_TYPES),
                         ("latent_noise.schedule", LATENT_SCHEDULES), ("optimizer.name", OPTIMIZERS),
                         ("optimizer.schedule", LR_SCHEDULES), ("data.kind", tuple(DATA_SOURCES))):
        _choice(cfg, key, allowed)
    if "order" in cfg.data:
        from ..data.corpus import ORDERS
        _choice(cfg, "data.order", ORDERS)
    if cfg.model.get("latent_projector") is not None:       # a saved config may predate the key
        _choice(cfg, "model.latent_projector", LATENT_PROJECTORS)
    device = cfg.training.device
    if not (device in DEVICES or str(device).startswith("cuda:")):
        raise ConfigError(f"training.device={device!r} is not valid; choose one of {', '.join(DEVICES)} "
                          "(or cuda:N)")


# The training loop's own options (the trainer reads them), with their ranges; the other groups'
# live with the module that reads them (optimizer.OPTIONS, diffusion_process.OPTIONS, ...).
TRAINING_OPTIONS = {
    "train_batch_size": Num(lo=1, integer=True), "eval_batch_size": Num(lo=1, integer=True),
    "grad_accum_steps": Num(lo=1, integer=True),
    "grad_clip": Num(lo=0, lo_open=True, optional=True, null_means="no clipping"),
    "max_steps": Num(lo=1, integer=True, optional=True), "num_epochs": Num(lo=1, integer=True, optional=True),
    "ema_decay": Num(0, 1, lo_open=True, hi_open=True, optional=True, null_means="no EMA"),
    "unfreeze_backbone_at_epoch": Num(lo=0, integer=True, optional=True),
    "latent_loss_weight": Num(lo=0), "clean_text_prob": Num(0, 1), "clean_latent_prob": Num(0, 1),
    "latent_drop_prob": Num(0, 1), "auxiliary_ce_weight": Num(lo=0),
    "latent_recon_weight": Num(lo=0), "stop_at_step": Num(lo=1, integer=True, optional=True),
    "max_bad_steps": Num(lo=0, integer=True), "grad_checkpointing": Flag(), "resume_any_world_size": Flag(),
}
LOGGING_OPTIONS = {
    "log_freq": Num(lo=1, integer=True), "eval_freq": Num(lo=0, integer=True),
    "save_every": Num(lo=1, integer=True, optional=True, null_means="at epoch ends only"),
    "save_epochs": Flag(), "keep_last": Num(lo=1, integer=True, optional=True, null_means="keep every checkpoint"),
    "wandb": Flag(), "progress_bar": Flag(),
}
EVAL_OPTIONS = {
    "max_batches": Num(lo=1, integer=True, optional=True, null_means="all"), "mc_samples": Num(lo=1, integer=True),
    "sample_steps": Num(lo=1, integer=True), "threshold": Num(0, 1, optional=True),
    "latent_steps": Num(lo=1, integer=True), "fresh": Flag(),
}


def value_tables() -> dict:
    """Each config group's table of typed options (each lives with the module that reads it)."""
    from ..data.sources import OPTIONS as DATA
    from ..diffusion.continuous_diffusion import OPTIONS as LATENT_NOISE
    from ..diffusion.diffusion_process import OPTIONS as TEXT_NOISE
    from ..diffusion.chunks import OPTIONS as CHUNKS
    from ..models.rwkv_denoiser import OPTIONS as MODEL
    from .optimizer import OPTIONS as OPTIMIZER
    return {"training": TRAINING_OPTIONS, "logging": LOGGING_OPTIONS, "eval": EVAL_OPTIONS, "optimizer": OPTIMIZER,
            "text_noise": TEXT_NOISE, "latent_noise": LATENT_NOISE, "model": {**MODEL, **CHUNKS}, "data": DATA}


def _check_values(cfg: DictConfig) -> None:
    """Every number and flag of every group: its type and range."""
    for group, options in value_tables().items():
        if group == "model" and (cfg.model.vocab_size is None or cfg.model.mask_id is None):
            options = {k: v for k, v in options.items() if k not in ("vocab_size", "mask_id")}  # the tokenizer's
        check_options(group, cfg[group], options)


def check_overrides(cfg: DictConfig, keys) -> None:
    """The typed options among ``keys`` (dotted, e.g. ``eval.mc_samples``), as ``cfg`` holds them:
    what a command changes in a checkpoint's saved config is checked like a training config."""
    tables = value_tables()
    for key in keys:
        group, _, name = key.partition(".")
        spec = tables.get(group, {}).get(name)
        if spec is not None:
            spec.check(key, OmegaConf.select(cfg, key))


def _check_model(cfg: DictConfig, arch) -> None:
    """The arch's own checks, and the keys of other archs left unset."""
    from ..models.rwkv_denoiser import ARCHS
    from .builders import model_keys
    m = cfg.model
    for other in ARCHS.values():
        if other is arch:
            continue
        set_keys = [k for k in other.keys if m.get(k) is not None and k in m]
        if set_keys:
            shown = ", ".join(f"model.{k}={m[k]!r}" for k in set_keys)
            what = " / ".join(f"model.{k}" for k in other.keys)
            raise ConfigError(f"{shown} set: {what} {'is' if len(other.keys) == 1 else 'are'} read by "
                              f"model.arch={other.name} only (model.arch={m.arch}): set model.arch={other.name}, "
                              f"or leave {'it' if len(other.keys) == 1 else 'them'} null"
                              + (" (model=scratch)" if other.pretrained_key in set_keys else ""))
    if m.freeze_backbone and arch.pretrained_key is None:
        raise ConfigError(f"model.arch={m.arch} is trained from scratch: set model.freeze_backbone=false")
    try:
        arch.check(model_keys(m))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_across(cfg: DictConfig, arch, mixer, source) -> None:
    """Rules that join the model, the objective, the tokenizer and the data."""
    from ..models.mixers import MIXERS
    from ..data.sources import DATA_SOURCES
    from .builders import model_keys
    m, tr, d = cfg.model, cfg.training, cfg.data
    if tr.objective == "ar":
        if not mixer.autoregressive:
            ar_mixers = ", ".join(n for n, c in MIXERS.items() if c.autoregressive)
            raise ConfigError(f"training.objective=ar predicts the next token from the tokens before it: "
                              f"set model.mixer={ar_mixers} (got model.mixer={m.mixer!r}, which reads ahead)")
        if m.latent_prefix_len:
            raise ConfigError("training.objective=ar is a text-only baseline: set model.latent_prefix_len=0")
    if tr.objective == "embedding" and not source.likelihood:
        raise ConfigError(f"training.objective=embedding is a language-model baseline on text; data.kind={d.kind} "
                          "is scored by decoding tasks: use data=text (or data=simple with "
                          "model.latent_prefix_len=0)")
    if tr.get("auxiliary_ce_weight") and tr.objective != "embedding":
        raise ConfigError(f"training.auxiliary_ce_weight={tr.auxiliary_ce_weight} adds the cross-entropy of the "
                          "rounded x0 prediction of embedding diffusion (training.objective=embedding); "
                          f"training.objective={tr.objective} already trains its text by cross-entropy: set it to 0")
    if cfg.tokenizer.name == "chars" and not source.chars:
        kinds = " or ".join(f"data.kind={k}" for k, s in DATA_SOURCES.items() if s.chars)
        raise ConfigError(f"tokenizer.name=chars builds its vocabulary from a corpus: use it with {kinds}")
    if cfg.text_noise.sft and not source.conversations:
        raise ConfigError(f"text_noise.sft=true trains answers to prompts: it needs conversation data (data=sft "
                          f"data.path=<file>), not data.kind={d.kind}")
    if source.needs_tokenizer and not cfg.tokenizer.name:
        raise ConfigError(f"data.kind={d.kind} tokenizes its text: set tokenizer.name (chars, bytes, "
                          "BlinkDL/rwkv7-g1 or a Hugging Face tokenizer)")
    if m.latent_prefix_len and not source.latents:
        raise ConfigError(f"data.kind={d.kind} has no sentence latents: set model.latent_prefix_len=0")
    if not source.likelihood and tr.objective != "ar":
        from ..diffusion.diffusion_process import undecodable_noise
        why = undecodable_noise(cfg.text_noise.noise_type)
        if why:
            raise ConfigError(f"data.kind={d.kind} is scored by decoding its tasks, and {why}")
    if source.endless and not tr.max_steps:
        raise ConfigError(f"data.kind={d.kind} is an endless stream: set training.max_steps")
    if m.get("chunk_size") is not None:
        _check_chunks(m, arch)
    if d.get("order") == "stream":
        _check_stream(cfg, arch)
    if arch.accepts(m.mixer):
        multiple, key = arch.length_multiple(model_keys(m)), arch.length_key(model_keys(m))
        if key is not None and isinstance(multiple, int) and multiple > 0 and d.seq_len % multiple:
            raise ConfigError(f"model.{key}={multiple} does not divide data.seq_len={d.seq_len}: the model reads "
                              "the text in blocks of that size; choose a block size that divides the "
                              "sequence length")


def _check_chunks(m: DictConfig, arch) -> None:
    """``model.chunk_size``: a left-to-right mixer with a state, and chunks of whole blocks."""
    from .builders import model_keys
    if not arch.carries_state(m.mixer):
        raise ConfigError(f"model.chunk_size={m.chunk_size}: model.mixer={m.mixer} with model.arch={m.arch} reads "
                          f"the whole sequence at once, so no state carries one chunk into the next: use "
                          f"model.arch=rwkv7 with model.mixer={_stateful_mixers()} (or leave model.chunk_size null)")
    if m.get("latent_projector") not in (None, "none"):
        raise ConfigError(f"model.chunk_size={m.chunk_size} with model.latent_projector={m.latent_projector}: a "
                          "learned projection is trained on whole windows; leave model.chunk_size null")
    multiple, key = arch.length_multiple(model_keys(m)), arch.length_key(model_keys(m))
    if key is not None and m.chunk_size % multiple:
        raise ConfigError(f"model.chunk_size={m.chunk_size} is not a multiple of model.{key}={multiple}: each "
                          f"chunk must end at a block border, where nothing flows back across; choose a "
                          f"multiple of {multiple}")


def _check_stream(cfg: DictConfig, arch) -> None:
    """``data.order=stream``: a state to carry from step to step, for text alone, on one process."""
    m = cfg.model
    if not arch.carries_state(m.mixer):
        raise ConfigError(f"data.order=stream carries the model's state from one step to the next, and model.mixer="
                          f"{m.mixer} with model.arch={m.arch} keeps none: use model.arch=rwkv7 with model.mixer="
                          f"{_stateful_mixers()}, or data.order=shuffled")
    if m.latent_prefix_len:
        raise ConfigError("data.order=stream reads the corpus as continuing text, which has no sentence latents: "
                          "set model.latent_prefix_len=0")
    check_stream_parallel(cfg.data, cfg.training.parallel)


def check_stream_parallel(d: DictConfig, parallel: str) -> None:
    """``data.order=stream`` on one process only: here for ``training.parallel`` as given, and by
    the trainer for the mode ``auto`` resolves to under torchrun."""
    if d.get("order") == "stream" and parallel in ("ddp", "fsdp"):
        raise ConfigError(f"data.order=stream carries each row's state on the process that trained it; "
                          f"training.parallel={parallel} is not supported with it: train on one process "
                          "(training.parallel=none) or use data.order=shuffled")


def _stateful_mixers() -> str:
    """The model.mixer values whose state carries across calls, for the messages."""
    from ..models.mixers import MIXERS
    return " or ".join(n for n, c in MIXERS.items() if c.carries_state)


def _check_training(cfg: DictConfig) -> None:
    tr = cfg.training
    if tr.dtype == "fp16":
        from .builders import resolve_device
        if resolve_device(tr.device).type != "cuda":
            raise ConfigError("training.dtype=fp16 trains with a gradient scaler on CUDA; on the CPU float16 "
                              "autocast is slow and its range needs that scaler: use training.dtype=bf16 (the "
                              "range of fp32, no scaler) or fp32")
    if cfg.optimizer.schedule == "wsd":
        ds = cfg.optimizer.decay_steps
        if not isinstance(ds, int) or isinstance(ds, bool) or ds < 1:
            raise ConfigError(f"optimizer.decay_steps={ds!r}: optimizer.schedule=wsd needs the number of "
                              "steps of its final linear decay, e.g. optimizer.decay_steps=50")
    if not tr.max_steps and not tr.num_epochs:
        raise ConfigError("set training.max_steps or training.num_epochs (both are null)")


def _check_dataclasses(cfg: DictConfig) -> None:
    """The dataclasses' own checks (their messages name the config keys), before any data is
    read; a vocabulary left to the tokenizer gets a stand-in here and its own check in resolve_vocab."""
    from .builders import model_config, objective_config
    m, d = cfg.model, cfg.data
    stand_in = {}
    if m.vocab_size is None or m.mask_id is None:
        stand_in = {"vocab_size": m.vocab_size or (m.mask_id or 0) + 2,
                    "mask_id": m.mask_id if m.mask_id is not None else 0}
    from ..data.sources import DATA_SOURCES
    if m.get("shift_logits") and m.get("bos_id") is None and DATA_SOURCES[d.kind].needs_tokenizer:
        stand_in["bos_id"] = 0
    try:
        objective_config(cfg.training)
        model_config(cfg, **stand_in)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    positions = d.seq_len + bool(m.get("shift_logits"))     # shift_logits reads one more
    if m.pos_emb_len and m.pos_emb_len < positions:
        plus = " + 1 (model.shift_logits reads one more position)" if positions > d.seq_len else ""
        raise ConfigError(f"model.pos_emb_len={m.pos_emb_len} is shorter than data.seq_len={d.seq_len}{plus}: the "
                          f"position embedding must cover every text position; set model.pos_emb_len={positions} "
                          "(or 0 for none)")
