"""``data.kind``: where a run's batches come from, each kind one registry entry.

An entry (:class:`DataSource`) brings everything the rest of the project asks of a kind: its
config checks, its build (a resumable training loader and validation batches), the validation
batches alone (for ``evaluate``), how its vocabulary is resolved, and what a checkpoint needs to
rebuild its tokenizer. The trainer, ``evaluate``, ``training/trained.py`` and the builders ask the
entry (:func:`data_source`), never compare the kind's name. A new kind is one
:func:`register_data_source` call beside its loader (a test registers one).

Every loader a ``build`` returns has ``train`` / ``val`` (``val`` None without a validation
split), ``epoch``, ``at_epoch_end``, ``epoch_batches()``, ``state()`` -> (json-able dict, tensors)
and ``load(state, tensors)``; ``tokenizer`` when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from omegaconf import DictConfig

from ..common import rng
from ..common.checks import Flag, Num
from ..common.errors import ConfigError


class SyntheticData:
    """An endless stream of synthetic-task batches; its position is a generator state."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer=None,
                 length_multiple: int = 1):
        from .tasks import make_task
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


class EpochData:
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


class TextLatentData(EpochData):
    """Tokenized text (+ latents) from disk: a resumable training loader and a validation loader."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer,
                 length_multiple: int = 1):
        from .data_simple import build_dataloaders
        d = cfg.data
        self.tokenizer = tokenizer          # None: batches are padded with id 0
        self.train, self.val = build_dataloaders(
            token_dir=d.token_dir, latent_dir=d.latent_dir, json_path=d.json_path,
            val_token_dir=d.val_token_dir, val_latent_dir=d.val_latent_dir,
            val_json_path=d.val_json_path, val_fraction=d.val_fraction, batch_size=batch_size,
            eval_batch_size=eval_batch_size, seq_len=d.seq_len,
            latent_dim=_data_latent_dim(cfg.model) if cfg.model.latent_prefix_len else None,
            max_samples=d.max_samples, num_workers=d.num_workers, seed=rng.seed_of("data_order", seed),
            pad_id=0 if tokenizer is None else int(tokenizer.pad_id), shuffle=d.shuffle)

    def check_vocab(self, vocab_size: int, mask_id: int) -> None:
        """Refuse token ids the model cannot embed: every token file (train and validation) is
        checked against ``vocab_size`` / ``mask_id`` when first read, and the whole validation
        split is read now, so a bad validation file is named before training, not at the final
        evaluation."""
        from .data_simple import dataset_and_indices
        armed = set()
        for loader in (self.train, self.val):
            base, _ = dataset_and_indices(loader.dataset) if loader is not None else (None, None)
            if base is not None and id(base) not in armed:   # a held-out split shares its dataset
                base.arm_vocab_check(vocab_size, mask_id)
                armed.add(id(base))
        if self.val is not None:
            base, indices = dataset_and_indices(self.val.dataset)
            base.check_token_ids(indices, desc="checking validation token ids")


class CorpusData(EpochData):
    """A text corpus (``data.kind=text``): random training windows and fixed validation windows
    over the token cache of :func:`~rwkv_diffusion_rnn.data.corpus.prepare_corpus`."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer,
                 length_multiple: int = 1):
        from .corpus import StreamWindows, TrainWindows, prepare_corpus
        d = cfg.data
        corpus = prepare_corpus(corpus_spec(d), tokenizer, d.cache_dir, progress=cfg.logging.progress_bar)
        self.corpus, self.tokenizer = corpus, corpus.tokenizer
        check_not_degenerate(corpus.train, split_name(d, "training"))
        windows = StreamWindows if d.get("order", "shuffled") == "stream" else TrainWindows
        self.train = windows(corpus.train, d.seq_len, batch_size, rng.seed_of("data_order", seed),
                             source=split_name(d, "training"))
        self.val = corpus_val_windows(d, corpus, eval_batch_size)


class SFTData(EpochData):
    """Conversations (``data=sft``): every assistant turn an example (:mod:`~rwkv_diffusion_rnn.data.sft`);
    answers are padded to a multiple of ``length_multiple`` tokens (the model's blocks)."""

    def __init__(self, cfg: DictConfig, batch_size: int, eval_batch_size: int, seed: int, tokenizer,
                 length_multiple: int = 1):
        from . import sft
        d = cfg.data
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
            from .tokenizer import CharTokenizer
            tokenizer = CharTokenizer.from_text(sft.rendered_texts([*convs, *val_convs], self.template))
        self.tokenizer = tokenizer
        multiple = int(length_multiple)
        train, counts = sft.examples_of(convs, tokenizer, self.template, int(d.seq_len))
        val, val_counts = sft.examples_of(val_convs, tokenizer, self.template, int(d.seq_len))
        for name, c in (("training", counts), ("held-out", val_counts)):
            if c["dropped"] or c["cut"]:
                print(f"{source}, {name} examples: {c['dropped']} dropped (prompt alone longer than data.seq_len="
                      f"{d.seq_len}), {c['cut']} answers cut to fit; {c['examples']} kept")
        eos = int(tokenizer.eos_id)
        self.train = sft.SFTBatches(train, batch_size, rng.seed_of("data_order", seed), eos, multiple, source=source)
        self.val = sft.SFTEvalBatches(val, eval_batch_size, eos, multiple) if val else None


# Fewer distinct tokens than this in the training split (a corpus of blank lines, one repeated
# character) leave nothing to learn: the bound falls to ~0 and says nothing about the model.
MIN_DISTINCT_TOKENS = 2
_SAMPLE_TOKENS = 1 << 22        # distinct ids are counted on at most this many tokens, spread over the split


def check_not_degenerate(tokens, source: str) -> None:
    """Refuses a training split with fewer than :data:`MIN_DISTINCT_TOKENS` distinct token ids."""
    import numpy as np
    n = len(tokens)
    step = max(1, n // _SAMPLE_TOKENS)
    distinct = np.unique(np.asarray(tokens[::step])) if n else np.zeros(0)
    if len(distinct) < MIN_DISTINCT_TOKENS:
        from ..common.errors import DataFormatError
        raise DataFormatError(f"{source} holds {len(distinct)} distinct token{'s' if len(distinct) != 1 else ''} "
                              f"in {n} tokens (only blank lines or one repeated character?): a model learns "
                              f"nothing from it; train on text with at least {MIN_DISTINCT_TOKENS} distinct tokens")


def chat_template(d: DictConfig):
    """``ChatTemplate`` of ``data.chat_template``."""
    from .sft import ChatTemplate
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
    from .corpus import ValWindows
    if corpus.val is None:
        return None
    return ValWindows(corpus.val, d.seq_len, batch_size, source=split_name(d, "validation"))


def corpus_spec(d: DictConfig):
    """``CorpusSpec`` from the ``data`` group (``data=text``)."""
    from .corpus import CorpusSpec
    return CorpusSpec(path=d.path, text_field=d.text_field, val_path=d.val_path,
                      val_fraction=float(d.val_fraction), hf_dataset=d.hf_dataset, hf_config=d.hf_config,
                      hf_split=d.hf_split)


def named_tokenizer(cfg: DictConfig):
    """The tokenizer ``tokenizer.name`` names (None when it names none). ``chars`` has no
    vocabulary before it meets a corpus, so it stays the string ``"chars"`` here."""
    t = cfg.tokenizer
    if not t.name:
        return None
    if t.name == "chars":
        return "chars"
    from .tokenizer import load_tokenizer
    try:
        return load_tokenizer(t.name, revision=t.revision, cache_dir=t.cache_dir,
                              local_files_only=t.local_files_only, trust_remote_code=t.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer.name={t.name!r} cannot be loaded: {e}") from e


# ---------------------------------------------------------------------------------------------- the registry


def _no_checks(cfg: DictConfig) -> None:
    return None


@dataclass(frozen=True)
class DataSource:
    kind: str
    build: Callable[..., Any]          # (cfg, batch_size, eval_batch_size, seed, tokenizer, length_multiple)
    check: Callable[[DictConfig], None] = _no_checks   # its config checks (ConfigError naming the key)
    validation: Optional[Callable[[DictConfig, Any], Any]] = None   # (cfg, tokenizer) -> validation batches
    needs_tokenizer: bool = False      # tokenizes text: tokenizer.name must be set
    chars: bool = False                # tokenizer.name=chars builds its vocabulary from this data's text
    latents: bool = False              # its examples carry sentence latents (model.latent_prefix_len > 0)
    conversations: bool = False        # prompt / answer examples (text_noise.sft)
    endless: bool = False              # a stream without epochs: training.max_steps ends the run
    likelihood: bool = True            # scored by a likelihood (val_nelbo / val_nll); else by its task
    vocabulary: Optional[Callable[[], Tuple[int, int]]] = None   # a fixed (vocab_size, mask_id), no tokenizer
    tokenizer_from_name: bool = True   # a checkpoint without tokenizer.json rebuilds it from tokenizer.name

    def validation_batches(self, cfg: DictConfig, tokenizer):
        """The validation batches of ``cfg``'s data (what ``evaluate`` scores)."""
        if not self.likelihood:
            raise ConfigError(f"data.kind={self.kind}: a model of this data is scored by its task accuracy at "
                              "training, not by a likelihood")
        val = (self.validation(cfg, tokenizer) if self.validation is not None else
               self.build(cfg, int(cfg.training.train_batch_size), int(cfg.training.eval_batch_size),
                          cfg.seed, tokenizer).val)
        if val is None:
            raise ConfigError(f"data.kind={self.kind} has no validation split here: set data.val_fraction or the "
                              "validation path of the data (data.val_path / data.val_json_path)")
        return val


# data.kind -> its entry
DATA_SOURCES: Dict[str, DataSource] = {}


def register_data_source(source: DataSource) -> DataSource:
    DATA_SOURCES[source.kind] = source
    return source


def data_source(kind: str) -> DataSource:
    if kind not in DATA_SOURCES:
        raise ConfigError(f"data.kind={kind!r} is not valid; choose one of {', '.join(DATA_SOURCES)}")
    return DATA_SOURCES[kind]


# the data.* numbers and flags the sources read, with their ranges
OPTIONS = {
    "seq_len": Num(lo=1, integer=True), "val_fraction": Num(0, 1, hi_open=True), "num_workers": Num(lo=0, integer=True),
    "max_samples": Num(lo=1, integer=True, optional=True, null_means="all"), "shuffle": Flag(),
    "struct_len": Num(lo=1, integer=True), "eval_size": Num(lo=1, integer=True), "eval_seed": Num(integer=True),
}


def _check_text(cfg: DictConfig) -> None:
    d = cfg.data
    if not d.path and not d.hf_dataset:
        raise ConfigError("data.kind=text needs a corpus: set data.path (a .txt, .jsonl, .json, folder or "
                          "glob) or data.hf_dataset")
    _check_val_path(d)


def _check_val_path(d: DictConfig) -> None:
    """The held-out text must not be the training text (the bound would measure memorisation)."""
    from pathlib import Path
    if d.path and d.get("val_path") and Path(str(d.val_path)).expanduser().resolve() == \
            Path(str(d.path)).expanduser().resolve():
        raise ConfigError(f"data.val_path={d.val_path!r} is the training text data.path={d.path!r}: validation "
                          "would score text the model trained on; give held-out text, or leave data.val_path "
                          "null to hold out the last data.val_fraction")


def _corpus_validation(cfg: DictConfig, tokenizer):
    # only the validation split: a corpus to score need not hold a training batch
    from .corpus import prepare_corpus
    d = cfg.data
    corpus = prepare_corpus(corpus_spec(d), tokenizer, d.cache_dir, progress=cfg.logging.progress_bar)
    val = corpus_val_windows(d, corpus, cfg.training.eval_batch_size)
    if val is None:
        raise ConfigError("the corpus has no validation split (data.val_fraction=0 and no data.val_path): "
                          "set data.val_path=<file> or data.val_fraction")
    return val


def _check_sft(cfg: DictConfig) -> None:
    d = cfg.data
    if not d.path and not d.hf_dataset:
        raise ConfigError("data=sft needs conversations: set data.path (a .json or .jsonl file) or data.hf_dataset")
    _check_val_path(d)
    if cfg.text_noise.truncate_prob:
        raise ConfigError(f"text_noise.truncate_prob={cfg.text_noise.truncate_prob} with data=sft could cut "
                          "answers away: set text_noise.truncate_prob=0")
    if cfg.training.objective == "ar":
        raise ConfigError("data=sft trains the diffusion objective on answers; training.objective=ar is not "
                          "supported with it")


def _check_text_latent(cfg: DictConfig) -> None:
    from pathlib import Path
    d, m = cfg.data, cfg.model
    if d.token_dir is None or not Path(d.token_dir).is_dir():
        raise ConfigError(f"data.token_dir={d.token_dir!r} is not a directory; run "
                          "python -m rwkv_diffusion_rnn.preprocess_tokenize_text first or point "
                          "data.token_dir at its output")
    if m.latent_prefix_len:
        if d.latent_dir is None or not Path(d.latent_dir).is_dir():
            raise ConfigError(f"data.latent_dir={d.latent_dir!r} is not a directory; run "
                              "python -m rwkv_diffusion_rnn.prepare_latents first, point "
                              "data.latent_dir at its latents, or set model.latent_prefix_len=0")
        found = _first_latent_dim(d.latent_dir)
        want = _data_latent_dim(m)
        if found is not None and want != m.latent_dim and found[0] != want:
            raise ConfigError(f"model.latent_input_dim={want} (model.latent_projector={m.latent_projector}) but "
                              f"{found[1]} holds a {found[0]}-dim vector; set model.latent_input_dim={found[0]} "
                              f"or re-run prepare_latents with --latent_dim {want}")
        if found is not None and want == m.latent_dim and found[0] != m.latent_dim:
            raise ConfigError(f"model.latent_dim={m.latent_dim} but {found[1]} holds a "
                              f"{found[0]}-dim latent; set model.latent_dim={found[0]} or re-run "
                              f"prepare_latents with --latent_dim {m.latent_dim}")


def _data_latent_dim(m) -> int:
    from ..models.rwkv_denoiser import data_latent_dim
    return data_latent_dim(m)


def _first_latent_dim(latent_dir):
    """The dimension of the first latent in ``latent_dir`` and its file, or None if it cannot be told."""
    from pathlib import Path

    import numpy as np
    for path in sorted(Path(latent_dir).glob("*.npy"))[:1]:
        try:
            return int(np.load(path, mmap_mode="r").reshape(-1).shape[0]), path
        except Exception:
            return None
    return None


def _check_synthetic(cfg: DictConfig) -> None:
    from .tasks import TASK_NAMES
    if cfg.data.task not in TASK_NAMES:
        raise ConfigError(f"data.task={cfg.data.task!r} is not valid; choose one of {', '.join(TASK_NAMES)}")
    if cfg.training.objective == "ar":
        raise ConfigError("training.objective=ar: the synthetic tasks are scored by diffusion decoding; "
                          "train the baseline on text (data=text)")
    if cfg.model.rwkv_name:
        raise ConfigError("data.kind=synthetic trains from scratch on a character vocabulary: "
                          "set model.rwkv_name=null (model=scratch)")


def _task_vocabulary() -> Tuple[int, int]:
    from .tasks import VOCAB
    return VOCAB.vocab_size, VOCAB.mask_id


register_data_source(DataSource("text_latent", TextLatentData, _check_text_latent, latents=True))
register_data_source(DataSource("text", CorpusData, _check_text, _corpus_validation, needs_tokenizer=True,
                                chars=True, tokenizer_from_name=False))
register_data_source(DataSource("sft", SFTData, _check_sft, needs_tokenizer=True, chars=True, conversations=True))
register_data_source(DataSource("synthetic", SyntheticData, _check_synthetic, endless=True, likelihood=False,
                                vocabulary=_task_vocabulary))
