"""Nothing is overwritten unasked, and every option of generate has a type and a range: an
existing out= file is refused unless overwrite=true, a command's own input never, a folder never;
nan / inf / out-of-range decoding options are refused by name before any model is loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_diffusion_rnn.common.errors import ConfigError
from rwkv_diffusion_rnn.generate import check_options, parse_options

ROOT = Path(__file__).resolve().parents[1]


def checked(*items):
    return check_options(parse_options(["checkpoint=somewhere", *items]))


def test_an_existing_out_file_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "samples.jsonl"
    checked(f"out={out}")                             # a new file is fine
    out.write_text("keep me\n")
    with pytest.raises(ConfigError, match=r"out=.*samples.jsonl exists: give another file, or overwrite=true"):
        checked(f"out={out}")
    checked(f"out={out}", "overwrite=true")
    assert out.read_text() == "keep me\n"             # nothing was written by the checks
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"out=.*dir.jsonl is a folder"):
        checked(f"out={folder}", "overwrite=true")


def test_a_commands_own_input_is_never_its_output(tmp_path):
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"out=.*c.jsonl is also an input of this command"):
        checked("chat=true", f"conversation={conv}", f"out={conv}", "overwrite=true")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"text": "abc"}) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"eval.samples={samples}",
                        f"eval.scorer={tmp_path / 'nothing'}", f"out={samples}", "overwrite=true"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is also an input of this command" in r.stderr and "Traceback" not in r.stderr
    assert samples.read_text() == json.dumps({"text": "abc"}) + "\n"


@pytest.mark.parametrize("item, match", [
    ("temperature=nan", r"temperature=nan must be a number >= 0"),
    ("temperature=inf", r"temperature=inf must be a number >= 0"),
    ("length=1000000000", r"length=1000000000 must be an integer in \[1, 1048576\] or null"),
    ("top_p=0", r"top_p=0.0 must be a number in \(0, 1\] or null"),
    ("threshold=1.5", r"threshold=1.5 must be a number in \[0, 1\] or null"),
    ("steps=0", r"steps=0 must be an integer >= 1 or null"),
    ("eta=-1", r"eta=-1.0 must be a number in \[0, 1\]"),
])
def test_decoding_options_have_types_and_ranges(item, match):
    with pytest.raises(ConfigError, match=match):
        checked(item)
