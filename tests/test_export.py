"""Export round trip: an AR checkpoint exported as BlinkDL's .pth gives the checkpoint's logits in
BlinkDL's own `rwkv` package and in load_rwkv7; the fla folder gives them too; the folds of the
denoiser's extras are exact; other architectures and existing targets are refused."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_diffusion_rnn.common.errors import CheckpointError, ConfigError
from rwkv_diffusion_rnn.export import export
from rwkv_diffusion_rnn.train_rwkv import compose_config, run
from rwkv_diffusion_rnn.training.trained import load_trained
from rwkv_diffusion_rnn.weights.pretrained_rwkv import load_rwkv7

ROOT = Path(__file__).resolve().parents[1]
LINES = ["the cat sat on the mat.", "a dog ran in the park!", "we like tea and cake."]


def overrides(tmp_path, save_dir, *extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES * 40) + "\n")
    return ["experiment=shakespeare_char", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16", "model.n_layer=2", "model.n_embd=32", "model.head_size=16",
            "training.train_batch_size=4", "training.max_steps=6", "optimizer.lr=3e-3", "optimizer.warmup_steps=1",
            "logging.eval_freq=0", "eval.max_batches=1", "logging.progress_bar=false",
            f"logging.save_dir={save_dir}", *extra]


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=["film", "adaln_zero"])
def ar_run(request, tmp_path_factory):
    """An AR checkpoint whose time conditioning, type embedding and head have moved off their
    initial values (so the folds are tested on non-trivial numbers)."""
    tmp = tmp_path_factory.mktemp(f"ar-{request.param}")
    run(compose_config(overrides(tmp, tmp / "run", "training.objective=ar", "model.mixer=causal",
                                 f"model.time_conditioning={request.param}")))
    trained = load_trained(tmp / "run")
    with torch.no_grad():              # make every folded part clearly nonzero
        g = torch.Generator().manual_seed(0)
        for p in list(trained.model.cond.parameters()) + [trained.model.type_emb.weight]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    from rwkv_diffusion_rnn.training import checkpoints as ckpt
    ckpt.save_checkpoint(tmp / "perturbed", "step_0000001", model=trained.model, trainer_state={"global_step": 1},
                         config=trained.cfg, tokenizer=__import__("json").loads(
                             (trained.path / ckpt.TOKENIZER_FILE).read_text()))
    return tmp, load_trained(tmp / "perturbed")


def project_logits(trained, ids):
    with torch.no_grad():
        return trained.model(ids.view(1, -1), torch.zeros(1)).logits[0]


def test_blinkdl_export_gives_the_checkpoints_logits_in_blinkdls_package_and_load_rwkv7(ar_run, tmp_path):
    rwkv_model = pytest.importorskip("rwkv.model", reason="the `rwkv` reference package is not installed")
    tmp, trained = ar_run
    pth = export(trained.path, "blinkdl", tmp_path / "lm.pth")
    ids = torch.randint(0, trained.model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ours = project_logits(trained, ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = rwkv_model.RWKV(model=str(pth)[:-len(".pth")], strategy="cpu fp32")
    ref_logits, _ = ref.forward(ids.tolist(), None, full_output=True)
    assert rel_err(ref_logits.view(40, -1), ours) < 1e-4
    with torch.no_grad():
        assert rel_err(load_rwkv7(pth)(ids.view(1, -1))[0], ours) < 1e-4


def test_fla_export_reads_back_to_the_same_logits(ar_run, tmp_path):
    tmp, trained = ar_run
    folder = export(trained.path, "fla", tmp_path / "lm_fla")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    ids = torch.randint(0, trained.model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(load_rwkv7(folder)(ids.view(1, -1))[0], project_logits(trained, ids)) < 1e-4


def test_an_existing_target_is_refused_unless_overwrite_and_other_archs_are_refused(ar_run, tmp_path):
    tmp, trained = ar_run
    pth = export(trained.path, "blinkdl", tmp_path / "lm.pth")
    with pytest.raises(ConfigError, match=r"out=.*lm.pth exists: give another path, or overwrite=true"):
        export(trained.path, "blinkdl", pth)
    export(trained.path, "blinkdl", pth, overwrite=True)
    with pytest.raises(ConfigError, match="format=blinkdl writes a .pth file"):
        export(trained.path, "blinkdl", tmp_path / "lm.bin")
    run(compose_config(overrides(tmp_path, tmp_path / "tr", "model.arch=transformer", "training.max_steps=1")))
    with pytest.raises(CheckpointError, match="model.arch=transformer is not an RWKV-7 network"):
        export(tmp_path / "tr", "fla", tmp_path / "tr_fla")
    r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.export", f"checkpoint={tmp_path / 'tr'}",
                        "format=blinkdl", f"out={tmp_path / 'x.pth'}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 2 and "not an RWKV-7 network" in r.stderr and "Traceback" not in r.stderr
