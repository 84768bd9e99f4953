"""eval/fault_table.py: its judges on made-up results, and three cheap cases through its command
line (so that the table's classification is itself tested)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("fault_table", ROOT / "eval" / "fault_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_table", mod)      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_the_judges():
    ft = load()
    Res = ft.Res
    assert ft.judge_refusal(Res(2, "", "error: a.npz: id 70 is outside"), ["a.npz", "outside"]) == \
        (ft.CLEAR, "a.npz: id 70 is outside")
    tb = "Traceback (most recent call last):\n  File x\nyaml.parser.ParserError: bad\n\nSet HYDRA_FULL_ERROR=1"
    assert ft.judge_refusal(Res(1, "", tb), ["a.npz"]) == (ft.TRACEBACK, "yaml.parser.ParserError: bad")
    assert ft.judge_refusal(Res(0, "trained", ""), ["a.npz"])[0] == ft.SILENT
    assert ft.judge_refusal(Res(2, "", "error: something"), ["a.npz"])[0] == ft.SILENT   # names nothing
    assert ft.judge_handled(Res(0, "x: taking over the lock", ""), True, "", ["taking over"])[0] == ft.HANDLED
    assert ft.judge_handled(Res(0, "", ""), True, "", ["taking over"])[0] == ft.SILENT       # no message
    assert ft.judge_handled(Res(0, "taking over", ""), False, "losses differ", ["taking over"]) == \
        (ft.SILENT, "losses differ")
    from rwkv_diffusion_rnn.common.errors import CheckpointError
    assert ft.judge_exception(CheckpointError("step_1 is intact"), ["step_1"])[0] == ft.CLEAR
    assert ft.judge_exception(OSError(28, "No space left"), ["step_1"])[0] == ft.TRACEBACK  # escaped
    assert ft.judge_exception(None, [])[0] == ft.SILENT
    assert ft.matches("19", "19a", "x") and not ft.matches("8", "18", "x") and ft.matches("lock", "4", "stale lock")
    rows = [ft.Row("1 a", "", ft.CLEAR, "no", ""), ft.Row("2 b", "", ft.SILENT, "yes", ""),
            ft.Row("3 c", "", ft.NOT_TRIED, "-", "")]
    assert ft.summary(rows) == "2 tried: 1 clear error, 0 handled, 0 traceback, 1 silent, 1 lost (1 not tried)"
    assert ft.table(rows).splitlines()[0] == "| case | what was done | outcome | data lost | message excerpt |"


def test_three_cheap_cases(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "fault_table.py"), "--only", "21", "--only", "16",
                        "--only", "12", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["case"].split()[0]: row for row in json.loads(out.read_text())}
    assert sorted(rows) == ["12", "16", "21"]
    for cid, row in rows.items():
        assert (row["outcome"], row["lost"]) == ("clear error", "no"), row
        assert len(row["message"]) <= 100
    assert "did you mean training.max_steps?" in rows["21"]["detail"]
    assert "line 3" in rows["16"]["message"] and "not valid Unicode" in rows["16"]["message"]
    assert "no space left" in rows["12"]["message"] and "step_0000001" in rows["12"]["detail"]
    assert "3 tried: 3 clear error, 0 handled, 0 traceback, 0 silent, 0 lost" in r.stdout
    assert r.stderr.count("data lost:") == 3          # one progress line per case
