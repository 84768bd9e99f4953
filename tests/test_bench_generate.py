"""eval/bench_generate.py at a tiny size: the cells it writes, and the exactness of block_causal's
state cache for a model without time conditioning."""
import importlib.util
import json
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_generate", Path(__file__).resolve().parents[1] / "eval" / "bench_generate.py")
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)


def test_block_causal_cells_and_cached_tokens_equal_recomputed(tmp_path):
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():          # the script seeds the global RNG and sets the threads
            result = bench_generate.main(["--lengths", "32", "--steps", "4", "--block", "8",
                                          "--mixers", "block_causal", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["cells"] == json.loads(json.dumps(result["cells"]))
    assert saved["threads"] == 1 and saved["torch"] and saved["cpu"]
    cells = {c["case"]: c for c in saved["cells"]}
    assert set(cells) == {"block_causal_cached", "block_causal_recompute",
                          "block_causal_none_cached", "block_causal_none_recompute"}
    for name, c in cells.items():
        assert c["length"] == 32 and c["batch"] == 1 and c["block_length"] == 8
        assert c["steps_run"] == 4                          # 4 blocks of 8, one step each
        assert c["state_folds"] == (3 if c["use_cache"] else 0)
        assert c["wall_s"] > 0 and c["ms_per_step"] > 0 and c["tokens_per_s"] > 0
    (row,) = saved["cache"]
    assert row["length"] == 32 and set(row["speedup"]) == {"film", "none"}
    assert row["identical"]["none"] is True and row["fraction_equal"]["none"] == 1.0
    assert 0.0 <= row["fraction_equal"]["film"] <= 1.0
    table = out.read_text()
    assert "block_causal, state cache" in table and "| 32 |" in table


def test_the_trade_mode_measures_cached_decoding_against_ar_on_tiny_checkpoints(tmp_path):
    from rwkv_diffusion_rnn.train_rwkv import compose_config, run
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat.", "a dog ran in the park!"] * 40) + "\n")
    tiny = ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=8", "training.max_steps=2",
            "optimizer.warmup_steps=1", "logging.eval_freq=0", "logging.log_freq=1", "eval.max_batches=1",
            "logging.progress_bar=false"]
    run(compose_config([*tiny, "training.objective=ar", "model.mixer=causal", f"logging.save_dir={tmp_path / 'ar'}"]))
    run(compose_config([*tiny, "model.mixer=block_causal", "model.block_size=4", "model.time_conditioning=none",
                        f"logging.save_dir={tmp_path / 'bc'}"]))
    out = tmp_path / "trade.md"
    threads = torch.get_num_threads()
    try:
        result = bench_generate.main(["--trade", "--diffusion", str(tmp_path / "bc"), "--ar", str(tmp_path / "ar"),
                                      "--trade-length", "12", "--num-samples", "3", "--batch", "2",
                                      "--steps-per-block", "1", "4", "8", "--thresholds", "0.0", "1.5",
                                      "--out", str(out), "--plot", ""])     # matplotlib is the eval extra's
    finally:
        torch.set_num_threads(threads)
    rows = {(r["setting"], r["value"]): r for r in result["rows"]}
    assert set(rows) == {("steps", 1), ("steps", 4), ("threshold", 0.0), ("threshold", 1.5), ("ar", None)}
    # 12 tokens in 3 blocks of 4; two batches (2 + 1 samples); one model call per step (fold-and-step)
    assert rows[("steps", 1)]["calls_per_batch"] == 3 and rows[("steps", 4)]["calls_per_batch"] == 12
    assert rows[("threshold", 0.0)]["calls_per_batch"] == 3          # a block per step
    assert rows[("threshold", 1.5)]["calls_per_batch"] == 12         # one token per step
    assert rows[("ar", None)]["calls_per_batch"] == 12               # one token per call
    assert rows[("steps", 4)]["gen_ppl_vs_one_per_step"] == 1.0
    for r in result["rows"]:
        assert r["samples"] == 3 and r["tokens_per_s"] > 0 and r["gen_ppl"] > 1 and r["entropy"] >= 0
        assert len(Path(r["samples_file"]).read_text().splitlines()) == 3
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| AR, token by token |" in out.read_text()
