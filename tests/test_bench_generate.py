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
