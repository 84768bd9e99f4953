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


# ---------------------------------------------------------------------------------------------- OS errors


def _mounts_available(tmp_path):
    import shutil
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                        capture_output=True, timeout=20).returncode == 0
    probe.rmdir()
    return ok


def on_mount(folder, options, *argv):
    """Runs ``python argv`` with a fresh tmpfs (``options``, e.g. ``ro`` or ``size=16k``) mounted on
    ``folder`` in a private mount namespace (unshare -rm: no root needed where user namespaces are)."""
    cmd = f'mount -t tmpfs -o {options} tmpfs {folder} && exec "$0" "$@"'
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(["unshare", "-rm", "sh", "-c", cmd, sys.executable, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def train_args(tmp_path, cache, corpus_repeat=40):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat.", "a dog ran in the park!"] * corpus_repeat) + "\n")
    return ["-m", "rwkv_diffusion_rnn.train_rwkv", "experiment=shakespeare_char", f"data.path={corpus}",
            f"data.cache_dir={cache}", "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.max_steps=2", "logging.eval_freq=0", "eval.max_batches=1",
            "logging.progress_bar=false", f"logging.save_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h'}"]


@pytest.mark.parametrize("options, fix", [("ro", "it is not writable"), ("size=8k", "the disk is full")])
def test_an_unwritable_token_cache_names_the_key_and_the_fix(tmp_path, options, fix):
    if not _mounts_available(tmp_path):
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused)")
    cache = tmp_path / "cache"
    cache.mkdir()
    r = on_mount(cache, options, *train_args(tmp_path, cache, corpus_repeat=400))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"data.cache_dir={cache}: cannot write there" in r.stderr and fix in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unwritable_out_names_the_key_and_the_fix(tmp_path):
    if not _mounts_available(tmp_path):
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused)")
    r = subprocess.run([sys.executable, *train_args(tmp_path, tmp_path / "cache")], cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    r = on_mount(shelf, "ro", "-m", "rwkv_diffusion_rnn.generate", f"checkpoint={tmp_path / 'run'}", "steps=2",
                 "num_samples=1", f"out={shelf / 's.jsonl'}", "progress_bar=false")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"out={shelf / 's.jsonl'}: cannot write there" in r.stderr and "it is not writable" in r.stderr
    assert "Traceback" not in r.stderr


def test_template_markers_are_well_formed_and_bounded():
    from rwkv_diffusion_rnn.data.tokenizer import ByteTokenizer
    from rwkv_diffusion_rnn.generate import parse_template
    tok = ByteTokenizer()
    ids, given = parse_template(tok, "ab<mask:3>c", tok.mask_id)
    assert given == [True, True, False, False, False, True]
    with pytest.raises(ConfigError, match=r"'<mask:abc>c'\.\.\. at character 2 is not a mask marker"):
        parse_template(tok, "ab<mask:abc>c", tok.mask_id)
    with pytest.raises(ConfigError, match=r"<mask:99999999> makes the canvas longer than 1048576 tokens"):
        parse_template(tok, "ab<mask:99999999>", tok.mask_id)


def test_evaluate_checks_the_values_it_overrides(tmp_path):
    """evaluate's key=value overrides of a checkpoint's saved config have the training config's
    types and ranges: refused by key before anything is scored."""
    r = subprocess.run([sys.executable, *train_args(tmp_path, tmp_path / "cache")], cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for item, match in (("eval.mc_samples=abc", "eval.mc_samples='abc' must be an integer >= 1"),
                        ("eval.max_batches=0", "eval.max_batches=0 must be an integer >= 1 or null")):
        r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.evaluate", f"checkpoint={tmp_path / 'run'}", item],
                           cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
