"""data_simple: pairing token and latent files, validation errors, collation, resumable order."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_diffusion_rnn.data.data_simple import ResumableDataLoader, ResumableSampler, TextLatentCollator, TextLatentDataset, build_dataloaders, split_indices
from rwkv_diffusion_rnn.common.errors import DataFormatError


def no_tokens_info():
    """The warning of token files without tokens_info.json (as DiffRwkv's tokenizer writes them,
    and ``make_data`` on purpose): the loader cannot check them against the texts, and says so."""
    return pytest.warns(UserWarning, match=r"cannot check that these token files .* it has no tokens_info\.json")


def make_data(root: Path, n=6, dim=4, max_length=8, seed=0):
    """A prepare_latents + preprocess_tokenize_text style layout with known contents (token files
    without tokens_info.json, as the DiffRwkv pipeline writes them: :func:`no_tokens_info`)."""
    rng = np.random.default_rng(seed)
    data = root / "qwen"
    tok = root / "tokens" / "train"
    tok.mkdir(parents=True)
    (data / "latents" / "train").mkdir(parents=True)
    entries, expect = [], []
    for i in range(n):
        stem = f"{i:08d}"
        length = 1 + i % max_length
        ids = rng.integers(1, 65535, size=length)
        padded = np.zeros(max_length, np.int32)
        padded[:length] = ids
        mask = np.zeros(max_length, np.uint8)
        mask[:length] = 1
        np.savez(tok / f"{stem}.npz", input_ids=padded, attention_mask=mask)
        lat = rng.normal(size=dim).astype(np.float32)
        np.save(data / "latents" / "train" / f"{stem}.npy", lat)
        entries.append({"id": stem, "text": f"t{i}", "latent_path": f"latents/train/{stem}.npy"})
        expect.append((ids, lat))
    (data / "train_data.json").write_text(json.dumps(entries))
    return data / "train_data.json", tok, data / "latents" / "train", expect


def test_json_and_directory_pairing(tmp_path):
    js, tok, lat, expect = make_data(tmp_path)
    with no_tokens_info():
        datasets = (TextLatentDataset(js, tok, latent_dim=4), TextLatentDataset(None, tok, lat, latent_dim=4))
    for ds in datasets:
        assert len(ds) == 6
        for i, (ids, latent) in enumerate(expect):
            item = ds[i]
            assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ids.tolist()
            assert item["attention_mask"].dtype == torch.bool and item["attention_mask"].all()
            assert item["latent"].dtype == torch.float32
            np.testing.assert_array_equal(item["latent"].numpy(), latent)
    with no_tokens_info():
        ds = TextLatentDataset(js, tok, max_samples=3, seq_len=2)
    assert len(ds) == 3 and ds[2]["input_ids"].tolist() == expect[2][0][:2].tolist()


def test_latent_path_relative_to_cwd_or_absolute(tmp_path, monkeypatch):
    js, tok, lat, _ = make_data(tmp_path)
    entries = json.loads(js.read_text())
    entries[0]["latent_path"] = str(lat / "00000000.npy")  # absolute
    for e in entries[1:]:  # relative to the working directory, as older lists had
        e["latent_path"] = str(Path("qwen") / e["latent_path"])
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(entries))
    monkeypatch.chdir(tmp_path)
    with no_tokens_info():
        assert len(TextLatentDataset(other, tok, latent_dim=4)) == 6


def test_missing_files_reported_together(tmp_path):
    js, tok, lat, _ = make_data(tmp_path, n=9)
    for i in (1, 3, 5, 7, 8, 0):
        (lat / f"{i:08d}.npy").unlink()
    with pytest.raises(DataFormatError) as e:
        TextLatentDataset(js, tok)
    msg = str(e.value)
    assert "6 of 9 latent files are missing" in msg
    assert "00000000.npy" in msg and "... and 1 more" in msg and "prepare_latents" in msg
    (tok / "00000002.npz").unlink()
    with pytest.raises(DataFormatError, match=r"(?s)1 of 9 token files.*00000002\.npz.*preprocess_tokenize_text"):
        TextLatentDataset(js, tok)
    # Directory pairing: a latent without its token file is reported too.
    js, tok, lat, _ = make_data(tmp_path / "b", n=3)
    (tok / "00000001.npz").unlink()
    with pytest.raises(DataFormatError, match=r"(?s)00000001\.npz.*have no token file"):
        TextLatentDataset(None, tok, lat)
    with pytest.raises(DataFormatError, match="subdirectories"):
        TextLatentDataset(None, tok.parent, lat)


def test_wrong_dim_and_nan_name_the_file(tmp_path):
    js, tok, lat, _ = make_data(tmp_path)
    with no_tokens_info(), pytest.raises(DataFormatError, match=r"00000000\.npy: latent has 4 dims but "
                                                             r"model.latent_dim is 32.*--latent_dim 32"):
        TextLatentDataset(js, tok, latent_dim=32)
    np.save(lat / "00000003.npy", np.array([0, np.nan, 0, 0], np.float32))
    with no_tokens_info():
        ds = TextLatentDataset(js, tok, latent_dim=4)
    with pytest.raises(DataFormatError, match=r"00000003\.npy: latent contains NaN"):
        ds[3]
    np.save(lat / "00000004.npy", np.zeros(5, np.float32))
    with pytest.raises(DataFormatError, match=r"00000004\.npy: latent has 5 dims"):
        ds[4]


def test_collate_pads_to_longest_or_seq_len(tmp_path):
    js, tok, _, expect = make_data(tmp_path)
    with no_tokens_info():
        ds = TextLatentDataset(js, tok)
    batch = TextLatentCollator(pad_id=0)([ds[0], ds[3], ds[1]])
    assert batch["input_ids"].shape == (3, 4) and batch["latent"].shape == (3, 4)
    assert batch["attention_mask"].sum(1).tolist() == [1, 4, 2]
    assert batch["input_ids"][0, 1:].eq(0).all()
    assert batch["input_ids"][1].tolist() == expect[3][0].tolist()
    fixed = TextLatentCollator(pad_id=7, seq_len=3)([ds[0], ds[5]])
    assert fixed["input_ids"].shape == (2, 3)
    assert fixed["input_ids"][0].tolist()[1:] == [7, 7] and fixed["attention_mask"][1].all()


def all_batches(sampler, epochs):
    out = []
    for _ in range(epochs):
        out.extend(list(sampler))
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_resume_mid_epoch(drop_last):
    ref = all_batches(ResumableSampler(23, 5, seed=3, drop_last=drop_last), 3)
    per_epoch = 4 if drop_last else 5
    assert len(ref) == 3 * per_epoch
    # Epochs differ, every epoch covers the indices once (no drop_last).
    assert ref[:per_epoch] != ref[per_epoch : 2 * per_epoch]
    if not drop_last:
        assert sorted(sum(ref[:per_epoch], [])) == list(range(23))
    for stop in (2, per_epoch, per_epoch + 3):
        s = ResumableSampler(23, 5, seed=3, drop_last=drop_last)
        it, seen = iter(s), []
        while len(seen) < stop:
            try:
                seen.append(next(it))
            except StopIteration:
                it = iter(s)
        state = s.state_dict()
        assert state["seed"] == 3
        r = ResumableSampler(23, 5, seed=999, drop_last=drop_last)
        r.load_state_dict(state)
        rest = []
        while len(seen) + len(rest) < len(ref):
            rest += list(r)  # the rest of the current epoch, then whole epochs
        assert seen + rest == ref
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(23, 4).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_counts_consumed_batches(tmp_path, num_workers):
    js, tok, _, _ = make_data(tmp_path, n=11)
    with no_tokens_info():
        ds = TextLatentDataset(js, tok)
    collate = TextLatentCollator()

    def loader():
        return ResumableDataLoader(ds, ResumableSampler(len(ds), 2, seed=5), collate_fn=collate,
                                   num_workers=num_workers)

    full = loader()
    ref = [b["latent"] for b in loader_epochs(full, 2)]
    a = loader()
    got = []
    for b in a:  # workers fetch ahead; only 3 batches are consumed
        got.append(b["latent"])
        if len(got) == 3:
            break
    state = a.state_dict()
    assert (state["epoch"], state["batch_index"]) == (0, 3)
    b = loader()
    b.load_state_dict(state)
    got += [x["latent"] for x in loader_epochs(b, 2)]
    assert len(got) == len(ref) and all(torch.equal(x, y) for x, y in zip(got, ref))
    # The first loader, iterated again, also continues where it was left.
    rest = [x["latent"] for x in a]
    assert all(torch.equal(x, y) for x, y in zip(rest, ref[3:6]))


def loader_epochs(loader, epochs):
    out = []
    for _ in range(epochs):
        out.extend(loader)
    return out


def test_build_dataloaders_and_split(tmp_path):
    js, tok, lat, _ = make_data(tmp_path, n=10)
    with no_tokens_info():
        train, val = build_dataloaders(token_dir=tok, latent_dir=lat, val_fraction=0.2, batch_size=3,
                                       eval_batch_size=2, latent_dim=4, max_samples=9, seed=1)
    assert len(train.dataset) == 7 and len(val.dataset) == 2
    assert len(train) == 3 and [b["latent"].shape[0] for b in val] == [2]
    tr, va = split_indices(9, 0.2, 1)
    assert sorted(tr + va) == list(range(9)) and split_indices(9, 0.2, 1) == (tr, va)
    with no_tokens_info():
        train, val = build_dataloaders(json_path=js, token_dir=tok, val_json_path=js, val_token_dir=tok,
                                       batch_size=4)
    assert len(train) == 3 and sum(b["input_ids"].shape[0] for b in val) == 10
    with no_tokens_info():
        train, val = build_dataloaders(token_dir=tok, latent_dir=lat, batch_size=4)
    assert val is None
    with pytest.raises(DataFormatError, match="data.val_token_dir"):
        build_dataloaders(json_path=js, token_dir=tok, val_json_path=js)


def test_atomic_writes_leave_no_partial_file(tmp_path):
    from rwkv_diffusion_rnn.common.files import atomic_save_npy, atomic_write_with

    atomic_save_npy(tmp_path / "a.npy", np.arange(3, dtype=np.float32))

    def failing(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_with(tmp_path / "a.npy", failing)
    with pytest.raises(RuntimeError):
        atomic_write_with(tmp_path / "b.npy", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), [0, 1, 2])


def test_build_dataloaders_padding(tmp_path):
    js, tok, lat, _ = make_data(tmp_path, n=4)  # lengths 1..4
    with no_tokens_info():
        train, _ = build_dataloaders(token_dir=tok, latent_dir=lat, batch_size=4, seq_len=3, shuffle=False)
    b = next(iter(train))
    assert b["input_ids"].shape == (4, 3) and b["attention_mask"].sum(1).tolist() == [1, 2, 3, 3]
    with no_tokens_info():
        train, _ = build_dataloaders(token_dir=tok, latent_dir=lat, batch_size=2, seq_len=6, shuffle=False)
    assert next(iter(train))["input_ids"].shape == (2, 2)  # longest in the batch
    with no_tokens_info():
        train, _ = build_dataloaders(token_dir=tok, latent_dir=lat, batch_size=2, seq_len=6, shuffle=False,
                                     pad_to_seq_len=True)
    assert next(iter(train))["input_ids"].shape == (2, 6)
