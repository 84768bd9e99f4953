"""Nothing lost, nothing silently wrong: stale token files after a new corpus, interrupted runs of
prepare_latents and preprocess_tokenize_text, token ids outside the model's vocabulary, and texts
that are not valid Unicode.

Everything is tiny and model-free: latents come from random embeddings (``--project_only``) and
texts are tokenized with the ``bytes`` tokenizer.
"""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
from omegaconf import OmegaConf

from rwkv_diffusion_rnn import prepare_latents as pl
from rwkv_diffusion_rnn import preprocess_tokenize_text as ptt
from rwkv_diffusion_rnn.common.errors import LatentPrepError
from rwkv_diffusion_rnn.data import latents
from rwkv_diffusion_rnn.data.token_files import tokenize_json
from rwkv_diffusion_rnn.data.corpus import CorpusSpec, prepare_corpus
from rwkv_diffusion_rnn.data.data_simple import TOKENS_INFO_FILE, TextLatentDataset, text_sha256
from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_save_npz
from rwkv_diffusion_rnn.data.tokenizer import ByteTokenizer
from rwkv_diffusion_rnn.data.sources import TextLatentData

N, DIM, LATENT = 12, 16, 4


def texts(tag):
    return [f"{tag} sentence number {i}" for i in range(N)]


def embeddings(root):
    d = root / "emb"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N):
        np.save(d / f"{i}.npy", (rng.normal(size=DIM) * np.linspace(3, 0.2, DIM)).astype(np.float32))
    return d


def make_latents(root, lines, overwrite=False):
    """``root/d`` from ``lines`` (one example per line) and random embeddings."""
    (root / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return latents.prepare_latents(root / "c.txt", "d", output_root=root, project_only=True,
                                   embeddings_dir=embeddings(root), latent_dim=LATENT, overwrite=overwrite,
                                   show_progress=False)


def tokenize(root, split="train", **kw):
    return tokenize_json(root / "d" / f"{split}_data.json", root / "tok", ByteTokenizer(), max_length=48,
                         tokenizer_name="bytes", show_progress=False, **kw)


def snapshot(folder):
    """Every file under ``folder`` with its bytes: what must survive a failed run unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def decoded(path):
    with np.load(path, allow_pickle=False) as z:
        return ByteTokenizer().decode(z["input_ids"][z["attention_mask"].astype(bool)].tolist())


def train_entries(root):
    return json.loads((root / "d" / "train_data.json").read_text(encoding="utf-8"))


# ---- 1. stale token files after a new corpus ---------------------------------------------------
def test_retokenizing_after_a_new_corpus_rewrites_the_changed_texts(tmp_path):
    make_latents(tmp_path, texts("old"))
    first = tokenize(tmp_path)
    assert first.written == first.entries and first.changed == 0
    new = texts("old")
    new[1], new[5] = "a new first text", "a new fifth text"
    make_latents(tmp_path, new, overwrite=True)
    entries = train_entries(tmp_path)
    assert all(e["text_sha256"] == text_sha256(e["text"]) for e in entries)
    n_changed = sum(e["text"].startswith("a new") for e in entries)
    assert n_changed >= 1

    again = tokenize(tmp_path)
    assert (again.written, again.changed, again.skipped) == (n_changed, n_changed, len(entries) - n_changed)
    assert f"skipped {again.skipped} existing" in again.line()
    assert f"{n_changed} rewritten because their text changed" in again.line()
    for e in entries:  # every token file holds the text its latent was made from
        assert decoded(tmp_path / "tok" / "train" / f"{e['id']}.npz") == e["text"]
    info = json.loads((tmp_path / "tok" / "train" / TOKENS_INFO_FILE).read_text())
    assert info["complete"] is True
    assert info["text_sha256"] == {e["id"]: e["text_sha256"] for e in entries}
    TextLatentDataset(tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train", latent_dim=LATENT)


def test_the_trainer_refuses_token_files_made_from_an_older_text_without_opening_them(tmp_path, monkeypatch):
    make_latents(tmp_path, texts("old"))
    tokenize(tmp_path)
    make_latents(tmp_path, texts("new"), overwrite=True)  # ...and the tokenizer CLI not re-run
    entry = train_entries(tmp_path)[0]
    # The check reads tokens_info.json only: no token file is opened at start-up.
    monkeypatch.setattr(TextLatentDataset, "_load_tokens", lambda self, i: pytest.fail("opened a token file"))
    for args in ((tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train"),
                 (None, tmp_path / "tok" / "train", tmp_path / "d" / "latents" / "train")):
        with pytest.raises(DataFormatError) as e:
            TextLatentDataset(*args, latent_dim=LATENT)
        msg = str(e.value)
        assert f"{entry['id']}.npz: made from another text than" in msg and "train_data.json" in msg
        assert text_sha256(entry["text"])[:12] in msg
        assert text_sha256(texts("old")[int(entry["id"])])[:12] in msg
        assert "re-run `python -m rwkv_diffusion_rnn.preprocess_tokenize_text" in msg


def test_a_text_edited_after_its_latent_was_made_is_refused(tmp_path):
    make_latents(tmp_path, texts("old"))
    tokenize(tmp_path)
    js = tmp_path / "d" / "train_data.json"
    entries = train_entries(tmp_path)
    entries[2]["text"] = "edited by hand"
    js.write_text(json.dumps(entries))
    with pytest.raises(DataFormatError, match=f"entry '{entries[2]['id']}' records text_sha256 .* the text was changed"):
        TextLatentDataset(js, tmp_path / "tok" / "train", latent_dim=LATENT)


def test_token_files_without_recorded_hashes_are_called_unknown_and_retokenized(tmp_path):
    make_latents(tmp_path, texts("old"))
    tokenize(tmp_path)
    info_path = tmp_path / "tok" / "train" / TOKENS_INFO_FILE
    info = json.loads(info_path.read_text())
    del info["text_sha256"], info["complete"]  # as an older version wrote it
    info_path.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="records no text hashes"):
        TextLatentDataset(tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train", latent_dim=LATENT)
    s = tokenize(tmp_path)
    assert s.written == s.unrecorded == s.entries and "because no text hash was recorded" in s.line()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextLatentDataset(tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train", latent_dim=LATENT)


def test_a_killed_tokenizer_run_leaves_no_listing_that_claims_completeness(tmp_path, monkeypatch):
    make_latents(tmp_path, texts("old"))
    tokenize(tmp_path)
    make_latents(tmp_path, texts("new"), overwrite=True)
    calls = []

    def dies_on_the_second_file(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        atomic_save_npz(path, **arrays)

    monkeypatch.setattr("rwkv_diffusion_rnn.data.token_files.atomic_save_npz", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        tokenize(tmp_path)
    monkeypatch.undo()
    info = json.loads((tmp_path / "tok" / "train" / TOKENS_INFO_FILE).read_text())
    assert info["complete"] is False and info["text_sha256"] == {}  # vouches for none of the old files
    with pytest.raises(DataFormatError, match="records an unfinished preprocess_tokenize_text run"):
        TextLatentDataset(tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train", latent_dim=LATENT)
    s = tokenize(tmp_path)  # the re-run finishes the job
    assert s.written == s.entries
    TextLatentDataset(tmp_path / "d" / "train_data.json", tmp_path / "tok" / "train", latent_dim=LATENT)


# ---- 1. prepare_latents --overwrite: the new dataset replaces the old one whole ----------------
def test_a_kill_while_overwriting_latents_leaves_the_old_dataset_complete(tmp_path, monkeypatch, capsys):
    make_latents(tmp_path, texts("old"))
    before = snapshot(tmp_path / "d")
    calls = []

    def dies_on_the_second_file(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        atomic_save_npy(path, array)

    monkeypatch.setattr(latents, "atomic_save_npy", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        make_latents(tmp_path, texts("new"), overwrite=True)
    monkeypatch.undo()
    assert snapshot(tmp_path / "d") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "d", "emb"]

    # A hard kill (no clean-up) leaves the unfinished new dataset; the next run deletes it.
    shutil.copytree(tmp_path / "d" / "latents", tmp_path / ".d.new" / "latents")
    capsys.readouterr()
    make_latents(tmp_path, texts("new"), overwrite=True)
    assert f"deleted {tmp_path / '.d.new'}, the unfinished dataset of an interrupted run" in capsys.readouterr().err
    assert {e["text"] for e in train_entries(tmp_path)} <= set(texts("new"))
    assert not (tmp_path / ".d.new").exists() and not (tmp_path / ".d.old").exists()


def test_a_kill_between_the_renames_of_the_swap_is_undone_by_the_next_run(tmp_path, monkeypatch, capsys):
    make_latents(tmp_path, texts("old"))
    before = snapshot(tmp_path / "d")
    real_rename = os.rename

    def dies_renaming_the_new_one_in(src, dst):
        if str(src).endswith(".d.new"):
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(latents.os, "rename", dies_renaming_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        make_latents(tmp_path, texts("new"), overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "d").exists() and snapshot(tmp_path / ".d.old") == before
    capsys.readouterr()
    with pytest.raises(LatentPrepError, match="already exists"):  # restored, so not replaced without --overwrite
        make_latents(tmp_path, texts("new"))
    err = capsys.readouterr().err
    assert f"restored {tmp_path / 'd'} from {tmp_path / '.d.old'}" in err
    assert f"deleted {tmp_path / '.d.new'}, the unfinished dataset" in err
    assert snapshot(tmp_path / "d") == before

    # Killed after the new dataset was renamed in, before the old one was deleted.
    shutil.copytree(tmp_path / "d", tmp_path / ".d.old")
    make_latents(tmp_path, texts("new"), overwrite=True)
    assert "the dataset an interrupted --overwrite run had already replaced" in capsys.readouterr().err
    assert not (tmp_path / ".d.old").exists()


def test_overwriting_a_dataset_folder_that_holds_other_files_is_refused(tmp_path):
    make_latents(tmp_path, texts("old"))
    (tmp_path / "d" / "notes.md").write_text("mine")
    before = snapshot(tmp_path / "d")
    with pytest.raises(LatentPrepError, match=r"holds notes\.md, which prepare_latents did not write"):
        make_latents(tmp_path, texts("new"), overwrite=True)
    assert snapshot(tmp_path / "d") == before


# ---- 2. token ids outside the model's vocabulary -----------------------------------------------
def token_files(root, rows, pad_id=0, max_length=8):
    """One token file (right-padded with ``pad_id``) and latent per row of ids."""
    rng = np.random.default_rng(0)
    for i, ids in enumerate(rows):
        padded = np.full(max_length, pad_id, np.int32)
        padded[: len(ids)] = ids
        mask = (np.arange(max_length) < len(ids)).astype(np.uint8)
        atomic_save_npz(root / "tokens" / f"{i:08d}.npz", input_ids=padded, attention_mask=mask)
        atomic_save_npy(root / "latents" / f"{i:08d}.npy", rng.normal(size=LATENT).astype(np.float32))
    return root / "tokens", root / "latents"


@pytest.mark.parametrize("bad, what", [(64, "is outside the vocabulary [0, 64)"), (-1, "is outside the vocabulary"),
                                       (63, "is model.mask_id 63, which marks noised positions")])
def test_a_token_id_the_model_cannot_embed_names_the_file_and_position(tmp_path, bad, what):
    tok, lat = token_files(tmp_path, [[1, 2, 3], [4, 5, 6, bad, 7]], pad_id=99999)  # pad ids are not data
    ds = TextLatentDataset(None, tok, lat, latent_dim=LATENT)
    ds.arm_vocab_check(64, 63)
    assert ds[0]["input_ids"].tolist() == [1, 2, 3]
    with pytest.raises(DataFormatError) as e:
        ds[1]
    msg = str(e.value)
    assert f"{tok / '00000001.npz'}: input_ids[3] = {bad} {what}" in msg
    assert "model.vocab_size=64, model.mask_id=63" in msg and "preprocess_tokenize_text" in msg


def test_each_token_file_is_checked_once(tmp_path, monkeypatch):
    tok, lat = token_files(tmp_path, [[1, 2], [3, 4]])
    ds = TextLatentDataset(None, tok, lat, latent_dim=LATENT)
    ds.arm_vocab_check(64, 63)
    checked = []
    real = TextLatentDataset._check_ids
    monkeypatch.setattr(TextLatentDataset, "_check_ids", lambda self, i, *a: (checked.append(i), real(self, i, *a)))
    for _ in range(3):
        ds[0], ds[1]
    assert checked == [0, 1]


def data_cfg(tmp_path, **data):
    keys = dict(token_dir=None, latent_dir=None, json_path=None, val_token_dir=None, val_latent_dir=None,
                val_json_path=None, val_fraction=0.0, seq_len=None, max_samples=None, num_workers=0, shuffle=True)
    return OmegaConf.create({"data": {**keys, **data}, "model": {"latent_dim": LATENT, "latent_prefix_len": 1}})


def test_check_vocab_names_a_bad_validation_file_before_training(tmp_path):
    tok, lat = token_files(tmp_path / "train", [[1, 2], [3, 4], [5, 6]])
    vtok, vlat = token_files(tmp_path / "val", [[1, 2], [3, 70]])
    cfg = data_cfg(tmp_path, token_dir=str(tok), latent_dir=str(lat), val_token_dir=str(vtok),
                   val_latent_dir=str(vlat))
    data = TextLatentData(cfg, batch_size=2, eval_batch_size=2, seed=0, tokenizer=None)
    with pytest.raises(DataFormatError, match=r"val/tokens/00000001\.npz: input_ids\[1\] = 70 is outside"):
        data.check_vocab(64, 63)

    # A held-out split shares the training dataset: both are checked, validation at once.
    tok, lat = token_files(tmp_path / "held", [[1, 2], [3, 4], [5, 6], [7, 8], [9, 64]])
    data = TextLatentData(data_cfg(tmp_path, token_dir=str(tok), latent_dir=str(lat), val_fraction=0.4),
                          batch_size=2, eval_batch_size=2, seed=0, tokenizer=None)
    val_indices = data.val.dataset.indices
    if 4 in val_indices:
        with pytest.raises(DataFormatError, match=r"00000004\.npz: input_ids\[1\] = 64"):
            data.check_vocab(64, 63)
    else:
        data.check_vocab(64, 63)
        assert data.val.dataset.dataset._ids_checked[val_indices].all()
        with pytest.raises(DataFormatError, match=r"00000004\.npz: input_ids\[1\] = 64"):
            for _ in data.epoch_batches():
                pass


# ---- 3. texts that are not valid Unicode --------------------------------------------------------
def test_a_lone_surrogate_is_refused_by_prepare_latents_naming_the_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "ab \\ud800 cd"}\n', encoding="utf-8")
    rc = pl.main(["--input", str(corpus), "--name", "d", "--output_root", str(tmp_path), "--project_only",
                  "--embeddings_dir", str(embeddings(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{corpus}: line 3: the text is not valid Unicode: a lone surrogate (U+D800) at character 3" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / ".d.new").exists()


def test_a_lone_surrogate_is_refused_by_the_tokenizer_cli_before_it_writes_anything(tmp_path, capsys):
    make_latents(tmp_path, texts("old"))
    tokenize(tmp_path)
    before = snapshot(tmp_path / "tok")
    js = tmp_path / "d" / "train_data.json"
    entries = train_entries(tmp_path)
    entries[2]["text"] = "x\ud800y"
    js.write_text(json.dumps(entries), encoding="utf-8")  # ensure_ascii: stored as a \ud800 escape
    for out in (tmp_path / "tok", tmp_path / "fresh"):
        rc = ptt.main(["--json_path", str(js), "--output_dir", str(out), "--tokenizer", "bytes"])
        err = capsys.readouterr().err
        assert rc == 2
        assert f"{js}: entry 2 (stem '{entries[2]['id']}'): the text is not valid Unicode" in err
        assert "at character 1" in err
    assert snapshot(tmp_path / "tok") == before
    assert not (tmp_path / "fresh").exists()


def test_a_lone_surrogate_in_a_text_corpus_names_the_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello there"}\n{"text": "\\ud800 abc"}\n', encoding="utf-8")
    for tok in ("chars", ByteTokenizer()):
        with pytest.raises(DataFormatError, match=r"c\.jsonl:2: the text is not valid Unicode: a lone surrogate"):
            prepare_corpus(CorpusSpec(path=str(src), val_fraction=0), tok, tmp_path / "cache", progress=False)
