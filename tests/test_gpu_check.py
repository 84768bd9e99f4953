"""eval/gpu_check.py: refuses to run without CUDA; its pure helpers on hand-made inputs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("extra", [[], ["--child", "model"]])
def test_without_cuda_runs_nothing_and_exits_2(tmp_path, extra):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "gpu_check.py"), "--out", str(out), *extra],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no CUDA device is visible" in p.stdout + p.stderr
    assert "nothing was run" in p.stdout + p.stderr
    assert not out.exists()


def test_parse_pytest_summary():
    parse = gpu_check.parse_pytest_summary
    assert parse("......                [100%]\n6 passed in 12.34s\n") == \
        {"passed": 6, "failed": 0, "skipped": 0, "errors": 0}
    out = ("F.....\n=== short test summary info ===\nFAILED tests/test_fla_gpu.py::test_x - assert\n"
           "1 failed, 5 passed, 2 warnings in 3.21s\n")
    assert parse(out) == {"passed": 5, "failed": 1, "skipped": 0, "errors": 0, "warnings": 2}
    assert parse("=========== 1 passed, 1 skipped, 1 error in 0.50s (0:00:00) ===========")["errors"] == 1
    assert parse("no tests ran in 0.01s") == {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    assert parse("Traceback (most recent call last):\nImportError: x") == \
        {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}


def test_skip_reasons_and_tests_result():
    out = ("ssssss\n=== short test summary info ===\n"
           "SKIPPED [6] tests/test_fla_gpu.py:21: triton is not installed: fla kernels need it\n"
           "6 skipped in 0.05s\n")
    reasons = gpu_check.skip_reasons(out)
    assert reasons == ["triton is not installed: fla kernels need it"]
    counts = gpu_check.parse_pytest_summary(out)
    status, text = gpu_check.tests_result(counts, 0, reasons)
    assert status == "skipped" and "6 skipped" in text and "triton is not installed" in text
    ok = {"passed": 6, "failed": 0, "skipped": 0, "errors": 0}
    assert gpu_check.tests_result(ok, 0) == ("ok", "6 passed, 0 failed, 0 skipped")
    assert gpu_check.tests_result({**ok, "passed": 5, "failed": 1}, 1)[0] == "failed"
    assert gpu_check.tests_result({**ok, "passed": 0}, 5) == ("failed", "no tests ran (pytest exit 5)")


def test_format_table():
    rows = [{"title": "1. GPU tests", "result": "6 passed, 0 failed, 0 skipped", "seconds": 41.25},
            {"title": "2. wkv", "result": "FAILED: exit 1: a | b", "seconds": 3.0}]
    assert gpu_check.format_table(rows).splitlines() == [
        "| step | result | seconds |",
        "|---|---|---:|",
        "| 1. GPU tests | 6 passed, 0 failed, 0 skipped | 41.2 |",
        "| 2. wkv | FAILED: exit 1: a \\| b | 3.0 |",
    ]


def test_child_result_and_struct_result():
    out = "device: X\n" + gpu_check.RESULT_TAG + '{"a": 1}\nnoise\n' + gpu_check.RESULT_TAG + '{"a": 2}\n'
    assert gpu_check.last_result(out) == {"a": 2}
    assert gpu_check.last_result("Traceback ...") is None
    log = [{"step": 50, "tokens_per_s": 100.0}, {"step": 100, "tokens_per_s": 900.0}, {"step": 150}]
    d = gpu_check.struct_result({"struct_acc": 0.75, "struct_exact": 0.1, "step": 200}, log)
    assert d["tokens_per_s"] == 900.0 and d["struct_acc"] == 0.75
    line = gpu_check.describe("struct", d)
    assert "struct_acc 0.7500" in line and "struct_exact 0.1000" in line and "900 tok/s" in line
    assert "lack" in gpu_check.describe("struct", gpu_check.struct_result({}, []))


def test_describe_wkv_and_model():
    wkv = {"fla_ms": 2.0, "torch_ms": 30.0, "speedup": 15.0, "B": 4, "H": 4, "K": 64, "T": 4096,
           "dtype": "float32", "repeats": 5}
    assert gpu_check.describe("wkv", wkv).startswith("fla 2.00 ms, torch 30.00 ms: fla 15.0x")
    m = {"B": 8, "T": 1024, "ours": {"tokens_per_s": 50000.0, "peak_gib": 20.0},
         "fla": {"tokens_per_s": 100000.0, "peak_gib": 18.0}}
    assert "ours/fla 0.50x" in gpu_check.describe("model", m)


def test_a_step_that_runs_out_of_time_is_killed_and_keeps_its_output():
    rc, out = gpu_check.run_subprocess(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.0)
    assert rc is None and out.strip() == "started"


def test_a_failed_step_is_recorded_and_does_not_raise(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child refuses, as on this CPU machine
    row = gpu_check.run_step(gpu_check.Step("wkv", "2. wkv", 60), budget_scale=1.0)
    assert row["status"] == "failed"
    assert row["result"].startswith("FAILED: exit 2: gpu_check: no CUDA device is visible")
    assert row["seconds"] < 60 and "nothing was run" in row["log_tail"]
