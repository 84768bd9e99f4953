"""What a run takes from an earlier checkpoint, and the checks that it fits.

``training.resume`` continues a run exactly: every stateful part (weights, EMA, optimizer, LR
schedule, data position, noise stream, log accumulators) comes back, so a resumed run logs the
losses the uninterrupted run would have. It needs the settings the checkpoint's state depends on
(:data:`RESUME_KEYS`), its tokenizer and its world size.

``training.init_from`` starts a new run from a checkpoint's weights (and EMA when it kept one)
only: the optimizer, schedule, data position and step start fresh. Its data is read with the
checkpoint's tokenizer, so that ids mean the same text, and the ``model.*`` / ``tokenizer.*``
keys the command line does not give come from the checkpoint (:func:`take_init_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..common.errors import CheckpointError, ConfigError
from . import checkpoints as ckpt


# Settings that make a run what it is, which a resumed run shares with its checkpoint: the weights'
# shapes, what is trained (the objective, its row roles, the noise), on which data, and the
# batches the saved data position counts (another batch size would not continue the same epoch).
RESUME_KEYS = ("model", "training.objective", "training.clean_text_prob", "training.clean_latent_prob",
               "training.latent_drop_prob", "training.train_batch_size", "training.grad_accum_steps",
               "text_noise", "latent_noise", "data")
# Inside those, keys about where and how the data is read, not what it is: they may change.
RESUME_FREE = ("data.cache_dir", "data.num_workers")
# The groups whose other keys (learning rate, steps, logging, evaluation) may change on resume:
# they take effect from the resumed step, and the change is recorded (config_changes).
CHANGEABLE = ("optimizer", "training", "logging", "eval")


# ------------------------------------------------------------------ training.init_from

def init_source(source) -> Path:
    """The verified checkpoint ``training.init_from`` names (a checkpoint or a run folder)."""
    from .trained import checkpoint_dir
    path = checkpoint_dir(source)
    ckpt.verify_checkpoint(path)
    return path


# The groups a fine-tuning run takes from its training.init_from checkpoint: the weights' shapes
# need its model keys, and its ids need its tokenizer.
INIT_GROUPS = ("model", "tokenizer")
# Keys about this machine and about trust, which a saved file never sets: only the command line does.
LOCAL_KEYS = frozenset({"model.cache_dir", "model.local_files_only", "tokenizer.cache_dir",
                        "tokenizer.local_files_only", "tokenizer.trust_remote_code"})


def given_keys(overrides: Sequence[str]) -> Set[str]:
    """The config keys Hydra ``overrides`` set by name (``model.n_layer=2``, ``+model.x=1``,
    ``~model.x``); a group choice (``model=scratch``) names no key."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "." in key and "@" not in key and "/" not in key:
            keys.add(key)
    return keys


def take_init_config(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """With ``training.init_from`` (and no ``training.resume``), sets in ``cfg`` the checkpoint's
    saved ``model.*`` and ``tokenizer.*`` values that ``overrides`` (this run's command line) do
    not give, so a fine-tuning run needs no more than the checkpoint's name. A key the user gives
    still wins; one that cannot work with the weights or the data is refused by the checks that
    follow (the config checks, :func:`init_tokenizer`, :func:`init_weights`), naming it."""
    from .trained import checkpoint_dir
    from ..models.mixers import MIXERS, option_defaults
    tr = cfg.training
    if tr.resume or not tr.init_from:
        return
    path = checkpoint_dir(tr.init_from)
    saved = ckpt.read_saved_config(path) or {}       # verified before it is parsed
    given = given_keys(overrides)
    for group in INIT_GROUPS:
        values = saved.get(group) or {}
        mixer = values.get("mixer") if group == "model" else None
        options = set(option_defaults(mixer)) if mixer in MIXERS else set()
        for key, value in values.items():
            dotted = f"{group}.{key}"
            if dotted in LOCAL_KEYS or any(g == dotted or g.startswith(dotted + ".") for g in given):
                continue
            if key not in cfg[group] and key not in options:
                continue        # a key this version no longer reads
            with open_dict(cfg):
                OmegaConf.update(cfg, dotted, value, merge=False)


def init_tokenizer(path: Path, tokenizer_name: str):
    """The tokenizer of the ``training.init_from`` checkpoint at ``path`` (None when it has none);
    refused when its ``tokenizer.name`` is not this run's."""
    from .trained import saved_config, saved_tokenizer
    saved = saved_config(path)
    name = saved.tokenizer.name
    if name != tokenizer_name:
        raise ConfigError(f"training.init_from={path} was trained with tokenizer.name={name!r} and this "
                          f"run has tokenizer.name={tokenizer_name!r}: the ids would mean other text. "
                          f"Set tokenizer.name={name}")
    # the run's tokenizer.name (the user's, or taken from this checkpoint by naming it in
    # training.init_from) is the tokenizer the user chose to read
    return saved_tokenizer(path, saved, allowed_paths=[tokenizer_name])   # None: the data's own vocabulary


def init_weights(path: Path, *, model: torch.nn.Module, ema: Optional[torch.nn.Module],
                 model_config: Dict[str, Any]) -> str:
    """Loads the model (and ``ema``) weights of the checkpoint at ``path``; ``model_config`` is
    this run's resolved ``model`` group, for naming the keys that differ when the weights do not
    fit. An ``ema`` the checkpoint has no EMA for starts from the model's weights. Returns a line
    saying what was loaded."""
    saved = (ckpt.read_saved_config(path) or {}).get("model", {})
    has_ema = ckpt.has_ema(path)
    try:
        ckpt.load_checkpoint(path, model=model, ema=ema if has_ema else None, restore_rng=False)
    except CheckpointError as e:
        differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        keys = ", ".join(f"model.{k}={saved.get(k)!r} there, {model_config.get(k)!r} here" for k in differ)
        raise CheckpointError(
            f"training.init_from={path} does not fit this model ({keys or 'no model key differs'}): {e}") from None
    if ema is not None and not has_ema:
        ema.load_state_dict(model.state_dict())
    return (f"initialised from {path} (its step {ckpt.read_trainer_state(path).get('global_step')}): "
            f"weights{' and EMA' if ema is not None and has_ema else ''}; optimizer, schedule and data start fresh")


# ------------------------------------------------------------------ training.resume

def check_resumable(path: Path, *, config: Dict[str, Any], tokenizer: Optional[Dict[str, Any]], world: int,
                    parallel: str, any_world_size: bool) -> list:
    """Refuses a checkpoint this run cannot continue exactly: other :data:`RESUME_KEYS` in
    ``config`` (this run's resolved config), another ``tokenizer`` spec, another world size
    (unless ``any_world_size``: ``training.resume_any_world_size``), or whole weights for an
    FSDP run (``parallel``). Returns the settings that may change and did
    (:func:`changed_settings`)."""
    saved = ckpt.read_saved_config(path)     # verified before it is parsed
    if saved is not None:
        ckpt.check_config_compatible(saved, config, keys=RESUME_KEYS, checkpoint=path, ignore=RESUME_FREE,
                                     instead=f"start a new run from its weights with training.init_from={path} "
                                             "in another logging.save_dir")
    saved_tok = ckpt.read_tokenizer_spec(path)
    if saved_tok is not None and saved_tok != tokenizer:
        raise CheckpointError(
            f"{path / ckpt.TOKENIZER_FILE} holds another tokenizer than this run's ({saved_tok.get('name')!r}, "
            f"{saved_tok.get('vocab_size')} ids, against {tokenizer and tokenizer.get('name')!r}, "
            f"{tokenizer and tokenizer.get('vocab_size')} ids; a chars vocabulary follows the corpus): resume with "
            "the data and tokenizer the checkpoint was trained on, or start a new run in another logging.save_dir")
    check_world(path, world=world, parallel=parallel, any_world_size=any_world_size)
    return changed_settings(saved or {}, config)


def check_world(path: Path, *, world: int, parallel: str, any_world_size: bool) -> None:
    """A checkpoint resumes exactly only with the world size that wrote it; another one needs
    ``training.resume_any_world_size``, and a sharded checkpoint or an FSDP run the other's form."""
    state = ckpt.read_trainer_state(path)
    saved = int(state.get("world_size", 1))
    if saved != world and not any_world_size:
        raise CheckpointError(
            f"{path} was written by a run of {saved} process{'es' if saved > 1 else ''} and this run has "
            f"{world}: it would continue, but not repeat the {saved}-process run exactly (each process's "
            "random stream, and sums grouped differently). Resume with the same world size "
            f"(torchrun --nproc_per_node={saved}" + (", or without torchrun" if saved == 1 else "") +
            "), or set training.resume_any_world_size=true to continue anyway")
    if parallel == "fsdp" and not ckpt.is_sharded(path):
        raise CheckpointError(
            f"{path} holds whole weights (a training.parallel={state.get('parallel', 'none')} run) and this "
            "run shards them (training.parallel=fsdp): resume it with training.parallel=ddp or none")


def changed_settings(saved: Dict[str, Any], config: Dict[str, Any]) -> list:
    """``[(key, checkpoint's value, this run's value)]`` for the keys of :data:`CHANGEABLE` groups
    (outside :data:`RESUME_KEYS`) that this run (``config``, resolved) sets otherwise than the
    checkpoint's saved config ``saved``."""
    out = []
    for group in CHANGEABLE:
        a, b = ckpt.flatten_keys(saved.get(group) or {}, group), ckpt.flatten_keys(config.get(group) or {}, group)
        for key in sorted(set(a) | set(b)):
            if any(key == k or key.startswith(k + ".") for k in RESUME_KEYS) or key in _NOT_SETTINGS:
                continue
            if a.get(key) != b.get(key):
                out.append((key, a.get(key), b.get(key)))
    return out


# keys that name this attempt, not the run's settings
_NOT_SETTINGS = {"training.resume", "training.init_from", "training.stop_at_step", "training.resume_any_world_size",
                 "training.device", "training.parallel", "logging.save_dir"}


def restore(resume: str, path: Path, *, model, optimizer, scheduler, ema, data, noise_gen,
            rank: int, world: int, carry=None) -> Dict[str, Any]:
    """Loads the checkpoint at ``path`` (``training.resume=resume``) into the run's parts: the
    weights, optimizer, schedule, EMA, data position, this rank's noise stream and the state a
    streamed run carries into its next step (``carry``). Returns the
    saved trainer state (step, log accumulators, metrics...) for the trainer to take back.

    The optimizer's state (moments, step counts) and the schedule's position come back; its
    settings (learning rates, weight decay, betas, the schedule's shape) are this run's, so a
    learning rate changed on resume takes effect from the resumed step. With the settings
    unchanged they are the saved ones, and the run continues exactly."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    state, tensors = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in settings.items() if k != "lr"})
    scheduler.base_lrs = base_lrs
    for group, base, fn in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]   # what get_last_lr() reports
    try:
        data.load(state.get("data", {}), tensors)
    except ValueError as e:
        raise CheckpointError(f"training.resume={resume} ({path}): {e}") from None
    per_rank = tensors.get("rank_noise_rng")
    same_world = int(state.get("world_size", 1)) == world
    # clone: set_state reads a row of the stacked states from its storage's start
    noise_gen.set_state(per_rank[rank].clone() if per_rank is not None and same_world else tensors["noise_rng"])
    if carry is not None:
        carry.load(tensors)
    return state

