"""A variant is one registry entry: a mixer or a data source defined in this test module (with no
edit to sampling, builders, validation or evaluate) trains, samples, evaluates, resumes and is
refused exactly where its traits say so; and no module outside a registry entry compares a
variant's name."""
import re
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.data.epochs import EpochBatches
from rwkv_diffusion_rnn.data.sources import DATA_SOURCES, DataSource, EpochData, register_data_source
from rwkv_diffusion_rnn.diffusion import sampling
from rwkv_diffusion_rnn.evaluate import evaluate
from rwkv_diffusion_rnn.models.mixers import MIXERS, Mixer, register_mixer, run_block
from rwkv_diffusion_rnn.models.mixers.base import layer_mods
from rwkv_diffusion_rnn.models.rwkv_denoiser import DenoiserConfig
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log
from rwkv_diffusion_rnn.training.trained import load_trained
from rwkv_diffusion_rnn.weights.pretrained_rwkv import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rwkv_diffusion_rnn"


# ---------------------------------------------------------------------------------------------- toy mixers


class GatedCausalMixer(Mixer):
    """Left to right, each block's change scaled by ``toy_gain``: a state it can carry, so the
    generation cache and next-token decoding apply."""
    name = "toy_gated_causal"
    carries_state = True
    autoregressive = True

    def __init__(self, blocks, toy_gain: float = 1.0):
        super().__init__()
        self.check_options(toy_gain=toy_gain)
        self.gain = float(toy_gain)

    @classmethod
    def check_options(cls, toy_gain: float = 1.0, **_):
        if not toy_gain > 0:
            raise ValueError(f"model.toy_gain={toy_gain!r} must be > 0")

    def cache_unit(self):
        return 1

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        mods = layer_mods(mods, len(blocks))
        v_first, new_state = None, []
        for i, block in enumerate(blocks):
            y, v_first, s = self.run(run_block, block, x, v_first, mods[i],
                                     state[i] if state is not None else None, return_state)
            x = x + self.gain * (y - x)
            new_state.append(s)
        return x, (new_state if return_state else None)


class ReversedBlocksMixer(Mixer):
    """Each block of ``toy_block`` tokens read right to left: the text length must be a multiple
    of ``toy_block``, nothing is carried, and it reads ahead (no AR objective, no AR decoding)."""
    name = "toy_reversed_blocks"
    length_option = "toy_block"

    def __init__(self, blocks, toy_block: int = 4):
        super().__init__()
        self.block = int(toy_block)

    def forward(self, blocks, x, mods=None, state=None, return_state=False, prefix_len=0):
        B, T, C = x.shape
        mods = layer_mods(mods, len(blocks))
        v_first = None
        for i, block in enumerate(blocks):
            x, v_first, _ = self.run(run_block, block, x.flip(1), v_first, mods[i])
            x = x.flip(1)
        return x, None


@pytest.fixture
def toy_mixers():
    register_mixer(GatedCausalMixer)
    register_mixer(ReversedBlocksMixer)
    yield
    MIXERS.pop(GatedCausalMixer.name)
    MIXERS.pop(ReversedBlocksMixer.name)


LINES = ["the cat sat on the mat.", "a dog ran in the park!", "we like tea and cake."]


def corpus_overrides(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES * 40) + "\n")
    return ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=8", "training.max_steps=2",
            "optimizer.warmup_steps=1", "logging.eval_freq=2", "logging.log_freq=1", "eval.max_batches=1",
            "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}", *extra]


def test_a_mixer_registered_here_trains_with_its_option_and_its_checkpoint_rebuilds_it(tmp_path, toy_mixers):
    metrics = run(compose_config(corpus_overrides(tmp_path, "model.mixer=toy_gated_causal", "+model.toy_gain=0.5")))
    log = read_train_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert metrics["val_nelbo"] > 0
    trained = load_trained(tmp_path / "run")
    assert isinstance(trained.model.mixer, GatedCausalMixer) and trained.model.mixer.gain == 0.5
    # the AR objective and the AR scorer accept it: its traits say it reads no token ahead
    run(compose_config(corpus_overrides(tmp_path / "ar", "model.mixer=toy_gated_causal", "training.objective=ar")))


def _tiny(mixer, **options):
    torch.manual_seed(0)
    cfg = DenoiserConfig(vocab_size=12, mask_id=11, latent_prefix_len=0, time_conditioning="none",
                         mixer=mixer, mixer_options=options)
    return build_denoiser(cfg, n_layer=2, n_embd=32, head_size=16).eval()


def test_a_mixer_whose_traits_carry_state_samples_with_the_cache(toy_mixers):
    model = _tiny("toy_gated_causal", toy_gain=0.7)
    assert sampling.cache_unit(model) == 1
    calls = []
    forward = model.mixer.forward
    model.mixer.forward = lambda *a, **k: (calls.append(k.get("state") is not None), forward(*a, **k))[1]
    kw = dict(length=12, steps=6, block_length=4, temperature=0.0, batch_size=2)
    cached = sampling.generate_text(model, use_cache=True, **kw)
    assert any(calls)                       # later blocks continued from the carried state
    calls.clear()
    plain = sampling.generate_text(model, use_cache=False, **kw)
    assert not any(calls)
    assert torch.equal(cached, plain)       # no time conditioning: the cache changes nothing
    ar = sampling.generate_autoregressive(model, bos_id=0, length=6, batch_size=2, temperature=0.0)
    assert ar.shape == (2, 6)


def test_a_mixer_is_refused_where_its_traits_say(tmp_path, toy_mixers):
    with pytest.raises(ConfigError, match=r"training.objective=ar .*model.mixer=.*toy_gated_causal.*"
                                          r"got model.mixer='toy_reversed_blocks', which reads ahead"):
        run(compose_config(corpus_overrides(tmp_path, "model.mixer=toy_reversed_blocks", "training.objective=ar")))
    with pytest.raises(ConfigError, match=r"model.toy_block=5 does not divide data.seq_len=16"):
        run(compose_config(corpus_overrides(tmp_path, "model.mixer=toy_reversed_blocks", "+model.toy_block=5")))
    with pytest.raises(ConfigError, match=r"model.toy_gain=-1.0 must be > 0"):
        run(compose_config(corpus_overrides(tmp_path, "model.mixer=toy_gated_causal", "+model.toy_gain=-1.0")))
    with pytest.raises(ConfigError, match=r"model.toy_gain is not a setting"):
        run(compose_config(corpus_overrides(tmp_path, "+model.toy_gain=0.5")))   # nothing registered reads it
    model = _tiny("toy_reversed_blocks", toy_block=4)
    assert sampling.cache_unit(model) is None      # sampling reads the whole canvas every step
    with pytest.raises(ValueError, match="generate_autoregressive needs a causal model"):
        sampling.generate_autoregressive(model, bos_id=0, length=4, batch_size=1)
    # a block-multiple mixer trains where the length fits
    run(compose_config(corpus_overrides(tmp_path / "fits", "model.mixer=toy_reversed_blocks", "+model.toy_block=8")))


# ---------------------------------------------------------------------------------------------- toy data


class CountingBatches(EpochBatches):
    """Training batches of rows counting up mod 10 from a start drawn per (epoch, row)."""

    def __init__(self, n_rows, seq_len, batch_size, seed):
        self.n_rows, self.seq_len, self.batch_size, self.seed = n_rows, seq_len, batch_size, seed

    def __len__(self):
        return self.n_rows // self.batch_size

    def batch(self, epoch, index):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch * 100 + index)
        return counting_rows(torch.randint(0, 10, (self.batch_size,), generator=g), self.seq_len)

    def state_dict(self):
        return {"epoch": self._epoch, "batch_index": self._consumed}

    def load_state_dict(self, state):
        self._epoch, self._consumed = state["epoch"], state["batch_index"]


def counting_rows(starts, seq_len):
    ids = (starts[:, None] + torch.arange(seq_len)) % 10
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}


class CountingData(EpochData):
    """``data.kind=toy_counting``: a loader as every data source builds one (epochs, position and
    resume from :class:`EpochData`, over its ``train`` batches)."""
    tokenizer = None

    def __init__(self, cfg, batch_size, eval_batch_size, seed, tokenizer=None, length_multiple=1):
        seq_len = int(cfg.data.seq_len)
        self.train = CountingBatches(32, seq_len, batch_size, seed)
        self.val = [counting_rows(torch.arange(i, i + eval_batch_size) % 10, seq_len) for i in (0, 3)]


def _check_counting(cfg):
    if cfg.data.seq_len > 64:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: data.kind=toy_counting writes at most 64 tokens")


@pytest.fixture
def toy_data():
    register_data_source(DataSource("toy_counting", CountingData, _check_counting, vocabulary=lambda: (11, 10)))
    yield
    DATA_SOURCES.pop("toy_counting")


def counting_overrides(save_dir, *extra):
    return ["model=scratch", "data.kind=toy_counting", "tokenizer.name=null", "model.latent_prefix_len=0",
            "data.seq_len=12", "model.n_layer=1", "model.n_embd=32", "model.head_size=16", "model.mixer=bi",
            "training.train_batch_size=4", "training.eval_batch_size=4", "training.max_steps=6",
            "training.num_epochs=null", "optimizer.warmup_steps=1", "logging.log_freq=1", "logging.eval_freq=3",
            "logging.progress_bar=false", f"logging.save_dir={save_dir}", *extra]


def test_a_data_source_registered_here_trains_evaluates_and_resumes(tmp_path, toy_data):
    metrics = run(compose_config(counting_overrides(tmp_path / "full")))
    full = read_train_log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 7)) and metrics["val_nelbo"] > 0
    # the vocabulary came from the source, and evaluate scores its validation batches as training did
    assert load_trained(tmp_path / "full").model.config.vocab_size == 11
    scored = evaluate(tmp_path / "full", ["logging.progress_bar=false"])
    assert scored["quantity"] == "nelbo" and scored["nats_per_token"] == pytest.approx(metrics["val_nelbo"], rel=1e-6)
    run(compose_config([*counting_overrides(tmp_path / "part"), "training.stop_at_step=3"]))
    run(compose_config([*counting_overrides(tmp_path / "part"), "training.resume=latest"]))
    assert [r["loss"] for r in read_train_log(tmp_path / "part")] == [r["loss"] for r in full]


def test_a_data_source_is_refused_by_its_own_check_and_its_traits(tmp_path, toy_data):
    with pytest.raises(ConfigError, match="data.seq_len=80: data.kind=toy_counting writes at most 64"):
        run(compose_config([*counting_overrides(tmp_path), "data.seq_len=80"]))
    with pytest.raises(ConfigError, match="data.kind=toy_counting has no sentence latents"):
        run(compose_config([*counting_overrides(tmp_path), "model.latent_prefix_len=1"]))
    with pytest.raises(ConfigError, match="tokenizer.name=chars builds its vocabulary from a corpus"):
        run(compose_config([*counting_overrides(tmp_path), "tokenizer.name=chars"]))


# ---------------------------------------------------------------------------------------------- no names compared


NAMES = {"mixer": ["causal", "bi", "bi_wkv", "dw_jrt", "block_causal"], "arch": ["rwkv7", "transformer", "hybrid", "qwen3"],
         "kind": ["text_latent", "synthetic", "text", "sft"]}


def name_comparisons(root=PKG):
    """Lines outside the registry entries that compare a mixer, arch or data-kind name, as in
    ``m.mixer == "causal"``, ``arch != 'qwen3'``, ``data.kind in ("text", "sft")``."""
    names = "|".join(n for group in NAMES.values() for n in group)
    pattern = re.compile(r"""(mixer|arch|kind)\b[\w.\]\)]*\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[{]?\s*["'](%s)["']""" % names)
    hits = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return hits


def test_no_module_compares_a_variant_name():
    assert name_comparisons() == []


def test_the_name_walk_sees_a_comparison(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "probe.py").write_text('def f(m, cfg):\n    a = m.mixer == "causal"\n'
                                               '    b = cfg.data.kind in ("text", "sft")\n'
                                               "    return a or b or m.arch != 'qwen3' or m.mixer == 'my_own'\n")
    assert len(name_comparisons(tmp_path / "pkg")) == 3
