"""From a composed config (``configs/rwkv_mmdit.yaml``) to the objects a run is made of.

The only place that reads config groups into constructors: modules take plain arguments or a
small dataclass, never the config.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from omegaconf import DictConfig

from ..diffusion.continuous_diffusion import GaussianDiffusion
from ..diffusion.diffusion_process import MaskedDiffusion
from ..diffusion.objective import AutoregressiveObjective, DiffusionObjective, ObjectiveConfig
from ..models.rwkv_denoiser import DenoiserConfig, MultimodalRWKVDenoiser
from ..weights.pretrained_rwkv import build_denoiser
from ..common import rng
from ..common.errors import ConfigError
from .optimizer import build_optimizer, build_scheduler


DEVICES = ("auto", "cpu", "cuda")                             # training.device (or cuda:N)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}        # training.dtype
DATA_KINDS = ("text_latent", "synthetic", "text", "sft")         # data.kind


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
    (or from ``replace``)."""
    values = {}
    for f in dataclasses.fields(DenoiserConfig):
        v = replace[f.name] if f.name in replace else m[f.name]
        values[f.name] = float(v) if isinstance(f.default, float) else v
    return DenoiserConfig(**values)


def build_model(cfg: DictConfig) -> MultimodalRWKVDenoiser:
    m = cfg.model
    if m.arch == "transformer":
        from ..models.transformer import Transformer, TransformerConfig
        backbone = Transformer(TransformerConfig(vocab_size=m.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd,
                                                 n_head=m.n_embd // m.head_size))
        return MultimodalRWKVDenoiser(backbone, denoiser_config(m))
    if m.arch == "qwen3":
        from ..models.qwen3 import load_qwen3
        try:
            backbone = load_qwen3(m.qwen3_name, cache_dir=m.cache_dir, local_files_only=m.local_files_only)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rows = backbone.config.vocab_size
        if m.vocab_size > rows:
            tok = f", tokenizer.name={cfg.tokenizer.name}" if cfg.tokenizer.name else ""
            raise ConfigError(f"the vocabulary (model.vocab_size={m.vocab_size}{tok}) does not fit the Qwen3 "
                              f"embedding of model.qwen3_name="
                              f"{m.qwen3_name!r} ({rows} rows): use that checkpoint's tokenizer "
                              f"(tokenizer.name={m.qwen3_name}) or a Qwen3 with a vocabulary of at least "
                              f"{m.vocab_size}")
        return MultimodalRWKVDenoiser(backbone, denoiser_config(m))
    if m.arch == "hybrid":
        from ..models.hybrid import Hybrid, HybridConfig, attention_layers
        layers = attention_layers(m.n_layer, m.attn_layers, m.attn_every)
        backbone = Hybrid(HybridConfig(vocab_size=m.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd,
                                       head_size=m.head_size, attn_layers=layers, wkv_backend=m.wkv_backend))
        return MultimodalRWKVDenoiser(backbone, denoiser_config(m))
    return build_denoiser(denoiser_config(m), rwkv_name=m.rwkv_name, rwkv_filename=m.rwkv_filename,
                          rwkv_revision=m.rwkv_revision, cache_dir=m.cache_dir,
                          local_files_only=m.local_files_only, n_layer=m.n_layer or 2,
                          n_embd=m.n_embd or 128, head_size=m.head_size or 32,
                          wkv_backend=m.wkv_backend)


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


def objective_config(tr: DictConfig) -> ObjectiveConfig:
    """``ObjectiveConfig`` from the ``training`` group."""
    return ObjectiveConfig(clean_text_prob=tr.clean_text_prob, clean_latent_prob=tr.clean_latent_prob,
                           latent_drop_prob=tr.latent_drop_prob, latent_loss_weight=tr.latent_loss_weight)


def build_objective(cfg: DictConfig, text: MaskedDiffusion, latent: Optional[GaussianDiffusion]):
    """``training.objective``: ``diffusion`` (text + latent) or ``ar`` (next-token prediction)."""
    if cfg.training.objective == "ar":
        return AutoregressiveObjective()
    return DiffusionObjective(text, latent if cfg.model.latent_prefix_len else None,
                              objective_config(cfg.training), sft=bool(cfg.text_noise.sft))


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


class SyntheticData:
    """An endless stream of synthetic-task batches; its position is a generator state."""

    def __init__(self, cfg: DictConfig, batch_size: int, seed: int):
        from ..data.tasks import make_task
        d = cfg.data
        self.task = make_task(d.task, seq_len=d.seq_len, struct_len=d.struct_len, seed=seed)
        self.batch_size = batch_size
        self.gen = rng.generator("task_examples", seed)
        self.eval_set = self.task.fixed_eval_set(n=d.eval_size, seed=d.eval_seed)
        self.epoch = 0
        self.at_epoch_end = False           # an endless stream has no epochs

    def epoch_batches(self):
        while True:
            b = self.task.sample_batch(self.batch_size, generator=self.gen)
            yield {"input_ids": b.input_ids, "maskable": b.maskable, "attention_mask": b.attention_mask}

    def state(self):
        return {}, {"data_rng": self.gen.get_state()}

    def load(self, state, tensors):
        self.gen.set_state(tensors["data_rng"])


class _EpochData:
    """A resumable training loader ``self.train`` (epochs, position) and a validation set ``self.val``."""

    @property
    def epoch(self):
        return self.train.epoch

    @property
    def at_epoch_end(self):
        return self.train.at_epoch_end

    def epoch_batches(self):
        """The rest of the current epoch."""
        return iter(self.train)

    def state(self):
        return {"loader": self.train.state_dict()}, {}

    def load(self, state, tensors):
        self.train.load_state_dict(state["loader"])


class TextLatentData(_EpochData):
    """Tokenized text (+ latents) from disk: a resumable training loader and a validation loader."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer):
        from ..data.data_simple import build_dataloaders
        d = cfg.data
        self.tokenizer = tokenizer          # None: batches are padded with id 0
        self.train, self.val = build_dataloaders(
            token_dir=d.token_dir, latent_dir=d.latent_dir, json_path=d.json_path,
            val_token_dir=d.val_token_dir, val_latent_dir=d.val_latent_dir,
            val_json_path=d.val_json_path, val_fraction=d.val_fraction, batch_size=batch_size,
            eval_batch_size=eval_batch_size, seq_len=d.seq_len,
            latent_dim=cfg.model.latent_dim if cfg.model.latent_prefix_len else None,
            max_samples=d.max_samples, num_workers=d.num_workers, seed=rng.seed_of("data_order", seed),
            pad_id=0 if tokenizer is None else int(tokenizer.pad_id), shuffle=d.shuffle)

    def check_vocab(self, vocab_size: int, mask_id: int) -> None:
        """Refuse token ids the model cannot embed: every token file (train and validation) is
        checked against ``vocab_size`` / ``mask_id`` when first read, and the whole validation
        split is read now, so a bad validation file is named before training, not at the final
        evaluation."""
        from ..data.data_simple import dataset_and_indices
        armed = set()
        for loader in (self.train, self.val):
            base, _ = dataset_and_indices(loader.dataset) if loader is not None else (None, None)
            if base is not None and id(base) not in armed:   # a held-out split shares its dataset
                base.arm_vocab_check(vocab_size, mask_id)
                armed.add(id(base))
        if self.val is not None:
            base, indices = dataset_and_indices(self.val.dataset)
            base.check_token_ids(indices, desc="checking validation token ids")


class CorpusData(_EpochData):
    """A text corpus (``data.kind=text``): random training windows and fixed validation windows
    over the token cache of :func:`~rwkv_diffusion_rnn.data.corpus.prepare_corpus`."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer):
        from ..data.corpus import TrainWindows, prepare_corpus
        d = cfg.data
        corpus = prepare_corpus(corpus_spec(d), tokenizer, d.cache_dir, progress=cfg.logging.progress_bar)
        self.corpus, self.tokenizer = corpus, corpus.tokenizer
        self.train = TrainWindows(corpus.train, d.seq_len, batch_size, rng.seed_of("data_order", seed),
                                  source=split_name(d, "training"))
        self.val = corpus_val_windows(d, corpus, eval_batch_size)


class SFTData(_EpochData):
    """Conversations (``data=sft``): every assistant turn an example (:mod:`~rwkv_diffusion_rnn.data.sft`)."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer):
        from ..data import sft
        d, m = cfg.data, cfg.model
        self.template = chat_template(d)
        if d.path:
            convs = sft.read_conversations(d.path)
        else:
            convs = sft.hf_conversations(d.hf_dataset, d.hf_config, d.hf_split)
        source = d.path or f"data.hf_dataset={d.hf_dataset}"
        if d.val_path:
            val_convs = sft.read_conversations(d.val_path)
        else:
            n_val = int(len(convs) * float(d.val_fraction))
            convs, val_convs = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
        if tokenizer == "chars":
            from ..data.tokenizer import CharTokenizer
            tokenizer = CharTokenizer.from_text(sft.rendered_texts([*convs, *val_convs], self.template))
        self.tokenizer = tokenizer
        multiple = int(m.block_size) if m.mixer == "block_causal" or m.get("block_attention") else 1
        train, counts = sft.examples_of(convs, tokenizer, self.template, int(d.seq_len))
        val, val_counts = sft.examples_of(val_convs, tokenizer, self.template, int(d.seq_len))
        for name, c in (("training", counts), ("held-out", val_counts)):
            if c["dropped"] or c["cut"]:
                print(f"{source}, {name} examples: {c['dropped']} dropped (prompt alone longer than data.seq_len="
                      f"{d.seq_len}), {c['cut']} answers cut to fit; {c['examples']} kept")
        eos = int(tokenizer.eos_id)
        self.train = sft.SFTBatches(train, batch_size, rng.seed_of("data_order", seed), eos, multiple, source=source)
        self.val = sft.SFTEvalBatches(val, eval_batch_size, eos, multiple) if val else None


def chat_template(d: DictConfig):
    """``ChatTemplate`` of ``data.chat_template``."""
    from ..data.sft import ChatTemplate
    try:
        return ChatTemplate(**dict(d.chat_template))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def split_name(d: DictConfig, split: str) -> str:
    """How errors name a split of the corpus: by its source."""
    source = d.path or f"data.hf_dataset={d.hf_dataset}"
    if split == "validation" and d.val_path:
        return f"the validation text {d.val_path} (data.val_path)"
    if split == "validation":
        return f"the validation split of {source} (its last data.val_fraction={d.val_fraction})"
    return f"the training split of {source}"


def corpus_val_windows(d: DictConfig, corpus, batch_size: int):
    """The fixed validation windows of a prepared corpus (None when it has no validation split)."""
    from ..data.corpus import ValWindows
    if corpus.val is None:
        return None
    return ValWindows(corpus.val, d.seq_len, batch_size, source=split_name(d, "validation"))


def corpus_spec(d: DictConfig):
    """``CorpusSpec`` from the ``data`` group (``data=text``)."""
    from ..data.corpus import CorpusSpec
    return CorpusSpec(path=d.path, text_field=d.text_field, val_path=d.val_path,
                      val_fraction=float(d.val_fraction), hf_dataset=d.hf_dataset, hf_config=d.hf_config,
                      hf_split=d.hf_split)


def load_named_tokenizer(cfg: DictConfig):
    """The tokenizer ``tokenizer.name`` names (None when it names none). ``chars`` has no
    vocabulary before it meets a corpus, so it stays the string ``"chars"`` here."""
    t = cfg.tokenizer
    if not t.name:
        return None
    if t.name == "chars":
        return "chars"
    from ..data.tokenizer import load_tokenizer
    try:
        return load_tokenizer(t.name, revision=t.revision, cache_dir=t.cache_dir,
                              local_files_only=t.local_files_only, trust_remote_code=t.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer.name={t.name!r} cannot be loaded: {e}") from e


def build_data(cfg: DictConfig, tokenizer=None):
    """``data.kind``: ``synthetic`` (the tasks), ``text_latent`` (tokenized files + latents) or
    ``text`` (a corpus). ``tokenizer``: one to use instead of ``tokenizer.name`` (a checkpoint's)."""
    tr = cfg.training
    if cfg.data.kind == "synthetic":
        return SyntheticData(cfg, tr.train_batch_size, cfg.seed)
    tokenizer = tokenizer if tokenizer is not None else load_named_tokenizer(cfg)
    if cfg.data.kind == "text":
        return CorpusData(cfg, tr.train_batch_size, tr.eval_batch_size, cfg.seed, tokenizer)
    if cfg.data.kind == "sft":
        return SFTData(cfg, tr.train_batch_size, tr.eval_batch_size, cfg.seed, tokenizer)
    return TextLatentData(cfg, tr.train_batch_size, tr.eval_batch_size, cfg.seed, tokenizer)


def resolve_vocab(cfg: DictConfig, data) -> None:
    """Fills ``model.vocab_size`` / ``model.mask_id`` left null from the data's vocabulary (the
    tokenizer's, or the synthetic task's) and refuses values that contradict it."""
    m = cfg.model
    if cfg.data.kind == "synthetic":
        from ..data.tasks import VOCAB
        want, source = (VOCAB.vocab_size, VOCAB.mask_id), "data.kind=synthetic (the task vocabulary)"
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
    try:
        denoiser_config(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
