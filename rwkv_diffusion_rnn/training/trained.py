"""A trained model as its checkpoint rebuilds it: for ``evaluate``, ``generate`` and eval scripts.

``checkpoint`` is a checkpoint directory or a run's ``logging.save_dir`` (its newest checkpoint).
The checkpoint is verified against its manifest, its saved ``config.yaml`` (with ``key=value``
overrides) rebuilds the model, its ``tokenizer.json`` the tokenizer, and the EMA weights are
used when the checkpoint has them (training evaluates the EMA too).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from . import checkpoints as ckpt
from ..common.errors import ConfigError


@dataclass
class Trained:
    path: Path                  # the checkpoint directory
    cfg: DictConfig             # its config.yaml, with the overrides applied
    tokenizer: Any              # from tokenizer.json (None for a synthetic-task run)
    model: torch.nn.Module      # in eval mode, on ``device``
    step: Optional[int]
    weights: str                # "ema" or "model"
    device: torch.device

    @property
    def objective(self) -> str:
        return self.cfg.training.objective


def checkpoint_dir(path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest checkpoint of the run folder."""
    path = Path(path)
    if (path / ckpt.MANIFEST).is_file():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        why = "is neither a checkpoint nor a run folder holding one" if path.is_dir() else "does not exist"
        raise ckpt.CheckpointError(f"checkpoint={path} {why}; pass a checkpoint directory "
                                   f"(e.g. <logging.save_dir>/step_0002000) or the run's logging.save_dir")
    return latest


def saved_config(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The checkpoint's ``config.yaml`` with ``key=value`` overrides (unknown keys refused).

    Trust is the user's, per command: the saved ``tokenizer.trust_remote_code`` is never used.
    A checkpoint whose config asks for it is refused unless the overrides (the user's command line)
    say ``tokenizer.trust_remote_code=true``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    file = path / ckpt.CONFIG_FILE
    if not file.is_file():
        raise ckpt.CheckpointError(f"{path} has no {ckpt.CONFIG_FILE}: the model and data it was trained on "
                                   "cannot be rebuilt; use a checkpoint the trainer wrote")
    cfg = ckpt.parse_config_file(file)  # invalid YAML is a CheckpointError naming the file
    asked = OmegaConf.select(cfg, "tokenizer.trust_remote_code") not in (None, False)
    if OmegaConf.select(cfg, "tokenizer") is not None:
        cfg.tokenizer.trust_remote_code = False
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. eval.mc_samples=8)")
        try:
            OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), merge=False)
        except OmegaConfBaseException:
            raise ConfigError(f"{key}: no such key in {file} (the saved config of this checkpoint)") from None
    from .config_validation import check_overrides
    check_overrides(cfg, [item.partition("=")[0] for item in overrides])
    if asked and OmegaConf.select(cfg, "tokenizer.trust_remote_code") is not True:
        raise ckpt.CheckpointError(
            f"{file} sets tokenizer.trust_remote_code: true, which would run Python code that comes with the "
            f"checkpoint's tokenizer ({OmegaConf.select(cfg, 'tokenizer.name')}); a saved file never turns that "
            f"on. If you trust {path} and that code, pass tokenizer.trust_remote_code=true on the command line "
            "(generate / chat: trust_remote_code=true)")
    return cfg


def resolve_tokenizer_spec(path: Path, spec: dict) -> dict:
    """``spec`` with the files a model folder keeps (``in_checkpoint``: its ``vocab_file`` or
    Hugging Face folder ``name`` relative to the folder) made paths inside ``path``."""
    if not spec.get("in_checkpoint"):
        return spec
    spec = dict(spec)
    keys = (["vocab_file"] if spec.get("vocab_file") else []) + (["name"] if spec.get("kind") == "hf" else [])
    for key in keys:
        value = str(spec[key])
        if Path(value).is_absolute() or ".." in Path(value).parts:
            raise ckpt.CheckpointError(f"{path / ckpt.TOKENIZER_FILE}: {key}={value!r} must be a path inside the "
                                       "folder (in_checkpoint)")
        spec[key] = str(path / value)
    return spec


def local_tokenizer_paths(spec: dict) -> list:
    """The files or folders on this machine that a tokenizer spec reads (an RWKV World vocabulary
    file, a Hugging Face tokenizer folder); a Hub name or a built-in vocabulary reads none."""
    import os
    paths = []
    if spec.get("vocab_file"):
        paths.append(str(spec["vocab_file"]))
    name = str(spec.get("name") or "")
    if spec.get("kind") == "hf" and (os.path.isabs(name) or name.startswith(("./", "../", "~")) or Path(name).exists()):
        paths.append(name)
    return paths


def check_tokenizer_paths(path: Path, spec: dict, allowed: Sequence[str] = ()) -> None:
    """A saved tokenizer spec reads files only inside the checkpoint or at a path the user gave
    on this command line (``allowed``): a saved file does not choose what is read elsewhere."""
    inside = path.resolve()
    granted = {Path(p).expanduser().resolve() for p in allowed if p}
    for p in local_tokenizer_paths(spec):
        target = Path(p).expanduser().resolve()
        if target == inside or inside in target.parents or target in granted:
            continue
        raise ckpt.CheckpointError(
            f"{path / ckpt.TOKENIZER_FILE} points the tokenizer at {p}, outside the checkpoint; a saved file "
            f"does not choose what is read from this machine. If you trust that tokenizer, pass "
            f"tokenizer.name={p} on the command line (generate / chat: tokenizer_path={p})")


def saved_tokenizer(path: Path, cfg: DictConfig, allowed_paths: Sequence[str] = ()):
    """The tokenizer of ``tokenizer.json``; without that file, the one ``tokenizer.name`` names
    (a text corpus's chars vocabulary cannot be rebuilt that way, so such a checkpoint is refused).
    ``allowed_paths``: local tokenizer paths the user gave (:func:`check_tokenizer_paths`)."""
    from ..data.tokenizer import tokenizer_from_spec
    from ..data.sources import data_source, named_tokenizer
    spec = ckpt.read_tokenizer_spec(path)
    if spec is None:
        source = data_source(cfg.data.kind)
        if source.vocabulary is not None:
            return None             # the data's own vocabulary (e.g. the synthetic tasks')
        if not source.tokenizer_from_name:
            raise ckpt.CheckpointError(
                f"{path} has no {ckpt.TOKENIZER_FILE}: its data cannot be tokenized as in training (a "
                "chars vocabulary comes from the training text). Use a checkpoint the trainer wrote, "
                f"or copy {ckpt.TOKENIZER_FILE} from another checkpoint of the same run")
        return named_tokenizer(cfg)
    spec = resolve_tokenizer_spec(path, spec)
    check_tokenizer_paths(path, spec, allowed_paths)
    t = cfg.tokenizer
    try:
        return tokenizer_from_spec(spec, cache_dir=t.cache_dir, local_files_only=True,
                                   trust_remote_code=t.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path / ckpt.TOKENIZER_FILE} cannot be loaded: {e}") from e


class _Shape:
    def __init__(self, shape):
        self.shape = shape


def _rebuild(path: Path, cfg: DictConfig):
    """The model of a checkpoint that started from pretrained weights, built from the sizes of the
    weights it holds: the pretrained file its config names is not read (nor downloaded) again, so
    a saved path cannot point loading elsewhere. None where the arch cannot (the caller builds from
    the config)."""
    from ..models.archs import arch_of
    from ..models.rwkv_denoiser import MultimodalRWKVDenoiser
    from ..weights.pretrained_rwkv import named_function
    from .builders import model_config, model_keys
    arch = arch_of(cfg.model.arch)
    if not (arch.pretrained_key and cfg.model.get(arch.pretrained_key) and arch.from_shapes):
        return None
    shapes = ckpt.weight_shapes(path)
    if shapes is None:
        return None
    backbone_shapes = {k[len("backbone."):]: _Shape(v) for k, v in shapes.items() if k.startswith("backbone.")}
    backbone = named_function(arch.from_shapes)(backbone_shapes, model_keys(cfg.model), str(path / ckpt.MODEL_FILE))
    return MultimodalRWKVDenoiser(backbone, model_config(cfg))


def load_trained(checkpoint, overrides: Sequence[str] = (), device: Optional[str] = None,
                 trust_remote_code: bool = False, tokenizer_path: Optional[str] = None) -> Trained:
    """Verify, rebuild and load ``checkpoint`` (see the module docstring). ``device`` overrides
    the run's ``training.device``; ``trust_remote_code``: the user's own permission to run a
    tokenizer's code (never taken from the checkpoint); ``tokenizer_path`` (or a
    ``tokenizer.name=<path>`` override): the user's permission to read a tokenizer outside it."""
    from .builders import build_model, resolve_device
    path = checkpoint_dir(checkpoint)
    ckpt.verify_checkpoint(path)
    if trust_remote_code:
        overrides = [*overrides, "tokenizer.trust_remote_code=true"]
    cfg = saved_config(path, overrides)
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("tokenizer.name=")] + [tokenizer_path]
    tokenizer = saved_tokenizer(path, cfg, allowed_paths=[p for p in given if p])
    dev = resolve_device(device or cfg.training.device)
    model = _rebuild(path, cfg) or build_model(cfg)
    ema = copy.deepcopy(model) if ckpt.has_ema(path) else None
    state, _ = ckpt.load_checkpoint(path, model=model, ema=ema, restore_rng=False)
    model = (ema if ema is not None else model).to(dev).eval()
    # a model folder (export format=folder) keeps one set of weights and says which they were
    weights = "ema" if ema is not None else state.get("weights", "model")
    return Trained(path=path, cfg=cfg, tokenizer=tokenizer, model=model, step=state.get("global_step"),
                   weights=weights if weights in ("ema", "model") else "model", device=dev)
