"""eval/bench_denoisers.py at toy sizes: every cell measured in its own process, one table row
per denoiser with its parameter count, and a cell that fails is reported, not dropped."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_denoisers  # noqa: E402

TOY = ["--ns", "16", "--n-layer", "2", "--n-embd", "32", "--head-size", "16", "--vocab", "50",
       "--sample-n", "16", "--sample-steps", "2", "--repeats", "1", "--threads", "1"]


def test_the_bench_measures_every_cell_and_writes_the_table(tmp_path):
    out = tmp_path / "b.md"
    assert bench_denoisers.main([*TOY, "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(rows) == {f"{a}/{c}" for a in bench_denoisers.ARCHS for c in ("16", "sample")}
    for key, r in rows.items():
        assert r["params"] > 0 and (r.get("tokens_per_s", 0) > 0 or r.get("sample_ms_per_step", 0) > 0), key
    text = out.read_text()
    for a in bench_denoisers.ARCHS:
        n = sum(p.numel() for p in bench_denoisers.build(a, 2, 32, 16, 50, "auto").parameters())
        assert rows[f"{a}/16"]["params"] == n and text.count(f"\n| {a} | {n:,} |") == 1


def test_keep_freed_memory_reaches_the_cells(tmp_path):
    out = tmp_path / "b.md"
    assert bench_denoisers.main([*TOY, "--no-sample", "--archs", "transformer", "--keep-freed-memory",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["transformer/16"]["malloc_mmap_threshold"] == bench_denoisers.KEEP_FREED_MEMORY["MALLOC_MMAP_THRESHOLD_"]


def test_a_failing_cell_is_reported_in_its_row(tmp_path):
    out = tmp_path / "b.md"
    # heads of 10 channels give 3 heads, which do not divide a width of 32: the cell fails
    assert bench_denoisers.main([*TOY, "--head-size", "10", "--no-sample", "--archs", "transformer",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert "error" in rows["transformer/16"]
    assert "| transformer | - |" in out.read_text()
