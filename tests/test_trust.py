"""A checkpoint never turns on code execution: a tokenizer whose code writes a marker file, named
by a checkpoint's tokenizer.json and asked for by its config.yaml (the manifest rewritten to match,
as an attacker would), never runs from evaluate, generate, chat, resume or init_from; the
refusal names the file and the flag a user passes when they do trust it."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rwkv_diffusion_rnn.common.errors import CheckpointError, ProjectError
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.trained import load_trained

ROOT = Path(__file__).resolve().parents[1]
LINES = ["the cat sat on the mat.", "a dog ran in the park!", "we like tea and cake."]


def overrides(tmp_path, save_dir, *extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES * 40) + "\n")
    return ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=1", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.eval_batch_size=8", "training.max_steps=2",
            "optimizer.warmup_steps=1", "logging.eval_freq=0", "eval.max_batches=1",
            "logging.progress_bar=false", f"logging.save_dir={save_dir}", *extra]


def payload_tokenizer(folder: Path, marker: Path) -> Path:
    """A Hugging Face tokenizer folder whose tokenizer class is Python code in the folder: loading
    it with trust_remote_code imports that code, which writes ``marker``."""
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizer\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "evil"}))
    return folder


def rewrite(ckpt_dir: Path, name: str, text: str) -> None:
    """Writes ``name`` in the checkpoint and makes the manifest agree with it."""
    (ckpt_dir / name).write_text(text)
    man = json.loads((ckpt_dir / ckpt.MANIFEST).read_text())
    data = (ckpt_dir / name).read_bytes()
    man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / ckpt.MANIFEST).write_text(json.dumps(man, indent=2) + "\n")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    run(compose_config(overrides(tmp, tmp / "run")))
    last = ckpt.latest_checkpoint(tmp / "run")
    marker = tmp / "PWNED"
    evil = payload_tokenizer(tmp / "evil_tokenizer", marker)
    spec = json.loads((last / ckpt.TOKENIZER_FILE).read_text())
    rewrite(last, ckpt.TOKENIZER_FILE, json.dumps({**spec, "kind": "hf", "name": str(evil), "revision": None}))
    cfg = yaml.safe_load((last / ckpt.CONFIG_FILE).read_text())
    cfg["tokenizer"]["trust_remote_code"] = True
    rewrite(last, ckpt.CONFIG_FILE, yaml.safe_dump(cfg))
    return tmp, last, marker


def cli(module, *args, stdin=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", f"rwkv_diffusion_rnn.{module}", *args], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_the_library_refuses_the_checkpoint_naming_its_config_and_the_flag(poisoned):
    tmp, last, marker = poisoned
    with pytest.raises(CheckpointError, match=r"config.yaml sets tokenizer.trust_remote_code: true.*"
                                              r"pass tokenizer.trust_remote_code=true on the command line"):
        load_trained(last)
    assert not marker.exists()


@pytest.mark.parametrize("module, args, stdin", [
    ("evaluate", ["checkpoint={ckpt}"], None),
    ("generate", ["checkpoint={ckpt}", "num_samples=1", "steps=2"], None),
    ("chat", ["checkpoint={ckpt}"], "hello\n"),
])
def test_no_command_runs_the_checkpoints_code(poisoned, module, args, stdin):
    tmp, last, marker = poisoned
    r = cli(module, *[a.format(ckpt=last) for a in args], stdin=stdin)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tokenizer.trust_remote_code" in r.stderr and str(last / ckpt.CONFIG_FILE) in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_resume_and_init_from_do_not_run_it_either(poisoned):
    tmp, last, marker = poisoned
    with pytest.raises(ProjectError, match="tokenizer.trust_remote_code"):
        run(compose_config(overrides(tmp, tmp / "ft", f"training.init_from={last}")))
    with pytest.raises(ProjectError):
        run(compose_config(overrides(tmp, tmp / "run", "training.resume=latest", "training.max_steps=4")))
    assert not marker.exists()


def test_without_the_config_asking_a_code_tokenizer_is_refused_and_never_imported(poisoned, tmp_path):
    """tokenizer.json alone naming a code tokenizer elsewhere: refused for its path; allowed by the
    user, it is loaded without remote code, which refuses it; nothing is imported."""
    tmp, last, marker = poisoned
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(last, copy)
    cfg = yaml.safe_load((copy / ckpt.CONFIG_FILE).read_text())
    cfg["tokenizer"]["trust_remote_code"] = False
    rewrite(copy, ckpt.CONFIG_FILE, yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"points the tokenizer at .*evil_tokenizer, outside the checkpoint"):
        load_trained(copy)
    # the user allows that folder to be read, but not its code: it is loaded without remote code,
    # which refuses it
    evil = json.loads((copy / ckpt.TOKENIZER_FILE).read_text())["name"]
    with pytest.raises(CheckpointError, match=r"tokenizer.json cannot be loaded"):
        load_trained(copy, [f"tokenizer.name={evil}"])
    assert not marker.exists()


def test_the_payload_is_live_when_the_user_trusts_it(poisoned, tmp_path):
    """The check that the tests above mean something: with the user's own trust_remote_code the
    same kind of checkpoint does import its tokenizer's code."""
    tmp, last, _ = poisoned
    import shutil
    copy, marker = tmp_path / "ckpt", tmp_path / "RAN"
    shutil.copytree(last, copy)
    evil = payload_tokenizer(tmp_path / "evil_tokenizer", marker)
    spec = json.loads((copy / ckpt.TOKENIZER_FILE).read_text())
    rewrite(copy, ckpt.TOKENIZER_FILE, json.dumps({**spec, "name": str(evil)}))
    try:
        load_trained(copy, trust_remote_code=True, tokenizer_path=str(evil))
    except Exception:
        pass        # the stand-in tokenizer class is not a working tokenizer; importing it is the point
    assert marker.read_text() == "ran"


def test_a_checkpoint_from_pretrained_weights_rebuilds_without_reading_them(tmp_path):
    """The weights a run started from are not read again when its checkpoint is used: the sizes
    come from the checkpoint's own weights, so the pretrained file may be gone (or the saved path
    point anywhere) and evaluate and generate still work, with the same numbers."""
    from rwkv_diffusion_rnn.evaluate import evaluate
    from rwkv_diffusion_rnn.generate import generate
    from rwkv_diffusion_rnn.weights.pretrained_rwkv import save_random_blinkdl_checkpoint
    pth = save_random_blinkdl_checkpoint(tmp_path / "pretrained" / "rwkv7-tiny.pth", n_layer=1, n_embd=32,
                                         head_size=16, vocab_size=80)
    run(compose_config(overrides(tmp_path, tmp_path / "run", f"model.rwkv_name={pth}")))
    before = evaluate(tmp_path / "run", ["logging.progress_bar=false"], out=str(tmp_path / "a.json"))
    pth.rename(tmp_path / "elsewhere.pth")
    after = evaluate(tmp_path / "run", ["logging.progress_bar=false"], out=str(tmp_path / "b.json"))
    assert after["nats_per_token"] == before["nats_per_token"]
    assert len(generate(tmp_path / "run", num_samples=1, steps=2, length=8)) == 1


def test_a_saved_tokenizer_path_outside_the_checkpoint_is_read_only_when_the_user_gives_it(tmp_path):
    """tokenizer.json naming a Hugging Face tokenizer folder elsewhere on the machine: refused
    naming the file and the flag; with the user's own tokenizer.name=<that path> it loads."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    run(compose_config(overrides(tmp_path, tmp_path / "run")))
    last = ckpt.latest_checkpoint(tmp_path / "run")
    spec = json.loads((last / ckpt.TOKENIZER_FILE).read_text())
    vocab = {c: i for i, c in enumerate(spec["chars"])}
    vocab["<eos>"], vocab["<mask>"] = len(vocab), len(vocab) + 1
    folder = tmp_path / "elsewhere" / "tok"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", mask_token="<mask>").save_pretrained(folder)
    rewrite(last, ckpt.TOKENIZER_FILE, json.dumps({**spec, "kind": "hf", "name": str(folder)}))
    with pytest.raises(CheckpointError, match=r"tokenizer.json points the tokenizer at .*tok, outside the checkpoint.*"
                                              r"pass tokenizer.name=.*tok on the command line"):
        load_trained(last)
    try:
        load_trained(last, [f"tokenizer.name={folder}"])
    except CheckpointError as e:
        assert "outside the checkpoint" not in str(e)      # past the path check (this stand-in may still differ)
