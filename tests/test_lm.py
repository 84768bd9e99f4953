"""Language modelling on a text corpus end to end, at toy size: the AR baseline and the diffusion
bound train, log val_nll / val_nelbo, resume exactly, and ``evaluate`` reproduces what training
logged from the checkpoint alone; bad input is refused by name."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_diffusion_rnn.evaluate import evaluate
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.training.improved_trainer import read_train_log

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LINES = ["the cat sat on the mat.", "a dog ran in the park!", "we like tea and cake.",
         "is it cold at night?", "the sun is up; birds sing."]


def corpus_file(tmp_path, name="corpus.txt", repeat=40) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(LINES * repeat) + "\n")
    return path


def overrides(tmp_path, corpus, *extra):
    return ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=16", "training.max_steps=20",
            "optimizer.warmup_steps=2", "logging.eval_freq=10", "logging.log_freq=5",
            "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}", *extra]


def check_trains_bound_resumes_and_generates(tmp_path, *model, steps=8):
    """A diffusion run of ``model`` overrides on a small corpus logs the bound, a run stopped
    half-way and resumed logs the same losses as the uninterrupted one, and generate writes
    samples of the asked length from the checkpoint."""
    from rwkv_diffusion_rnn.generate import generate
    corpus = corpus_file(tmp_path)
    arch = [*model, f"training.max_steps={steps}", f"logging.eval_freq={steps // 2}", "logging.log_freq=1"]
    metrics = run(compose_config(overrides(tmp_path / "full", corpus, *arch)))
    assert metrics["val_nelbo"] > 0 and metrics["val_nelbo_stderr"] > 0
    part = overrides(tmp_path / "part", corpus, *arch)
    run(compose_config([*part, f"training.stop_at_step={steps // 2}"]))
    run(compose_config([*part, "training.resume=latest"]))
    a, b = read_train_log(tmp_path / "full" / "run"), read_train_log(tmp_path / "part" / "run")
    assert len(a) == steps and [r["loss"] for r in a] == [r["loss"] for r in b]
    records = generate(tmp_path / "full" / "run", num_samples=2, steps=4, length=16, eos=False)
    assert len(records) == 2 and all(len(r["token_ids"]) == 16 for r in records)


def test_ar_baseline_logs_val_nll_and_evaluate_reproduces_it_exactly(tmp_path):
    corpus = corpus_file(tmp_path)
    metrics = run(compose_config(overrides(tmp_path, corpus, "training.objective=ar", "model.mixer=causal")))
    log = read_train_log(tmp_path / "run")
    assert "val_nll" in log[1] and "val_nll" in metrics and "val_nelbo" not in metrics
    assert log[-1]["loss"] < log[0]["loss"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val_nll"] == metrics["val_nll"]
    last = ckpt.latest_checkpoint(tmp_path / "run")
    spec = json.loads((last / ckpt.TOKENIZER_FILE).read_text())
    assert spec["kind"] == "chars" and spec["vocab_size"] == len(spec["chars"]) + 2
    result = evaluate(last, ["logging.progress_bar=false"])
    assert result["quantity"] == "nll" and result["stderr"] == 0.0
    assert result["nats_per_token"] == pytest.approx(metrics["val_nll"], rel=1e-9)
    # chars: one character per token (the corpus has no document separators)
    assert result["bits_per_char"] == pytest.approx(result["bits_per_token"])
    assert json.loads((last / "eval.json").read_text()) == result


def test_diffusion_bound_is_logged_and_evaluate_agrees_within_its_standard_error(tmp_path):
    corpus = corpus_file(tmp_path)
    metrics = run(compose_config(overrides(tmp_path, corpus)))
    assert metrics["val_nelbo_stderr"] > 0 and "val_text_loss" in metrics
    assert "val_latent_loss" not in metrics      # a text-only model: not measured, so not reported
    last = ckpt.latest_checkpoint(tmp_path / "run")
    same = evaluate(last, ["logging.progress_bar=false"])
    assert same["quantity"] == "nelbo"
    assert abs(same["nats_per_token"] - metrics["val_nelbo"]) <= same["stderr"]
    more = evaluate(last, ["logging.progress_bar=false", "eval.mc_samples=4"], out=str(tmp_path / "e4.json"))
    assert more["mc_samples"] == 4 and more["stderr"] < same["stderr"]
    assert abs(more["nats_per_token"] - metrics["val_nelbo"]) <= 3 * (more["stderr"] + same["stderr"])
    assert json.loads((tmp_path / "e4.json").read_text()) == more


def test_resume_on_a_corpus_is_exact(tmp_path):
    corpus = corpus_file(tmp_path)
    common = overrides(tmp_path, corpus, "training.max_steps=12", "logging.log_freq=2", "logging.eval_freq=0")
    run(compose_config([*common, f"logging.save_dir={tmp_path / 'full'}"]))
    run(compose_config([*common, "training.stop_at_step=6", f"logging.save_dir={tmp_path / 'part'}"]))
    run(compose_config([*common, "training.resume=latest", f"logging.save_dir={tmp_path / 'part'}"]))
    full, part = read_train_log(tmp_path / "full"), read_train_log(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full] == list(range(2, 13, 2))
    assert [r["loss"] for r in part] == [r["loss"] for r in full]


def test_resume_refuses_a_corpus_whose_chars_vocabulary_changed(tmp_path):
    corpus = corpus_file(tmp_path)
    common = overrides(tmp_path, corpus, "training.max_steps=4", "logging.eval_freq=0")
    run(compose_config([*common, "training.stop_at_step=2"]))
    corpus.write_text(corpus.read_text().replace("c", "k"))   # same size, one character fewer
    with pytest.raises(Exception, match="vocab_size|tokenizer"):
        run(compose_config([*common, "training.resume=latest"]))


@pytest.mark.parametrize("tokenizer", ["bytes", "BlinkDL/rwkv7-g1"])
def test_a_jsonl_corpus_trains_and_evaluates_with_other_tokenizers(tmp_path, tokenizer):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(LINES * 30)))
    metrics = run(compose_config(overrides(tmp_path, corpus, f"tokenizer.name={tokenizer}",
                                           "training.max_steps=4", "logging.eval_freq=0")))
    assert metrics["val_nelbo"] > 0 and metrics["val_bpc"] > 0
    cfg = ckpt.load_config(ckpt.latest_checkpoint(tmp_path / "run"))
    want = {"bytes": (258, 257), "BlinkDL/rwkv7-g1": (65536, 65535)}[tokenizer]
    assert (cfg["model"]["vocab_size"], cfg["model"]["mask_id"]) == want
    result = evaluate(tmp_path / "run", ["logging.progress_bar=false"])   # a run folder: its newest checkpoint
    assert result["nats_per_token"] == pytest.approx(metrics["val_nelbo"], rel=1e-9)


def test_a_config_that_contradicts_the_tokenizer_or_the_objective_is_refused_by_key(tmp_path):
    corpus = corpus_file(tmp_path)
    with pytest.raises(ConfigError, match="model.vocab_size=100 contradicts tokenizer.name=chars"):
        run(compose_config(overrides(tmp_path, corpus, "model.vocab_size=100")))
    with pytest.raises(ConfigError, match="model.mixer=causal"):
        run(compose_config(overrides(tmp_path, corpus, "training.objective=ar")))
    with pytest.raises(ConfigError, match="training.objective"):
        run(compose_config(overrides(tmp_path, corpus, "training.objective=mlm")))
    with pytest.raises(ConfigError, match="data.path"):
        run(compose_config(overrides(tmp_path, corpus, "data.path=null")))
    with pytest.raises(ConfigError, match="model.latent_prefix_len=0"):
        run(compose_config(overrides(tmp_path, corpus, "model.latent_prefix_len=1")))


def test_evaluate_names_a_character_the_saved_vocabulary_lacks_and_a_missing_tokenizer(tmp_path):
    corpus = corpus_file(tmp_path)
    run(compose_config(overrides(tmp_path, corpus, "training.max_steps=2", "logging.eval_freq=0")))
    last = ckpt.latest_checkpoint(tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text("the cat sat on the mat. " * 5 + "Zebra " + "the cat sat. " * 5)
    with pytest.raises(Exception, match=r"other\.txt.*'Z'|'Z'.*other\.txt"):
        evaluate(last, [f"data.val_path={other}", "logging.progress_bar=false"])
    with pytest.raises(ConfigError, match="eval.no_such_key"):
        evaluate(last, ["eval.no_such_key=1"])
    (last / ckpt.TOKENIZER_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json"):
        evaluate(last, [])


def test_evaluate_command_line_prints_the_json_and_refuses_bad_input_without_a_traceback(tmp_path):
    corpus = corpus_file(tmp_path)
    run(compose_config(overrides(tmp_path, corpus, "training.objective=ar", "model.mixer=causal",
                                 "training.max_steps=2", "logging.eval_freq=0")))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate"]
    r = subprocess.run([*cmd, f"checkpoint={tmp_path / 'run'}", "logging.progress_bar=false"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["quantity"] == "nll"
    r = subprocess.run([*cmd, f"checkpoint={tmp_path / 'nothing'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "nothing" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_to_a_file_prints_progress_lines_and_reuses_the_training_token_cache(tmp_path):
    corpus = corpus_file(tmp_path)
    run(compose_config(overrides(tmp_path, corpus, "training.max_steps=2", "logging.eval_freq=0")))
    caches = sorted((tmp_path / "cache").iterdir())
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"checkpoint={tmp_path / 'run'}",
                            "eval.max_batches=null"], cwd=ROOT, env=env, stdout=out, stderr=err, timeout=300)
    text = (tmp_path / "err.txt").read_text()
    assert r.returncode == 0, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("evaluate: ")]
    assert lines and re.match(r"evaluate: (\d+)/\1 batches  \d+m\d\ds  ETA 0m00s$", lines[-1]), text
    assert "\r" not in text                                          # no bar redrawn into the file
    assert json.loads((tmp_path / "out.txt").read_text())["quantity"] == "nelbo"
    # the chars vocabulary saved with the checkpoint finds the cache training built: no second one
    assert sorted((tmp_path / "cache").iterdir()) == caches and len(caches) == 1


def test_the_shakespeare_preset_is_nanogpts_baby_run():
    cfg = compose_config(["experiment=shakespeare_char", "logging.save_dir=unused"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_embd // cfg.model.head_size) == (4, 128, 4)
    assert (cfg.data.seq_len, cfg.training.train_batch_size, cfg.training.max_steps) == (64, 12, 2000)
    assert (cfg.optimizer.lr, cfg.optimizer.lr * cfg.optimizer.min_lr_ratio) == (1e-3, pytest.approx(1e-4))
    assert cfg.optimizer.schedule == "cosine" and cfg.data.val_fraction == 0.1 and cfg.tokenizer.name == "chars"
    # a reading that tells a text from its reversal (a shared-weight sum cannot: its samples read
    # right to left about half the time)
    assert (cfg.model.mixer, cfg.model.bi_fusion) == ("bi", "gated")


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is absent (the public corpus beside the checkout)")
def test_the_shakespeare_preset_runs_on_the_real_corpus(tmp_path):
    metrics = run(compose_config(["experiment=shakespeare_char", f"data.path={SHAKESPEARE}",
                                  f"data.cache_dir={tmp_path / 'cache'}", "training.max_steps=3",
                                  "eval.max_batches=1", "logging.eval_freq=0", "logging.progress_bar=false",
                                  f"logging.save_dir={tmp_path / 'run'}"]))
    cfg = ckpt.load_config(ckpt.latest_checkpoint(tmp_path / "run"))
    assert cfg["model"]["vocab_size"] == 65 + 2          # 65 characters, end of text, mask
    assert 0 < metrics["val_nelbo"] < 10


def test_bad_corpora_are_refused_on_the_command_line_naming_the_file(tmp_path):
    """Missing, empty, a .jsonl line without its text field, shorter than one window: an error
    naming the file (and line), no traceback, and no cache left to reuse."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_field = tmp_path / "docs.jsonl"
    no_field.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "oops"}) + "\n")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cases = [(tmp_path / "missing.txt", "missing.txt"), (empty, "empty.txt"),
             (no_field, "docs.jsonl:2"), (short, "short.txt")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for path, named in cases:
        r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.train_rwkv",
                            *overrides(tmp_path, path, "training.max_steps=1"), f"hydra.run.dir={tmp_path / 'h'}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (named, r.stderr[-1500:])
        assert named in r.stderr and "Traceback" not in r.stderr, (named, r.stderr[-1500:])
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_degenerate_corpora_are_refused(tmp_path):
    """A corpus with nothing to learn (blank lines) and a validation text that is the training
    text are refused naming the key, before a bound of ~0 could be reported."""
    from rwkv_diffusion_rnn.common.errors import DataFormatError
    blank = tmp_path / "blank.txt"
    blank.write_text("\n" * 5000)
    with pytest.raises(DataFormatError, match=r"training split of .*blank.txt holds 1 distinct token in \d+ tokens"):
        run(compose_config(overrides(tmp_path, blank)))
    corpus = corpus_file(tmp_path)
    with pytest.raises(ConfigError, match=r"data.val_path=.* is the training text data.path="):
        run(compose_config(overrides(tmp_path, corpus, f"data.val_path={corpus}")))
