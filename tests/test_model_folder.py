"""``export format=folder``: a model folder that generates the checkpoint's text with the same seed,
evaluates to its figures, starts a fine-tuning run (training.init_from), carries a model card of
the run, and is refused, without running anything, when a pickle stands where its weights should."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import CheckpointError
from rwkv_diffusion_rnn.evaluate import evaluate
from rwkv_diffusion_rnn.export import export
from rwkv_diffusion_rnn.generate import generate
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training import checkpoints as ckpt
from rwkv_diffusion_rnn.training.trained import load_trained

from test_lm import corpus_file, overrides

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress_bar=False, print_texts=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A diffusion run with an EMA (evaluated) and an AR run without, each exported as a folder."""
    tmp = tmp_path_factory.mktemp("folder")
    corpus = corpus_file(tmp)
    out = {}
    for name, extra in {"bi": ["training.ema_decay=0.9"], "ar": ["training.objective=ar", "model.mixer=causal"]}.items():
        run(compose_config(overrides(tmp, corpus, "training.max_steps=6", "logging.eval_freq=0",
                                     f"logging.save_dir={tmp / name}", *extra)))
        source = ckpt.latest_checkpoint(tmp / name)
        if name == "bi":
            evaluate(source, ["logging.progress_bar=false", "eval.mc_samples=2"])
        out[name] = (source, export(source, "folder", tmp / f"{name}_folder"))
    return out


@pytest.mark.parametrize("name", ["bi", "ar"])
def test_generate_from_the_folder_writes_the_checkpoints_text_with_the_same_seed(exported, name):
    source, folder = exported[name]
    kw = dict(prompt="the cat", length=20, num_samples=2, seed=5, **FAST)
    a, b = generate(source, **kw), generate(folder, **kw)
    assert [r["text"] for r in a] == [r["text"] for r in b] and len(a[0]["text"]) > len("the cat")
    assert b[0]["settings"]["weights"] == ("ema" if name == "bi" else "model")


def test_the_folder_holds_safetensors_config_tokenizer_and_a_card_and_no_pickle(exported):
    source, folder = exported["bi"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "config.yaml", "eval.json", "manifest.json", "metrics.json", "model.safetensors",
                     "tokenizer.json", "trainer_state.json"]
    ckpt.verify_checkpoint(folder)
    # the EMA weights, stored as the folder's only weights
    ema = load_trained(source).model.state_dict()
    mine = load_trained(folder).model.state_dict()
    assert all(torch.equal(ema[k], mine[k]) for k in ema)
    card = (folder / "README.md").read_text()
    figures = json.loads((source / "eval.json").read_text())
    assert "EMA weights" in card and "step 6" in card
    assert "data.path=" in card and "generate checkpoint=<this folder>" in card
    assert f"nats_per_token {figures['nats_per_token']:.4g}" in card and "eval.mc_samples=2" in card


def test_evaluate_and_init_from_take_the_folder(exported, tmp_path):
    source, folder = exported["ar"]
    a = evaluate(source, ["logging.progress_bar=false"], out=str(tmp_path / "a.json"))
    b = evaluate(folder, ["logging.progress_bar=false"], out=str(tmp_path / "b.json"))
    assert a["nats_per_token"] == b["nats_per_token"]
    corpus = corpus_file(tmp_path)
    metrics = run(compose_config(overrides(tmp_path, corpus, "training.max_steps=2", "logging.eval_freq=0",
                                           "training.objective=ar", f"training.init_from={folder}")))
    assert metrics["val_nll"] < 4.0          # from trained weights, not a fresh start (log 25 = 3.2 at best)


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_a_pickle_where_the_weights_should_be_is_refused_and_never_run(exported, tmp_path):
    global MARKER
    source, folder = exported["ar"]
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(folder), str(bad)], check=True)
    MARKER = str(tmp_path / "ran")
    weights = bad / "model.safetensors"
    torch.save({"x": Payload()}, weights)
    manifest = json.loads((bad / "manifest.json").read_text())     # a manifest that agrees: only the format is wrong
    manifest["files"]["model.safetensors"] = {"size": weights.stat().st_size,
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_trained(bad)
    p = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.generate", f"checkpoint={bad}", "prompt=the",
                        "length=8"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "safetensors" in p.stderr and "Traceback" not in p.stderr
    assert not Path(MARKER).exists()


def test_the_export_command_writes_a_folder_and_refuses_an_existing_one(exported, tmp_path):
    source, _ = exported["ar"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "rwkv_diffusion_rnn.export", f"checkpoint={source}", "format=folder",
           f"out={tmp_path / 'm'}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m" / "README.md").is_file() and "trained (not EMA)" in (tmp_path / "m" / "README.md").read_text()
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "overwrite=true" in p.stderr
