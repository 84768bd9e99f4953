"""preprocess_tokenize_text: file format, round trip with the RWKV World tokenizer, re-runs, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_diffusion_rnn import preprocess_tokenize_text as ptt
from rwkv_diffusion_rnn.data import token_files
from rwkv_diffusion_rnn.data.data_simple import TOKENS_INFO_FILE
from rwkv_diffusion_rnn.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog, again and again and again and again.",
    "中文文本也可以。",
    "emoji 🙂 and tabs\tand  spaces",
    "",
    "short",
    "x" * 3 + " a much longer sentence that certainly has more than sixteen tokens in the RWKV vocabulary, yes indeed it does",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("BlinkDL/rwkv7-g1")


def write_list(path: Path, texts, with_paths=True):
    data = [{"text": t, **({"latent_path": f"latents/train/{i:08d}.npy"} if with_paths else {})}
            for i, t in enumerate(texts)]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_round_trip_truncation_and_format(tmp_path, tok, capsys):
    js = write_list(tmp_path / "train_data.json", TEXTS)
    rc = ptt.main(["--json_path", str(js), "--output_dir", str(tmp_path / "tok"), "--max_length", "16"])
    assert rc == 0
    out = tmp_path / "tok" / "train"
    lengths = [len(tok.encode(t)) for t in TEXTS]
    n_trunc = sum(n > 16 for n in lengths)
    assert n_trunc >= 1 and n_trunc < len(TEXTS)
    line = capsys.readouterr().out
    assert f"wrote {len(TEXTS)} files, skipped 0 existing" in line
    assert f"{n_trunc} truncated to max_length 16" in line
    assert f"{sum(min(n, 16) for n in lengths)} tokens" in line
    for i, text in enumerate(TEXTS):
        with np.load(out / f"{i:08d}.npz") as z:
            assert sorted(z.files) == ["attention_mask", "input_ids"]
            ids, mask = z["input_ids"], z["attention_mask"]
        assert ids.shape == (16,) and ids.dtype == np.int32
        assert mask.shape == (16,) and mask.dtype == np.uint8
        n = min(lengths[i], 16)
        assert mask.sum() == n and mask[:n].all()  # right padding
        assert (ids[n:] == tok.pad_id).all()
        if lengths[i] <= 16:
            assert tok.decode(ids[mask.astype(bool)].tolist()) == text
        else:
            assert ids[:16].tolist() == tok.encode(text)[:16]
    info = json.loads((out / TOKENS_INFO_FILE).read_text())
    assert info["max_length"] == 16 and info["tokenizer"] == "BlinkDL/rwkv7-g1" and info["pad_id"] == 0
    assert not list(out.glob(".*.tmp"))


def test_rerun_skips_and_overwrite_rewrites(tmp_path, capsys):
    js = write_list(tmp_path / "val_data.json", TEXTS[:4])
    args = ["--json_path", str(js), "--output_dir", str(tmp_path / "tok"), "--max_length", "32"]
    assert ptt.main(args) == 0
    out = tmp_path / "tok" / "val"  # split from the JSON name
    f = out / "00000001.npz"
    os.utime(f, (1, 1))
    (out / "00000002.npz").unlink()
    capsys.readouterr()
    assert ptt.main(args) == 0
    assert "wrote 1 files, skipped 3 existing" in capsys.readouterr().out
    assert f.stat().st_mtime == 1 and (out / "00000002.npz").exists()
    # Different settings over existing files are refused...
    assert ptt.main(args[:-1] + ["48"]) == 2
    assert "made with max_length=32" in capsys.readouterr().err
    # ...unless --overwrite.
    assert ptt.main(args[:-1] + ["48", "--overwrite"]) == 0
    assert "wrote 4 files, skipped 0 existing" in capsys.readouterr().out
    assert f.stat().st_mtime != 1
    with np.load(f) as z:
        assert z["input_ids"].shape == (48,)


def test_split_override_and_stems_without_latent_path(tmp_path, tok):
    js = tmp_path / "corpus.json"
    js.write_text(json.dumps([{"text": "a", "id": "doc-a"}, {"text": "b"}]))
    s = token_files.tokenize_json(js, tmp_path / "tok", tok, max_length=4, split="dev", show_progress=False)
    assert s.written == 2 and s.split == "dev"
    assert sorted(p.name for p in (tmp_path / "tok" / "dev").glob("*.npz")) == ["00000001.npz", "doc-a.npz"]
    assert token_files.split_from_json_name("train_data.json") == "train"
    assert token_files.split_from_json_name("x/val_data.json") == "val"
    assert token_files.split_from_json_name("corpus.json") == "corpus"


def test_errors(tmp_path, capsys):
    def run(*args):
        rc = ptt.main([str(a) for a in args])
        return rc, capsys.readouterr().err

    rc, err = run("--json_path", tmp_path / "none.json", "--output_dir", tmp_path / "o")
    assert rc == 2 and "none.json: data list not found" in err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"}, {"txt": "b"}]')
    rc, err = run("--json_path", bad, "--output_dir", tmp_path / "o")
    assert rc == 2 and "bad.json: entry 1" in err
    bad.write_text('[{"text": "a"}')
    rc, err = run("--json_path", bad, "--output_dir", tmp_path / "o")
    assert rc == 2 and "bad.json: not valid JSON" in err
    bad.write_text("[]")
    rc, err = run("--json_path", bad, "--output_dir", tmp_path / "o")
    assert rc == 2 and "empty" in err
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"text": "a", "latent_path": "a/1.npy"}, {"text": "b", "latent_path": "b/1.npy"}]))
    rc, err = run("--json_path", dup, "--output_dir", tmp_path / "o")
    assert rc == 2 and "entries 0 and 1" in err


def test_runs_as_a_file(tmp_path):
    js = write_list(tmp_path / "train_data.json", TEXTS[:3])
    r = subprocess.run([sys.executable, "rwkv_diffusion_rnn/preprocess_tokenize_text.py", "--json_path", str(js),
                        "--output_dir", str(tmp_path / "tok"), "--tokenizer", "BlinkDL/rwkv7-g1",
                        "--max_length", "512", "--local-files-only"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 files" in r.stdout
    assert len(list((tmp_path / "tok" / "train").glob("*.npz"))) == 3


def test_pipeline_pairs_with_latents(tmp_path, tok):
    """prepare_latents -> preprocess_tokenize_text -> TextLatentDataset, both JSON and directory pairing."""
    from rwkv_diffusion_rnn.data.data_simple import TextLatentDataset
    from rwkv_diffusion_rnn.prepare_latents import main as prepare_main

    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(12)]
    (tmp_path / "c.txt").write_text("\n".join(texts))
    emb = tmp_path / "emb"
    emb.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(emb / f"{i}.npy", rng.normal(size=24).astype(np.float32))
    assert prepare_main(["--input", str(tmp_path / "c.txt"), "--name", "d", "--output_root", str(tmp_path),
                         "--project_only", "--embeddings_dir", str(emb), "--latent_dim", "4"]) == 0
    for split in ("train", "val"):
        assert ptt.main(["--json_path", str(tmp_path / "d" / f"{split}_data.json"),
                         "--output_dir", str(tmp_path / "tokens")]) == 0
    entries = json.loads((tmp_path / "d" / "val_data.json").read_text())
    ds = TextLatentDataset(tmp_path / "d" / "val_data.json", tmp_path / "tokens" / "val", latent_dim=4)
    ds_dir = TextLatentDataset(None, tmp_path / "tokens" / "val", tmp_path / "d" / "latents" / "val", latent_dim=4)
    assert len(ds) == len(ds_dir) == len(entries) == 1
    item = ds[0]
    assert tok.decode(item["input_ids"].tolist()) == entries[0]["text"]
    assert torch_equal(item["latent"], ds_dir[0]["latent"])
    assert len(TextLatentDataset(None, tmp_path / "tokens" / "train", tmp_path / "d" / "latents" / "train")) == 11


def torch_equal(a, b):
    return bool((a == b).all())
