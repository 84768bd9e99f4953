"""Sample quality: ``evaluate eval.samples=... eval.scorer=...`` scores generated texts under an AR
checkpoint (generative perplexity, the exact NLL after the end-of-text id) and reports each
sample's unigram entropy; bad input is refused by name, with exit 2 and nothing written."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.evaluate import evaluate_samples, main
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.likelihood import score_texts, unigram_entropy
from rwkv_diffusion_rnn.training.trained import load_trained
from test_lm import ROOT, corpus_file, overrides

TEXTS = ["the cat sat.", "a dog ran in the park!", "we", "is it cold at night? the sun is up."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny AR scorer and a tiny diffusion checkpoint (trained once for the module)."""
    tmp = tmp_path_factory.mktemp("scorers")
    corpus = corpus_file(tmp)
    ar, diff = tmp / "ar", tmp / "diffusion"
    run(compose_config(overrides(ar, corpus, "training.objective=ar", "model.mixer=causal",
                                 "training.max_steps=8", "logging.eval_freq=0")))
    run(compose_config(overrides(diff, corpus, "training.max_steps=4", "logging.eval_freq=0")))
    return ckpt.latest_checkpoint(ar / "run"), ckpt.latest_checkpoint(diff / "run")


def write_samples(path, texts, **extra):
    path.write_text("".join(json.dumps({"text": t, "seed": i, **extra}) + "\n" for i, t in enumerate(texts)))
    return path


@torch.no_grad()
def nats_token_by_token(model, ids, eos_id):
    """-sum log p(ids[i] | eos, ids[:i]) through the recurrent state, one token per call."""
    state, prev, total = None, eos_id, 0.0
    for i, target in enumerate(ids):
        out = model(torch.tensor([[prev]]), torch.zeros(1), state=state, return_state=True, pos_offset=i)
        state, prev = out.state, target
        total -= float(torch.log_softmax(out.logits[0, -1].double(), -1)[target])
    return total


def test_gen_nll_equals_the_token_by_token_nll_through_the_recurrent_state(runs, tmp_path):
    scorer, _ = runs
    trained = load_trained(scorer)
    tok, model = trained.tokenizer, trained.model
    ids = [tok.encode(t) for t in TEXTS]
    expected = [nats_token_by_token(model, row, tok.eos_id) for row in ids]
    # batches of 3 right-padded rows of different lengths, and an empty list in between
    nats, tokens = score_texts(model, [ids[0], [], *ids[1:]], tok.eos_id, trained.device, batch_size=3)
    assert tokens == [len(ids[0]), 0, *map(len, ids[1:])] and nats[1] == 0.0
    assert nats[:1] + nats[2:] == pytest.approx(expected, rel=1e-5)
    alone = [score_texts(model, [row], tok.eos_id, trained.device)[0][0] for row in ids]
    assert alone == pytest.approx(expected, rel=1e-5)

    samples = write_samples(tmp_path / "gen.jsonl", [TEXTS[0], "", *TEXTS[1:]], prompt="the")
    result = evaluate_samples(samples, scorer, batch_size=2, progress=False)
    total, count = sum(expected), sum(map(len, ids))
    assert result["num_samples"] == len(TEXTS) and result["empty"] == 1 and result["tokens"] == count
    assert result["gen_nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["gen_ppl"] == pytest.approx(math.exp(result["gen_nll"]), rel=1e-12)
    assert result["gen_ppl_mean_of_samples"] == pytest.approx(
        sum(math.exp(n / len(r)) for n, r in zip(expected, ids)) / len(ids), rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(result["gen_nll"] / math.log(2))   # chars: 1 token = 1 char
    assert result["scorer"] == str(scorer) and result["scorer_step"] == 8 and result["samples"] == str(samples)
    assert json.loads((tmp_path / "gen.eval.json").read_text()) == result


def test_unigram_entropy_of_a_samples_histogram(runs, tmp_path):
    scorer, _ = runs
    tok = load_trained(scorer).tokenizer
    assert unigram_entropy(tok.encode("aaaa")) == 0.0
    assert unigram_entropy(tok.encode("abab")) == pytest.approx(math.log(2), rel=1e-12)
    assert unigram_entropy(tok.encode("abcd")) == pytest.approx(math.log(4), rel=1e-12)
    assert unigram_entropy(tok.encode("aab")) == pytest.approx(-(2 / 3) * math.log(2 / 3) - math.log(1 / 3) / 3)
    result = evaluate_samples(write_samples(tmp_path / "e.jsonl", ["aaaa", "abab", "abcd"]), scorer,
                              out=str(tmp_path / "elsewhere.json"), progress=False)
    hs = [0.0, math.log(2), math.log(4)]
    assert result["entropy"] == pytest.approx(sum(hs) / 3)
    assert result["entropy_std"] == pytest.approx(math.sqrt(sum((h - sum(hs) / 3) ** 2 for h in hs) / 3))
    assert (tmp_path / "elsewhere.json").is_file() and not (tmp_path / "e.eval.json").exists()


def test_sample_quality_command_line_and_bad_input_exit_2_naming_the_problem(runs, tmp_path):
    scorer, diffusion = runs
    samples = write_samples(tmp_path / "gen.jsonl", TEXTS)
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.evaluate"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")

    def cli(*args):
        return subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    r = cli(f"eval.samples={samples}", f"eval.scorer={scorer.parent}", "eval.batch_size=3")   # a run folder
    assert r.returncode == 0, r.stderr[-2000:]
    printed = json.loads(r.stdout)
    assert printed == json.loads((tmp_path / "gen.eval.json").read_text())
    assert printed["num_samples"] == len(TEXTS) and printed["scorer"] == str(scorer)
    (tmp_path / "gen.eval.json").unlink()

    r = cli(f"eval.samples={samples}", f"eval.scorer={diffusion}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"eval.scorer={diffusion} was trained with training.objective=diffusion" in r.stderr
    assert "must be an AR checkpoint (training.objective=ar)" in r.stderr
    assert not (tmp_path / "gen.eval.json").exists()


@pytest.mark.parametrize("content, expected", [
    ('{"text": "the cat"}\n{"text": "the Zebra"}\n', r"bad\.jsonl:2: character 'Z'"),
    ('{"text": "the cat"}\n\n{"prompt": "the"}\n', r'bad\.jsonl:3: the line has no "text" field'),
    ('{"text": "the cat"}\nnot json\n', r"bad\.jsonl:2: not a JSON object"),
    ('{"text": ""}\n{"text": ""}\n', r"every one of its 2 samples is empty"),
    (None, r"eval\.samples=\S*bad\.jsonl does not exist"),
])
def test_bad_samples_are_refused_by_file_and_line_and_nothing_is_written(runs, tmp_path, capsys, content,
                                                                          expected):
    scorer, _ = runs
    samples = tmp_path / "bad.jsonl"
    if content is not None:
        samples.write_text(content)
    with pytest.raises((DataFormatError, OSError), match=expected):
        evaluate_samples(samples, scorer, progress=False)
    with pytest.raises(SystemExit) as exit_:
        main([f"eval.samples={samples}", f"checkpoint={scorer}"])   # checkpoint= is the scorer
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "bad.eval.json").exists()


def test_samples_need_a_scorer(tmp_path, capsys):
    for args in ([f"eval.samples={tmp_path / 'x.jsonl'}"], [f"eval.scorer={tmp_path}"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "eval.samples needs eval.scorer=<AR checkpoint>" in err and "give eval.samples=" in err
