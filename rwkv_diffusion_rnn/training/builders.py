"""From a composed config (``configs/rwkv_mmdit.yaml``) to the objects a run is made of.

The only place that reads config groups into constructors: modules take plain arguments or a
small dataclass, never the config.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..diffusion.continuous_diffusion import GaussianDiffusion
from ..diffusion.diffusion_process import MaskedDiffusion
from ..diffusion.chunks import Carry, Chunking
from ..diffusion.embedding_diffusion import EmbeddingDiffusionObjective
from ..diffusion.objective import AutoregressiveObjective, DiffusionObjective, ObjectiveConfig
from ..data.sources import data_source, named_tokenizer
from ..models.archs import arch_of
from ..models.mixers import MIXERS, option_defaults
from ..models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from ..weights.pretrained_rwkv import pretrained_loader
from ..common.errors import ConfigError, ProjectError
from .optimizer import build_optimizer, build_scheduler


DEVICES = ("auto", "cpu", "cuda")                             # training.device (or cuda:N)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}        # training.dtype


def autocast(device: torch.device, dtype: str):
    """The autocast region of ``training.dtype`` on ``device``; fp32 turns autocast off."""
    if AUTOCAST_DTYPES[dtype] is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def resolve_device(name: str) -> torch.device:
    """``training.device``: auto | cpu | cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible; use training.device=cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- model


def denoiser_config(m: DictConfig, **replace) -> DenoiserConfig:
    """``DenoiserConfig`` from the ``model`` group: each dataclass field from the key of its name
    (or from ``replace``; a key a checkpoint's saved config predates takes the field's default, the
    value its model was built with); the options of the chosen mixer that are no field (a mixer
    added beside the built-in ones) from ``model.<option>`` when set."""
    values = {}
    for f in dataclasses.fields(DenoiserConfig):
        if f.name == "mixer_options":
            continue
        if f.name not in replace and f.name not in m:
            continue
        v = replace[f.name] if f.name in replace else m[f.name]
        if isinstance(f.default, float) and v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"model.{f.name}={v!r} must be a number") from None
        values[f.name] = v
    extra = set(option_defaults(values["mixer"])) - _DENOISER_FIELDS if values["mixer"] in MIXERS else set()
    values["mixer_options"] = {k: m[k] for k in sorted(extra) if k in m}
    return DenoiserConfig(**values)


_DENOISER_FIELDS = {f.name for f in dataclasses.fields(DenoiserConfig)}


def model_keys(m: DictConfig) -> dict:
    """The ``model.*`` keys as a plain dict (what an arch's build and checks read)."""
    return OmegaConf.to_container(m, resolve=True)


def build_model(cfg: DictConfig) -> MultimodalRWKVDenoiser:
    """The denoiser of ``model.arch`` (its registry entry builds the backbone)."""
    m = cfg.model
    keys = model_keys(m)
    arch = arch_of(m.arch)
    try:
        backbone = arch.build(keys, pretrained_loader(arch))
    except ProjectError:
        raise          # e.g. a CheckpointError naming the weights file
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rows = backbone.config.vocab_size
    if arch.pretrained_key and keys.get(arch.pretrained_key) and m.vocab_size > rows:
        tok = f", tokenizer.name={cfg.tokenizer.name}" if cfg.tokenizer.name else ""
        where = f"model.{arch.pretrained_key}={keys[arch.pretrained_key]!r}"
        raise ConfigError(f"the vocabulary (model.vocab_size={m.vocab_size}{tok}) does not fit the embedding of "
                          f"{where} ({rows} rows): use that checkpoint's tokenizer (tokenizer.name="
                          f"{keys[arch.pretrained_key]}) or weights with a vocabulary of at least {m.vocab_size}")
    return MultimodalRWKVDenoiser(backbone, model_config(cfg))


def model_config(cfg: DictConfig, **replace) -> DenoiserConfig:
    """The ``DenoiserConfig`` of a run: the ``model`` group, and the text head the objective reads
    (``training.objective=embedding``: predicted embeddings)."""
    return denoiser_config(cfg.model, embedding_output=cfg.training.objective == "embedding", **replace)


# ---------------------------------------------------------------------------------------------- diffusion


def build_text_diffusion(cfg: DictConfig) -> MaskedDiffusion:
    n = cfg.text_noise
    return MaskedDiffusion(
        schedule=n.schedule, mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size,
        schedule_kwargs=dict(n.schedule_kwargs or {}), noise_type=n.noise_type,
        min_masking_rate=n.min_masking_rate, span_prob=n.span_prob,
        mean_span_length=n.mean_span_length, truncate_prob=n.truncate_prob,
        loss_type=n.loss_type, label_smoothing=n.label_smoothing, reweight_cap=n.reweight_cap,
        low_discrepancy=n.low_discrepancy)


def build_latent_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    n = cfg.latent_noise
    return GaussianDiffusion(schedule=n.schedule, min_noise_level=n.min_noise_level,
                             max_noise_level=n.max_noise_level, target=n.target,
                             num_train_steps=n.num_train_steps, low_discrepancy=n.low_discrepancy)


def build_embedding_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """``training.objective=embedding``: the ``latent_noise`` group's schedule on every position's
    embedding, the denoiser predicting x0 (what rounding reads)."""
    n = cfg.latent_noise
    return GaussianDiffusion(schedule=n.schedule, min_noise_level=n.min_noise_level,
                             max_noise_level=n.max_noise_level, target="x0",
                             num_train_steps=n.num_train_steps, low_discrepancy=n.low_discrepancy)


def objective_config(tr: DictConfig) -> ObjectiveConfig:
    """``ObjectiveConfig`` from the ``training`` group."""
    return ObjectiveConfig(clean_text_prob=tr.clean_text_prob, clean_latent_prob=tr.clean_latent_prob,
                           latent_drop_prob=tr.latent_drop_prob, latent_loss_weight=tr.latent_loss_weight,
                           latent_recon_weight=float(tr.get("latent_recon_weight", 0.0)))


def build_objective(cfg: DictConfig, text: MaskedDiffusion, latent: Optional[GaussianDiffusion]):
    """``training.objective``: ``diffusion`` (text + latent), ``ar`` (next-token prediction) or
    ``embedding`` (Gaussian diffusion of the token embeddings)."""
    chunking = chunking_of(cfg.model)
    carry = Carry() if cfg.data.get("order") == "stream" else None
    if cfg.training.objective == "ar":
        return AutoregressiveObjective(chunking, carry)
    if cfg.training.objective == "embedding":
        return EmbeddingDiffusionObjective(build_embedding_diffusion(cfg),
                                           float(cfg.training.get("auxiliary_ce_weight", 0.0)),
                                           mask_id=int(cfg.model.mask_id))
    projected = cfg.model.get("latent_projector", "none") not in (None, "none")
    return DiffusionObjective(text, latent if cfg.model.latent_prefix_len else None,
                              objective_config(cfg.training), sft=bool(cfg.text_noise.sft),
                              projected_dim=int(cfg.model.latent_dim) if projected else None,
                              chunking=chunking, carry=carry)


def chunking_of(m: DictConfig) -> Optional[Chunking]:
    """``model.chunk_size`` / ``model.chunk_grad``: the training window read in chunks (or None)."""
    return None if m.get("chunk_size") is None else Chunking(int(m.chunk_size), str(m.get("chunk_grad", "full")))


# ---------------------------------------------------------------------------------------------- optimizer


def build_optimizer_and_scheduler(cfg: DictConfig, model: torch.nn.Module, total_steps: Optional[int]):
    o = cfg.optimizer
    optimizer = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                eps=o.eps, backbone_lr_mult=o.backbone_lr_mult, name=o.name,
                                decay_lr_mult=o.decay_lr_mult,
                                # only optimizer=muon configs carry these keys
                                **{k: o[k] for k in ("muon_lr", "muon_momentum", "muon_ns_steps") if k in o})
    scheduler = build_scheduler(optimizer, o.schedule, o.warmup_steps, total_steps, o.min_lr_ratio,
                                decay_steps=o.decay_steps)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------- data


def text_length_multiple(cfg: DictConfig) -> int:
    """The multiple of tokens the model reads text in (its blocks: the mixer's block option, or
    the block attention of an attention arch); 1 for any length."""
    return arch_of(cfg.model.arch).length_multiple(model_keys(cfg.model))


def build_data(cfg: DictConfig, tokenizer=None):
    """The loader of ``data.kind`` (its :mod:`~rwkv_diffusion_rnn.data.sources` entry).
    ``tokenizer``: one to use instead of ``tokenizer.name`` (a checkpoint's)."""
    tr = cfg.training
    source = data_source(cfg.data.kind)
    if source.vocabulary is None and tokenizer is None:
        tokenizer = named_tokenizer(cfg)
    return source.build(cfg, tr.train_batch_size, tr.eval_batch_size, cfg.seed, tokenizer,
                        length_multiple=text_length_multiple(cfg))


def resolve_vocab(cfg: DictConfig, data) -> None:
    """Fills ``model.vocab_size`` / ``model.mask_id`` left null from the data's vocabulary (the
    tokenizer's, or the data source's own) and refuses values that contradict it; with
    ``model.shift_logits`` a null ``model.bos_id`` becomes the tokenizer's end of text."""
    m = cfg.model
    source = data_source(cfg.data.kind)
    if source.vocabulary is not None:
        want, source = source.vocabulary(), f"data.kind={cfg.data.kind} (its own vocabulary)"
    elif getattr(data, "tokenizer", None) is not None:
        tok = data.tokenizer
        want, source = (int(tok.vocab_size), int(tok.mask_id)), f"tokenizer.name={cfg.tokenizer.name}"
    else:
        if m.vocab_size is None or m.mask_id is None:
            raise ConfigError("model.vocab_size and model.mask_id are null and no tokenizer.name gives them: "
                              "set tokenizer.name, or both keys")
        want = None
    if want is not None:
        for key, value in zip(("vocab_size", "mask_id"), want):
            if m[key] is None:
                m[key] = value
            elif m[key] != value:
                raise ConfigError(f"model.{key}={m[key]} contradicts {source}, whose {key} is {value}: "
                                  f"set model.{key}={value} or leave it null to follow the tokenizer")
    tok = getattr(data, "tokenizer", None)
    if m.get("bos_id") is None and m.get("shift_logits") and tok is not None:
        m.bos_id = int(tok.eos_id)        # the document separator: what an AR model reads first
    try:
        denoiser_config(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
